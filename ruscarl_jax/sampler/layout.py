"""The rollout layout: the sampler's own mesh over the training mesh's devices, and the policy in it.

Every device is a data-parallel shard of its own with a replicated compute-dtype copy of the weights
(`rollout_params`, made once per rollout by one jitted reshard, never per token). Chosen over a
tensor-parallel layout because the paper configs' weights fit a chip several times over (configs/qwen7b.py
gives the numbers) and it leaves nothing to communicate per decode step; the cost is the replicated copy,
counted in the memory plan (plan/step_memory.py, "rollout weights").
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, make_mesh


def rollout_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Mesh | None:
    """The sampler's own mesh over the training mesh's devices (same order): every device is a data-parallel
    shard of its own (all of them on the first axis of the batch rule), the weights are replicated. Each
    shard decodes its own slots from its own page group; nothing but flags and counts crosses shards."""
    if mesh is None:
        return None
    axes = dict(rules).get("batch") or ("data",)
    axis = axes if isinstance(axes, str) else axes[0]
    return make_mesh({axis: mesh.devices.size}, list(mesh.devices.flat))


def shard_axis(mesh: Mesh) -> str:
    """The rollout mesh's one non-trivial axis (the first, on one device)."""
    return next(a for a in mesh.axis_names if mesh.shape[a] == mesh.devices.size)


@functools.lru_cache(maxsize=8)
def _reshard_fn(dtype: str, mesh: Mesh | None) -> Any:
    if mesh is None:
        return jax.jit(lambda p: cast_params(p, dtype))
    return jax.jit(lambda p: cast_params(p, dtype), out_shardings=NamedSharding(mesh, PartitionSpec()))


def rollout_params(params: qwen.Params, dtype: str, mesh: Mesh | None) -> qwen.Params:
    """The policy in the rollout layout, once per rollout (never per token): cast to the compute dtype and
    replicated over the rollout mesh by one jitted reshard (an all-gather of each training shard). Its peak
    is the replicated copy plus the training shards it is gathered from."""
    if mesh is None:
        return cast_params(params, dtype)
    return _reshard_fn(dtype, mesh)(params)


def cast_params(params: qwen.Params, dtype: str) -> qwen.Params:
    """The parameters in the compute dtype. Leaves already in it are passed through (no copy); the others
    keep their sharding."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype) else x

    return jax.tree.map(cast, params)

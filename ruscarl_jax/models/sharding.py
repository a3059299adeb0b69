"""Sharding by name: a device mesh from config and logical-axis rules that map names to mesh axes.

Every parameter and main activation carries logical axis names (``embed``, ``heads``, ``mlp`` ...). A
rules table (a tuple of ``(logical_name, mesh_axes)`` pairs, kept in the config) maps them to the mesh
axes ``data``, ``fsdp``, ``expert`` (expert parallelism: the experts of a MoE layer) and ``tensor``.
A mesh axis that does not divide the array dimension, or that an
earlier dimension of the same array already uses, is dropped for that dimension (the dimension is then
replicated over it), so one rules table serves every model size and mesh shape.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Parameters: the embedding dimension is sharded over fsdp (ZeRO-3 style), heads / MLP / vocab over
# tensor; MoE experts over expert, each expert's hidden dimension over tensor. Activations: batch over data x fsdp, heads / MLP / vocab over tensor, the rest replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("cache_length", None),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("router_experts", None),
)


def platform(mesh: Mesh | None = None) -> str:
    """The platform a program is built for: that of the mesh's devices ("tpu" for a TPU topology compiled
    from a CPU host), else that of the mesh in context (``jax.set_mesh``, inside ``shard_map``), else the
    default backend. Kernels (Pallas, megablox, cuDNN) are chosen by this, never by the host's backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None and device.platform:
        return device.platform
    return jax.default_backend()


def make_mesh(shape: dict[str, int] | Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor). One size may be -1 ("the rest of the devices")."""
    sizes = dict(shape)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; valid axes are {list(MESH_AXES)}")
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    devices = list(jax.devices() if devices is None else devices)
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {fill} in {sizes}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(
                f"mesh: {len(devices)} devices cannot be split into {sizes} "
                f"(the fixed axes multiply to {known}, which does not divide {len(devices)})")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh: axis sizes {sizes} multiply to {total} but there are {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def rows_over_expert(rules: Rules) -> Rules:
    """The rules with the batch also split over the expert axis (data x fsdp x expert): attention and the
    dense layers then do not repeat work across expert shards; each MoE block gathers its rows."""
    return tuple((name, ("data", "fsdp", "expert")) if name == "batch" else (name, axes) for name, axes in rules)


def check_expert_axis(num_experts: int, expert_axis: int) -> None:
    """An expert axis must split the experts evenly (each device holds whole experts)."""
    if num_experts and num_experts % expert_axis:
        raise ValueError(f"the mesh's expert axis ({expert_axis}) does not divide num_experts ({num_experts})")


def _mesh_axes_of(rule_value: Any) -> tuple[str, ...]:
    if rule_value is None:
        return ()
    if isinstance(rule_value, str):
        return (rule_value,)
    return tuple(rule_value)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry the logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match an array of rank {len(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        if name is not None and name not in table:
            raise KeyError(f"no sharding rule for logical axis '{name}'; rules cover {sorted(table)}")
        chosen: list[str] = []
        size = 1
        for axis in _mesh_axes_of(table.get(name)) if name is not None else ():
            axis_size = mesh.shape[axis]
            if axis in used or axis_size == 1 or dim % (size * axis_size):
                continue
            chosen.append(axis)
            size *= axis_size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Pin an activation's sharding by logical names (a no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def tree_shardings(logical_axes: Any, shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree, given matching pytrees of logical names and of shapes."""
    return jax.tree.map(
        lambda names, shape: named_sharding(names, shape, mesh, rules),
        logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a batch-major array: leading axis over the batch rule, the rest replicated."""
    names = ("batch",) + (None,) * (ndim - 1)
    if batch_size is None:
        batch_axes = _mesh_axes_of(dict(rules).get("batch"))
        return NamedSharding(mesh, PartitionSpec(batch_axes or None))
    return named_sharding(names, (batch_size,) + (1,) * (ndim - 1), mesh, rules)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch rule splits a batch on this mesh."""
    return math.prod(mesh.shape[axis] for axis in _mesh_axes_of(dict(rules).get("batch")))


def _batch_spec(mesh: Mesh, ndim: int, rules: Rules) -> PartitionSpec:
    axes = tuple(a for a in _mesh_axes_of(dict(rules).get("batch")) if mesh.shape[a] > 1)
    return PartitionSpec(axes or None, *([None] * (ndim - 1)))


def host_to_global(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Each process's rows (batch-major numpy arrays) -> global arrays split over the batch axes.

    On one process this is a device_put; on several, process i's rows become its devices' shards
    (jax.make_array_from_process_local_data), so no host ever holds the whole batch.
    """
    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, _batch_spec(mesh, x.ndim, rules)), x)

    return jax.tree.map(put, tree)


def global_to_host(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """The inverse of host_to_global: this process's rows of batch-sharded global arrays, as numpy."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    specs = jax.tree.map(lambda x: _batch_spec(mesh, x.ndim, rules), tree)
    return jax.tree.map(np.asarray, multihost_utils.global_array_to_host_local_array(tree, mesh, specs))

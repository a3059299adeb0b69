"""The optimizer: global-norm gradient clipping, then AdamW with decoupled weight decay on a schedule.

Defaults are verl's actor optimizer (lr 1e-6, betas 0.9 / 0.999, weight decay 0.01, clip 1.0,
constant schedule). The learning rate is injected as a hyperparameter so the rate of the last
update can be read back from the state (``last_learning_rate``) for the metrics.

Master weights: the optimizer always updates the float32 parameters it is given; bfloat16 compute is
a cast of those parameters inside the step (``cast_floating``), so the master copy never loses bits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

SCHEDULES: tuple[str, ...] = ("constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW + clipping + schedule.

    schedule: 'constant' (linear warmup over warmup_steps from 0, then learning_rate) or
    'warmup_cosine' (linear warmup, then cosine decay to learning_rate * min_lr_ratio at total_steps).
    Steps count optimizer updates (one per minibatch), not trainer steps.
    max_grad_norm: clip the global gradient norm to this; None or 0 disables clipping.
    """

    learning_rate: float = 1e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"OptimizerSettings.{field}={getattr(self, field)!r}: {why}")

        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"valid: {list(SCHEDULES)}")
        if not self.learning_rate >= 0:
            raise bad("learning_rate", "must be >= 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.schedule == "warmup_cosine" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise bad("total_steps", f"warmup_cosine needs total_steps > warmup_steps={self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")


def make_schedule(s: OptimizerSettings) -> optax.Schedule:
    """The learning rate as a function of the optimizer update count (0-based)."""
    if s.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=s.learning_rate, warmup_steps=s.warmup_steps,
            decay_steps=int(s.total_steps), end_value=s.learning_rate * s.min_lr_ratio)
    if s.warmup_steps == 0:
        return optax.constant_schedule(s.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps), optax.constant_schedule(s.learning_rate)],
        [s.warmup_steps])


def make_optimizer(s: OptimizerSettings) -> optax.GradientTransformation:
    """clip_by_global_norm -> adamw(schedule, weight decay)."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=make_schedule(s), b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=s.weight_decay)
    if not s.max_grad_norm:
        return optax.chain(optax.identity(), adamw)
    return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings of the optimizer state: each parameter-shaped leaf (Adam's mu, nu) like its parameter,
    the rest (counts, hyperparameters) replicated. `params` may be arrays or ShapeDtypeStructs with shardings.

    Without them ``jit(optimizer.init)`` leaves the state wherever XLA puts zeros: on one device, and so
    replicated on every device once placed on the mesh (two float32 copies of the model per device)."""
    shardings = jax.tree.map(lambda p: p.sharding, params)
    meshes = {s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)}
    if len(meshes) != 1:
        raise ValueError(f"opt_state_shardings: the parameters must all be NamedSharding-ed on one mesh, got {len(meshes)} meshes")
    replicated = NamedSharding(meshes.pop(), PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
                                 shardings, transform_non_params=lambda _: replicated)


def init_opt_state(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """optimizer.init(params), created directly in the shardings of `opt_state_shardings`."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params))(params)


def last_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the most recent update (NaN for an optimizer with no injected rate)."""
    injected = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for state in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, injected)):
        if isinstance(state, injected) and "learning_rate" in state.hyperparams:
            return jnp.asarray(state.hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def cast_floating(tree: Any, dtype: str | jnp.dtype) -> Any:
    """Cast the floating-point leaves of a pytree to `dtype` (integer leaves are left alone)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

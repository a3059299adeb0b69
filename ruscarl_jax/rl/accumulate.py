"""Gradient accumulation over micro-batches and an update that is skipped when it is not finite.

Shared by the GRPO and SFT steps. A micro-batch loss here is its share of the minibatch loss (the
losses are normalised by minibatch-wide counts), so summing micro-batch gradients gives exactly the
gradient of the minibatch loss.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def split_rows(batch: Batch, rows: int) -> Batch:
    """Reshape every [N, ...] leaf to [N // rows, rows, ...] (N must be a multiple of rows)."""
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % rows:
            raise ValueError(f"cannot split {x.shape[0]} rows into micro-batches of {rows}")
        return x.reshape((x.shape[0] // rows, rows) + x.shape[1:])
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params: Any, micro_batches: Batch,
                         shard_rows: Callable[[Batch], Batch] = lambda b: b) -> tuple[Any, dict[str, jax.Array]]:
    """Sum of gradients (float32) and of the scalar outputs ('loss' and aux) over micro-batches.

    micro_batches has a leading micro-batch axis; `shard_rows` pins each micro-batch's sharding.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, micro):
        grad_sum, stats_sum = carry
        (loss, aux), grads = grad_fn(params, shard_rows(micro))
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)
        stats = {"loss": loss, **aux}
        return (grad_sum, jax.tree.map(lambda a, b: a + b.astype(a.dtype), stats_sum, stats)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    loss_shape, aux_shape = jax.eval_shape(loss_fn, params, first)
    wide = lambda dtype: jnp.promote_types(dtype, jnp.float32)  # noqa: E731 - float32 sums (float64 under x64)
    zero_stats = {"loss": jnp.zeros((), wide(loss_shape.dtype)),
                  **{k: jnp.zeros((), wide(v.dtype)) for k, v in aux_shape.items()}}
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, wide(p.dtype)), params)
    (grads, stats), _ = jax.lax.scan(body, (zero_grads, zero_stats), micro_batches)
    return grads, stats


def apply_if_finite(optimizer: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                    loss: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
    """One optimizer update, or none at all when the loss or any gradient is not finite.

    Returns (params, opt_state, applied, grad_norm); on a skipped update params and opt_state
    (including the step count that drives the schedule) are returned unchanged.
    """
    grad_norm = optax.tree.norm(grads)
    applied = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe_grads = jax.tree.map(lambda g: jnp.where(applied, g, 0.0), grads)
    updates, new_state = optimizer.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(applied, new, old)  # noqa: E731
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state), applied, grad_norm

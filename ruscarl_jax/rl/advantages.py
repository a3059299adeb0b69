"""GRPO group advantages: each response's reward relative to the other responses to the same prompt.

A_i = (s_i - mean_g) / (std_g + eps) with the unbiased std of the group g of row i; a group of one
has mean 0 and std 1 (so its advantage is its reward, as in verl). Dr. GRPO drops the division.
Rows marked invalid take no part in any group's statistics and get advantage 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_stats(rewards: jax.Array, group_ids: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: (mean, unbiased std, count) of the valid rewards of its group.

    Group ids may be any integers; rows sharing an id form a group, wherever they are. The group
    statistics come from an [N, N] same-group matrix, which is cheap at rollout-batch sizes (a few
    thousand rows) and needs no static group count, so it jits for any grouping.
    """
    same = (group_ids[:, None] == group_ids[None, :]) & valid[None, :]
    # where(), not a matmul with 0/1 weights: a NaN reward must poison only its own group
    count = same.sum(axis=1).astype(jnp.float32)
    mean = jnp.where(same, rewards[None, :], 0.0).sum(axis=1) / jnp.maximum(count, 1.0)
    sq_dev = jnp.where(same, jnp.square(rewards[None, :] - mean[:, None]), 0.0)
    std = jnp.sqrt(sq_dev.sum(axis=1) / jnp.maximum(count - 1.0, 1.0))
    return mean, std, count


def group_advantages(rewards: jax.Array, group_ids: jax.Array, valid: jax.Array | None = None, *,
                     norm_by_std: bool = True, epsilon: float = 1e-6) -> jax.Array:
    """Per-row advantages [N] (float32) from rewards [N] and integer group ids [N] (see `group_stats`)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    mean, std, count = group_stats(rewards, group_ids, valid)
    single = count <= 1.0
    mean = jnp.where(single, 0.0, mean)
    std = jnp.where(single, 1.0, std)
    centred = rewards - mean
    adv = centred / (std + epsilon) if norm_by_std else centred
    return jnp.where(valid, adv, 0.0)


def token_advantages(advantages: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Broadcast row advantages [N] over response tokens [N, R] (zero on padding)."""
    return advantages[:, None] * response_mask.astype(advantages.dtype)

"""Which rows of a rollout batch the loss keeps: the peers' standard group and length filters.

- Zero reward variance (DAPO's dynamic-sampling filter, TRL / verl `filter_groups`): a group of two or
  more valid rows whose rewards all agree has advantage 0 everywhere, so it adds no policy gradient,
  only KL / entropy terms and loss-normaliser weight. `frac_reward_zero_std` (the fraction of valid rows
  in such groups; groups are equal-sized, so also the fraction of groups) is always reported; with the
  filter on those rows leave the loss. Groups of one are never counted (they are not GRPO groups).
- Truncated responses (finish reason 'length'): optionally masked from the loss (DAPO's overlong
  filtering); they keep their place in their group's reward statistics. `frac_truncated` is always
  reported.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ruscarl_jax.rl.advantages import group_stats

ZERO_STD_TOL = 1e-6  # a group std below this counts as zero (rewards are means of judge verdicts)


def zero_std_rows(rewards: jax.Array, group_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Bool [N]: valid rows of groups with >= 2 valid rows whose rewards have (near) zero std."""
    _, std, count = group_stats(jnp.asarray(rewards, jnp.float32), group_ids, valid)
    return valid & (count >= 2) & (std <= ZERO_STD_TOL)


def filter_rows(loss_mask: jax.Array, rewards: jax.Array, group_ids: jax.Array, valid: jax.Array,
                truncated: jax.Array | None, *, filter_zero_std: bool,
                mask_truncated: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss mask [N, R] after the optional filters, and their metrics (always reported)."""
    zero = zero_std_rows(rewards, group_ids, valid)
    n_valid = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    metrics = {"frac_reward_zero_std": zero.sum() / n_valid}
    keep = ~zero if filter_zero_std else jnp.ones_like(zero)
    if truncated is not None:
        cut = (truncated > 0) & valid
        metrics["frac_truncated"] = cut.sum() / n_valid
        if mask_truncated:
            keep = keep & ~cut
    metrics["frac_rows_filtered"] = (valid & ~keep).sum() / n_valid
    return loss_mask * keep[:, None].astype(loss_mask.dtype), metrics

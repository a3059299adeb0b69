"""GRPO loss terms over response tokens: the clipped policy loss, KL estimators, and aggregation.

Every term is aggregated with explicit normalisers (tokens and non-empty rows of the whole
minibatch), so the loss of a minibatch is the sum of its micro-batches' losses: gradient
accumulation over micro-batches, and data parallelism across devices, give the same update as one
big batch. Rows whose mask is all zero contribute exactly 0 and are not counted as rows.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ruscarl_jax.rl.settings import AGG_MODES, KL_ESTIMATORS

LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| and |log pi_ref - log pi| are clamped to this
LOW_VAR_KL_CLAMP = 10.0  # the k3 estimate itself is clamped to [-10, 10]


class Normalizers(NamedTuple):
    """Denominators of the aggregation, taken over a whole minibatch (not one micro-batch)."""

    num_tokens: jax.Array  # response tokens under the mask
    num_rows: jax.Array  # rows with at least one such token


def normalizers(mask: jax.Array) -> Normalizers:
    """The normalisers of a loss mask [N, R] taken as the whole minibatch."""
    mask = mask.astype(jnp.float32)
    return Normalizers(mask.sum(), (mask.sum(axis=-1) > 0).astype(jnp.float32).sum())


def aggregate(values: jax.Array, mask: jax.Array, mode: str, norm: Normalizers | None = None) -> jax.Array:
    """Reduce per-token values [N, R] to a scalar loss.

    token-mean:              sum(v m) / tokens
    seq-mean-token-sum:      sum_i (sum_t v m) / rows
    seq-mean-token-mean:     sum_i (sum_t v m / |o_i|) / rows
    seq-mean-token-sum-norm: sum_i (sum_t v m / R) / rows   (R: padded response length; Dr. GRPO)
    where tokens and rows come from `norm` (default: this batch) and count only non-empty rows.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r}; valid: {list(AGG_MODES)}")
    mask = mask.astype(jnp.float32)
    norm = normalizers(mask) if norm is None else norm
    token_sums = jnp.sum(jnp.where(mask > 0, values * mask, 0.0), axis=-1)
    if mode == "token-mean":
        return token_sums.sum() / jnp.maximum(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        token_sums = token_sums / jnp.maximum(mask.sum(axis=-1), 1.0)
    elif mode == "seq-mean-token-sum-norm":
        token_sums = token_sums / mask.shape[-1]
    return token_sums.sum() / jnp.maximum(norm.num_rows, 1.0)


def masked_mean(values: jax.Array, mask: jax.Array, norm: Normalizers | None = None) -> jax.Array:
    """Token mean of `values` under `mask` (metrics are always token means, as in verl)."""
    return aggregate(values, mask, "token-mean", norm)


def policy_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: float, loss_agg_mode: str,
                norm: Normalizers | None = None, token_weight: jax.Array | None = None,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with separate low / high clip and the dual clip for negative advantages.

    token_weight [N, R] (optional, no gradient) multiplies each token's loss before aggregation: the
    rollout importance weight of truncated IS (`rollout_correction`).

    All inputs are per token [N, R]. Returns the aggregated loss and the token-mean metrics
    pg_clipfrac (the upper/lower PPO clip is active), pg_clipfrac_lower (the dual clip is active)
    and ppo_kl (mean of log pi_old - log pi).
    """
    log_ratio = jnp.clip(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    ppo = jnp.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_ratio_c
    dual = jnp.minimum(ppo, dual_bound)
    negative = advantages < 0
    per_token = jnp.where(negative, dual, ppo)
    if token_weight is not None:
        per_token = per_token * token_weight
    metrics = {
        "pg_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask, norm),
        "pg_clipfrac_lower": masked_mean(((ppo > dual_bound) & negative).astype(jnp.float32), mask, norm),
        "ppo_kl": masked_mean(-log_ratio, mask, norm),
    }
    return aggregate(per_token, mask, loss_agg_mode, norm), metrics


def kl_penalty(log_prob: jax.Array, ref_log_prob: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    k1 / kl: log pi - log pi_ref; abs: its absolute value; k2 / mse: half its square;
    k3 / low_var_kl: exp(d) - d - 1 with d = log pi_ref - log pi clamped to [-20, 20], the result
    clamped to [-10, 10] (unbiased and non-negative, low variance; Schulman's k3).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}; valid: {list(KL_ESTIMATORS)}")
    diff = log_prob - ref_log_prob
    if estimator in ("k1", "kl"):
        return diff
    if estimator == "abs":
        return jnp.abs(diff)
    if estimator in ("k2", "mse"):
        return 0.5 * jnp.square(diff)
    d = jnp.clip(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)

"""The scaffold gap: how far the policy that sampled a response is from the one it is trained as.

RuscaRL samples y ~ pi(y | x, scaffold) and trains y as if it came from pi(y | x). Per response token,

    log r_t = log pi_old(y_t | x, y_<t) - log pi_rollout(y_t | x, scaffold, y_<t)

(old: recomputed on the training prompt before the update; rollout: the sampler's log-prob under the
scaffolded prompt at the sampling temperature), clamped to [-20, 20]. On rows sampled without a
scaffold it measures the sampler / trainer mismatch (numerics, dtype, top-k / top-p, overlap staleness).

`gap_metrics` reports it; the two corrections follow verl's rollout correction (algorithm.rollout_correction:
rollout_is='token' with rollout_is_threshold, rollout_rs='sequence' / 'geometric' with rollout_rs_threshold
and rollout_rs_threshold_lower defaulting to 1 / upper) and TRL's vLLM importance-sampling correction
(vllm_importance_sampling_cap; modes token_truncate / sequence_mask):

- token TIS: the policy-loss term of token t is multiplied by w_t = min(r_t, C), detached;
- sequence rejection (MIS): a row whose sequence ratio rho leaves [lower, upper] leaves the loss, with
  rho = exp(sum_t log r_t) ('sequence') or exp(mean_t log r_t) ('geometric', length-normalised).

Either applies to scaffolded rows only or to all rows (`rollout_correction_scope`); rows out of scope get
w = 1 and are never rejected. Both are off by default: the reference applies no correction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ruscarl_jax.rl.losses import LOG_RATIO_CLAMP
from ruscarl_jax.rl.settings import GRPOSettings


def token_log_ratio(old_log_probs: jax.Array, rollout_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """log pi_old - log pi_rollout per token [N, R], clamped, 0 where the mask is 0."""
    diff = jnp.clip(old_log_probs - rollout_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.where(mask > 0, diff, 0.0)


def sequence_log_ratio(log_ratio: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Per-row log of the sequence ratio: sum_t log r_t ('sequence') or its token mean ('geometric')."""
    total = jnp.sum(log_ratio * mask, axis=-1)
    if mode == "geometric":
        return total / jnp.maximum(mask.sum(axis=-1), 1.0)
    return total


def _in_scope(scaffolded: jax.Array, scope: str) -> jax.Array:
    return jnp.ones_like(scaffolded, bool) if scope == "all" else scaffolded > 0


def correction(old_log_probs: jax.Array, rollout_log_probs: jax.Array, mask: jax.Array, scaffolded: jax.Array,
               settings: GRPOSettings) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(token weights [N, R] for the policy loss, the loss mask with rejected rows removed, metrics).

    With both corrections off the weights are 1 and the mask is unchanged. Metrics count over the rows
    in scope that have response tokens: rollout_is_weight_mean, rollout_is_clipfrac (tokens whose ratio
    was truncated), rollout_rs_reject_frac (rows rejected).
    """
    mask = mask.astype(jnp.float32)
    scope = _in_scope(scaffolded, settings.rollout_correction_scope) & (mask.sum(axis=-1) > 0)
    scope_tokens = mask * scope[:, None]
    log_ratio = token_log_ratio(old_log_probs, rollout_log_probs, mask)
    weights = jnp.ones_like(mask)
    metrics: dict[str, jax.Array] = {}
    if settings.rollout_is == "token":
        ratio = jnp.exp(log_ratio)
        cap = settings.rollout_is_threshold
        weights = jnp.where(scope_tokens > 0, jnp.minimum(ratio, cap), 1.0)
        n = jnp.maximum(scope_tokens.sum(), 1.0)
        metrics["rollout_is_weight_mean"] = jnp.sum(weights * scope_tokens) / n
        metrics["rollout_is_clipfrac"] = jnp.sum((ratio > cap) * scope_tokens) / n
    if settings.rollout_rs != "none":
        lower, upper = settings.rs_bounds
        seq = sequence_log_ratio(log_ratio, mask, settings.rollout_rs)
        reject = scope & ((seq > jnp.log(upper)) | (seq < jnp.log(lower)))
        mask = mask * (~reject)[:, None]
        metrics["rollout_rs_reject_frac"] = reject.sum() / jnp.maximum(scope.sum(), 1.0)
    return jax.lax.stop_gradient(weights), mask, metrics


def gap_metrics(old_log_probs: jax.Array, rollout_log_probs: jax.Array, mask: jax.Array, scaffolded: jax.Array,
                thresholds: tuple[float, ...]) -> dict[str, jax.Array]:
    """The scaffold gap over a (global) batch, separately for scaffolded and unscaffolded rows.

    scaffold_gap/<rows>/: log_ratio_mean and abs_log_ratio_mean (token means), frac_abs_gt_<t> (tokens
    with |log r| > t), seq_log_ratio_mean (row mean of sum_t log r), seq_geo_ratio_mean (row mean of
    exp(mean_t log r)), rows. NaN when there are no such rows.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = token_log_ratio(old_log_probs, rollout_log_probs, mask)
    out: dict[str, jax.Array] = {}
    for name, rows in (("scaffolded", scaffolded > 0), ("unscaffolded", scaffolded <= 0)):
        m = mask * rows[:, None]
        has = m.sum(axis=-1) > 0
        tokens, nrows = m.sum(), has.sum().astype(jnp.float32)

        def mean(total, count):
            return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)

        prefix = f"scaffold_gap/{name}/"
        out[prefix + "log_ratio_mean"] = mean(jnp.sum(log_ratio * m), tokens)
        out[prefix + "abs_log_ratio_mean"] = mean(jnp.sum(jnp.abs(log_ratio) * m), tokens)
        for t in thresholds:
            out[prefix + f"frac_abs_gt_{t:g}"] = mean(jnp.sum((jnp.abs(log_ratio) > t) * m), tokens)
        seq = sequence_log_ratio(log_ratio, m, "sequence")
        geo = jnp.exp(sequence_log_ratio(log_ratio, m, "geometric"))
        out[prefix + "seq_log_ratio_mean"] = mean(jnp.sum(jnp.where(has, seq, 0.0)), nrows)
        out[prefix + "seq_geo_ratio_mean"] = mean(jnp.sum(jnp.where(has, geo, 0.0)), nrows)
        out[prefix + "rows"] = nrows
    return out

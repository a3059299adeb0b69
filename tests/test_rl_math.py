"""GRPO math (advantages, clipped policy loss, aggregation, KL estimators) against NumPy float64.

The references are written per group / per token / per row with explicit branches, independently of
the vectorised JAX code.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruscarl_jax.rl.advantages import group_advantages, token_advantages
from ruscarl_jax.rl.losses import aggregate, kl_penalty, normalizers, policy_loss
from ruscarl_jax.rl.settings import AGG_MODES, GRPOSettings

# ---------------------------------------------------------------- references (float64, loops)


def ref_advantages(rewards, group_ids, valid, norm_by_std=True, eps=1e-6):
    out = np.zeros(len(rewards))
    for g in set(group_ids[valid].tolist()):
        idx = [i for i in range(len(rewards)) if group_ids[i] == g and valid[i]]
        vals = np.array([rewards[i] for i in idx], np.float64)
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i, v in zip(idx, vals):
            out[i] = (v - mean) / (std + eps) if norm_by_std else v - mean
    return out


def ref_token_loss(logp, old, adv, lo, hi, c):
    """One token's loss, derived by cases: A >= 0 caps the ratio above; A < 0 caps it below, then dual clip."""
    r = math.exp(min(max(logp - old, -20.0), 20.0))
    if adv >= 0:
        return -adv * min(r, 1 + hi), (adv > 0 and r > 1 + hi), False
    loss = -adv * max(r, 1 - lo)
    dual = max(r, 1 - lo) > c
    return (-adv * c if dual else loss), r < 1 - lo, dual


def ref_aggregate(values, mask, mode):
    rows = [i for i in range(values.shape[0]) if mask[i].sum() > 0]
    tokens = mask.sum()
    if mode == "token-mean":
        return sum(values[i, t] for i in rows for t in range(values.shape[1]) if mask[i, t]) / max(tokens, 1)
    per_row = []
    for i in rows:
        s = sum(values[i, t] for t in range(values.shape[1]) if mask[i, t])
        if mode == "seq-mean-token-mean":
            s /= mask[i].sum()
        elif mode == "seq-mean-token-sum-norm":
            s /= values.shape[1]
        per_row.append(s)
    return sum(per_row) / max(len(per_row), 1)


def ref_kl(logp, ref, estimator):
    d = logp - ref
    if estimator in ("k1", "kl"):
        return d
    if estimator == "abs":
        return abs(d)
    if estimator in ("k2", "mse"):
        return 0.5 * d * d
    x = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1.0, -10.0), 10.0)


def random_case(seed, n=12, r=7):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (n, r))
    # log-ratios spread from tiny to far outside any clip range, including beyond the +-20 clamp
    spread = [-30.0, -3.0, -0.5, -0.1, 0.0, 0.05, 0.15, 0.4, 2.0, 25.0]
    log_ratio = rng.choice(spread, (n, r)) * rng.uniform(0.5, 1.5, (n, r))
    logp = old + log_ratio
    adv = rng.normal(0.0, 1.5, n)
    adv[0] = 0.0
    mask = (rng.random((n, r)) < 0.7).astype(np.float64)
    mask[1] = 0.0  # a fully masked row
    mask[2] = 1.0
    return logp, old, adv, mask


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_group_advantages_match_reference(norm_by_std):
    rng = np.random.default_rng(0)
    group_ids = np.array([5, 5, 5, 5, 9, 9, 9, 9, 2, 2, 2, 2, 7, 3, 3, 3])  # 7: a group of one
    rewards = rng.random(16)
    rewards[8:12] = 0.25  # all rewards equal in a group
    valid = np.ones(16, bool)
    valid[[4, 14]] = False  # one dropped row in group 9, two of group 3 remain
    valid[15] = False  # ... group 3 is then a group of one (row 13)
    perm = rng.permutation(16)  # groups need not be contiguous
    got = np.asarray(group_advantages(jnp.asarray(rewards[perm], jnp.float32), jnp.asarray(group_ids[perm]),
                                      jnp.asarray(valid[perm]), norm_by_std=norm_by_std))
    want = ref_advantages(rewards[perm], group_ids[perm], valid[perm], norm_by_std)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    inv = np.argsort(perm)
    assert np.all(got[inv][8:12] == 0.0)  # equal rewards: advantage exactly 0
    assert got[inv][12] == pytest.approx(rewards[12] / (1 + 1e-6) if norm_by_std else rewards[12], rel=1e-6)
    assert np.all(got[inv][[4, 14, 15]] == 0.0)  # invalid rows


def test_group_advantages_jit_and_token_broadcast():
    rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    ids = jnp.asarray([0, 0, 0, 0, 1, 1])
    adv = jax.jit(group_advantages)(rewards, ids)
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    expect = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(np.asarray(adv), [expect, -expect, -expect, expect, 0, 0], rtol=1e-5)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    tok = np.asarray(token_advantages(adv, mask))
    np.testing.assert_allclose(tok, np.asarray(adv)[:, None] * np.asarray(mask), rtol=1e-6)


# ---------------------------------------------------------------- policy loss and aggregation


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed,clips", [(1, (0.2, 0.2, 3.0)), (2, (0.2, 0.28, 3.0)), (3, (0.1, 0.3, 1.5))])
def test_policy_loss_matches_reference(mode, seed, clips):
    lo, hi, c = clips
    logp, old, adv, mask = random_case(seed)
    tok_adv = adv[:, None] * mask
    loss, metrics = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                                jnp.asarray(tok_adv, jnp.float32), jnp.asarray(mask), clip_ratio_low=lo,
                                clip_ratio_high=hi, clip_ratio_c=c, loss_agg_mode=mode)
    n, r = logp.shape
    cells = [[ref_token_loss(logp[i, t], old[i, t], tok_adv[i, t], lo, hi, c) for t in range(r)] for i in range(n)]
    per_token = np.array([[x[0] for x in row] for row in cells])
    clipped = np.array([[x[1] for x in row] for row in cells], np.float64)
    dual = np.array([[x[2] for x in row] for row in cells], np.float64)
    np.testing.assert_allclose(float(loss), ref_aggregate(per_token, mask, mode), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pg_clipfrac"]), ref_aggregate(clipped, mask, "token-mean"), atol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_clipfrac_lower"]), ref_aggregate(dual, mask, "token-mean"), atol=1e-6)
    kl = np.clip(logp - old, -20, 20)
    np.testing.assert_allclose(float(metrics["ppo_kl"]), ref_aggregate(-kl, mask, "token-mean"), rtol=1e-5)
    assert dual.sum() > 0 and clipped.sum() > 0  # the cases exercise both clips


def test_dual_clip_bounds_negative_advantage_loss():
    # A = -2, ratio e^3 ~ 20: PPO loss would be 40; the dual clip caps it at c * |A| = 6, with zero gradient
    f = lambda lp: policy_loss(lp, jnp.zeros((1, 1)), jnp.full((1, 1), -2.0), jnp.ones((1, 1)), clip_ratio_low=0.2,
                               clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean")[0]
    assert float(f(jnp.full((1, 1), 3.0))) == pytest.approx(6.0)
    assert float(jax.grad(f)(jnp.full((1, 1), 3.0))[0, 0]) == 0.0
    # inside the dual bound the gradient is -A * ratio
    assert float(jax.grad(f)(jnp.full((1, 1), 0.5))[0, 0]) == pytest.approx(2.0 * math.exp(0.5), rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_rows_contribute_nothing_and_no_nan(mode):
    logp, old, adv, mask = random_case(7)
    mask[3] = 0.0
    garbage = logp.copy()
    garbage[mask == 0] = np.nan  # whatever sits under the mask must not leak
    kwargs = dict(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode=mode)
    tok_adv = jnp.asarray(adv[:, None] * mask, jnp.float32)
    with_garbage, m = policy_loss(jnp.asarray(garbage, jnp.float32), jnp.asarray(old, jnp.float32), tok_adv,
                                  jnp.asarray(mask), **kwargs)
    keep = mask.sum(1) > 0
    without_rows, _ = policy_loss(jnp.asarray(logp[keep], jnp.float32), jnp.asarray(old[keep], jnp.float32),
                                  tok_adv[keep], jnp.asarray(mask[keep]), **kwargs)
    assert np.isfinite(float(with_garbage)) and all(np.isfinite(float(v)) for v in m.values())
    np.testing.assert_allclose(float(with_garbage), float(without_rows), rtol=1e-6)
    all_masked = aggregate(jnp.asarray(garbage), jnp.zeros(mask.shape), mode)
    assert float(all_masked) == 0.0
    # finite junk under the mask (what padding positions hold) gets exactly zero gradient
    junk = jnp.asarray(np.where(mask > 0, logp, 1e4), jnp.float32)
    old32, mask32 = jnp.asarray(old, jnp.float32), jnp.asarray(mask)
    grad = jax.grad(lambda lp: policy_loss(lp, old32, tok_adv, mask32, **kwargs)[0])(junk)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_is_additive_over_row_splits(mode):
    """With the whole batch's normalisers, the parts' losses sum to the whole's (what accumulation relies on)."""
    rng = np.random.default_rng(11)
    values = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((12, 6)) < 0.6, jnp.float32).at[4].set(0.0)
    norm = normalizers(mask)
    whole = aggregate(values, mask, mode)
    parts = sum(aggregate(values[i:i + 3], mask[i:i + 3], mode, norm) for i in range(0, 12, 3))
    np.testing.assert_allclose(float(parts), float(whole), rtol=1e-6)
    want = ref_aggregate(np.asarray(values, np.float64), np.asarray(mask), mode)
    np.testing.assert_allclose(float(whole), want, rtol=1e-5)


# ---------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("estimator", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"])
def test_kl_estimators_match_reference(estimator):
    rng = np.random.default_rng(5)
    logp = rng.normal(-3, 2, 64)
    ref = logp + rng.choice([-40.0, -15.0, -2.0, -0.3, 0.0, 0.2, 1.5, 12.0, 35.0], 64)  # beyond both clamps
    got = np.asarray(kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), estimator))
    want = np.array([ref_kl(a, b, estimator) for a, b in zip(logp, ref)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if estimator in ("k3", "low_var_kl"):
        assert got.max() == pytest.approx(10.0) and got.min() >= 0.0


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOSettings(loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOSettings(kl_estimator="k4")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        GRPOSettings(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="ppo_micro_batch_size"):
        GRPOSettings(ppo_mini_batch_size=10, ppo_micro_batch_size=4)
    with pytest.raises(ValueError, match="ppo_mini_batch_size=12"):
        GRPOSettings(ppo_mini_batch_size=12, ppo_micro_batch_size=4).check_batch_size(30)
    assert not GRPOSettings(kl_coef=0.0).kl_active and not GRPOSettings(use_kl_loss=False).kl_active

"""The scaffold gap (metrics, truncated IS, sequence rejection) and the group filters against NumPy float64.

References are written per row / per token with explicit loops, independently of the vectorised code.
The update tests build a batch whose scaffolded rows have a large gap and check that the corrected
GRPO step moves the parameters exactly as the formula says (plain SGD, one minibatch, one epoch).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rl_toy import FAST_COMPILE, TOY_POLICY, rollout_batch, toy_params

from ruscarl_jax.rl import rollout_correction
from ruscarl_jax.rl.group_filters import filter_rows
from ruscarl_jax.rl.logprobs import response_logprobs
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.rl.train_step import make_grpo_step

# ---------------------------------------------------------------- references (float64, loops)


def ref_gap(old, rollout, mask, scaffolded, thresholds):
    out = {}
    for name, want in (("scaffolded", True), ("unscaffolded", False)):
        toks, rows_seq, rows_geo = [], [], []
        for i in range(old.shape[0]):
            if bool(scaffolded[i] > 0) != want:
                continue
            lr = [min(max(float(old[i, t]) - float(rollout[i, t]), -20.0), 20.0)
                  for t in range(old.shape[1]) if mask[i, t] > 0]
            if lr:
                toks += lr
                rows_seq.append(sum(lr))
                rows_geo.append(math.exp(sum(lr) / len(lr)))
        p = f"scaffold_gap/{name}/"
        nan = float("nan")
        out[p + "log_ratio_mean"] = sum(toks) / len(toks) if toks else nan
        out[p + "abs_log_ratio_mean"] = sum(abs(x) for x in toks) / len(toks) if toks else nan
        for t in thresholds:
            out[p + f"frac_abs_gt_{t:g}"] = sum(abs(x) > t for x in toks) / len(toks) if toks else nan
        out[p + "seq_log_ratio_mean"] = sum(rows_seq) / len(rows_seq) if rows_seq else nan
        out[p + "seq_geo_ratio_mean"] = sum(rows_geo) / len(rows_geo) if rows_geo else nan
        out[p + "rows"] = float(len(rows_seq))
    return out


def ref_correction(old, rollout, mask, scaffolded, s: GRPOSettings):
    """(weights, mask) by the formulas: w = min(exp(old - rollout), C) on in-scope tokens; rows whose
    sequence ratio (sum or mean of log r) leaves [lower, upper] get mask 0."""
    n, r = old.shape
    weights = np.ones((n, r))
    out_mask = mask.astype(np.float64).copy()
    lower, upper = s.rs_bounds
    for i in range(n):
        in_scope = s.rollout_correction_scope == "all" or scaffolded[i] > 0
        tokens = [t for t in range(r) if mask[i, t] > 0]
        if not in_scope or not tokens:
            continue
        lr = {t: min(max(float(old[i, t]) - float(rollout[i, t]), -20.0), 20.0) for t in tokens}
        if s.rollout_is == "token":
            for t in tokens:
                weights[i, t] = min(math.exp(lr[t]), s.rollout_is_threshold)
        if s.rollout_rs != "none":
            total = sum(lr.values())
            log_rho = total if s.rollout_rs == "sequence" else total / len(tokens)
            if not math.log(lower) <= log_rho <= math.log(upper):
                out_mask[i, :] = 0.0
    return weights, out_mask


def gap_case(seed, n=12, r=6):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, r)) < 0.8).astype(np.float32)
    mask[0] = 0.0  # an empty row counts nowhere
    old = rng.normal(-2.0, 1.0, (n, r)).astype(np.float32)
    rollout = (old - rng.normal(0.0, 0.6, (n, r)) - 0.3 * (np.arange(n) % 2)[:, None]).astype(np.float32)
    rollout[3, 1] = old[3, 1] - 50.0  # beyond the clamp
    scaffolded = (np.arange(n) % 2).astype(np.float32)
    return old, rollout, mask, scaffolded


@pytest.mark.parametrize("seed", [0, 1])
def test_gap_metrics_match_reference(seed):
    old, rollout, mask, scaffolded = gap_case(seed)
    got = jax.jit(rollout_correction.gap_metrics, static_argnums=4)(old, rollout, mask, scaffolded, (0.1, 1.0))
    want = ref_gap(old, rollout, mask, scaffolded, (0.1, 1.0))
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, atol=2e-6, err_msg=k)
    # no scaffolded rows: their metrics are NaN, not 0
    none = rollout_correction.gap_metrics(old, rollout, mask, np.zeros_like(scaffolded), (0.5,))
    assert math.isnan(float(none["scaffold_gap/scaffolded/log_ratio_mean"]))
    assert float(none["scaffold_gap/scaffolded/rows"]) == 0


@pytest.mark.parametrize("is_mode,rs_mode,scope,lower", [
    ("token", "none", "scaffolded", None), ("token", "none", "all", None),
    ("none", "sequence", "scaffolded", None), ("none", "geometric", "all", None),
    ("token", "geometric", "scaffolded", 0.9), ("none", "none", "all", None)])
def test_corrections_match_reference(is_mode, rs_mode, scope, lower):
    old, rollout, mask, scaffolded = gap_case(2)
    s = GRPOSettings(rollout_is=is_mode, rollout_is_threshold=1.5, rollout_rs=rs_mode, rollout_rs_threshold=1.4,
                     rollout_rs_threshold_lower=lower, rollout_correction_scope=scope)
    weights, new_mask, metrics = rollout_correction.correction(old, rollout, jnp.asarray(mask), scaffolded, s)
    want_w, want_mask = ref_correction(old, rollout, mask, scaffolded, s)
    np.testing.assert_allclose(np.asarray(weights) * mask, want_w * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_mask), want_mask)
    if rs_mode != "none":  # the case must reject some rows and keep others, or it shows nothing
        rejected = (want_mask.sum(1) == 0) & (mask.sum(1) > 0)
        assert 0 < rejected.sum() < (mask.sum(1) > 0).sum()
        in_scope = (mask.sum(1) > 0) & ((scaffolded > 0) | (scope == "all"))
        assert float(metrics["rollout_rs_reject_frac"]) == pytest.approx(rejected.sum() / in_scope.sum())
    if is_mode == "token":
        assert (want_w < 1).any() and (want_w == 1.5).any()
        if scope == "scaffolded":
            assert (want_w[scaffolded == 0] == 1).all()


def ref_filters(mask, rewards, group_ids, valid, truncated, filter_zero_std, mask_truncated):
    keep = np.ones(len(rewards), bool)
    zero = np.zeros(len(rewards), bool)
    for g in set(group_ids.tolist()):
        idx = [i for i in range(len(rewards)) if group_ids[i] == g and valid[i]]
        if len(idx) >= 2 and np.std([float(rewards[i]) for i in idx], ddof=1) <= 1e-6:
            zero[idx] = True
    n_valid = max(valid.sum(), 1)
    if filter_zero_std:
        keep &= ~zero
    if mask_truncated:
        keep &= ~((truncated > 0) & valid)
    metrics = {"frac_reward_zero_std": zero.sum() / n_valid, "frac_truncated": ((truncated > 0) & valid).sum() / n_valid,
               "frac_rows_filtered": (valid & ~keep).sum() / n_valid}
    return mask * keep[:, None], metrics


@pytest.mark.parametrize("filter_zero_std,mask_truncated", [(False, False), (True, False), (False, True), (True, True)])
def test_group_filters_match_reference(filter_zero_std, mask_truncated):
    rng = np.random.default_rng(4)
    group_ids = np.repeat(np.arange(5), 4)
    rewards = rng.random(20).astype(np.float32)
    rewards[0:4] = 0.5  # zero variance
    rewards[8:12] = [1.0, 1.0, 1.0, 0.2]  # zero variance among its valid rows (row 11 invalid)
    valid = np.ones(20, bool)
    valid[11] = False
    valid[16:19] = False  # a group left with one valid row: not a GRPO group, never counted
    truncated = (rng.random(20) < 0.3).astype(np.float32)
    mask = (rng.random((20, 5)) < 0.9).astype(np.float32)
    got_mask, got = filter_rows(jnp.asarray(mask), rewards, group_ids, jnp.asarray(valid), truncated,
                                filter_zero_std=filter_zero_std, mask_truncated=mask_truncated)
    want_mask, want = ref_filters(mask, rewards, group_ids, valid, truncated, filter_zero_std, mask_truncated)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v), k
    assert want["frac_reward_zero_std"] == pytest.approx(7 / 16)


def test_settings_errors_name_the_field():
    for kwargs, field in [(dict(rollout_is="sequence"), "rollout_is"), (dict(rollout_rs="token"), "rollout_rs"),
                          (dict(rollout_correction_scope="some"), "rollout_correction_scope"),
                          (dict(rollout_is_threshold=1.0), "rollout_is_threshold"),
                          (dict(rollout_rs_threshold_lower=3.0), "rollout_rs_threshold_lower"),
                          (dict(gap_thresholds=()), "gap_thresholds")]:
        with pytest.raises(ValueError, match=field):
            GRPOSettings(**kwargs)
    assert GRPOSettings().rs_bounds == (0.5, 2.0) and not GRPOSettings().correction_active


# ---------------------------------------------------------------- the corrected update

LR = 0.5


def _update_case():
    """A batch whose scaffolded rows (every other one) were sampled far from the training-prompt policy."""
    batch = rollout_batch(7, groups=2, group_size=4, prompt=4, response=5, vocab=32)
    params = toy_params(jax.random.key(3), vocab=32, dim=16)
    old, _ = response_logprobs(TOY_POLICY.hidden(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])),
                               params["out"], jnp.asarray(batch["input_ids"]), 5, temperature=1.0, chunk_size=5)
    old = np.asarray(old, np.float64)
    rng = np.random.default_rng(7)
    n = batch["rewards"].shape[0]
    scaffolded = (np.arange(n) % 2 == 0).astype(np.float32)
    gap = np.where(scaffolded[:, None] > 0, rng.normal(0.0, 1.5, old.shape), rng.normal(0.0, 0.05, old.shape))
    batch.update(rollout_logprobs=((old - gap) * batch["response_mask"]).astype(np.float32), scaffolded=scaffolded,
                 truncated=np.zeros(n, np.float32))
    return batch, params, old


def _sgd_step(settings, batch, params):
    step = make_grpo_step(TOY_POLICY, settings, optax.sgd(LR), donate=False, compiler_options=FAST_COMPILE)
    new, _, metrics = step(params, optax.sgd(LR).init(params), batch, jax.random.key(0))
    return new, metrics


def _expected_params(batch, params, weights, loss_mask):
    """params - lr * grad of sum_t(-A_i w_t r_t m_t) / sum(m) at r = 1 (the first minibatch; KL and entropy off)."""
    rewards = batch["rewards"].astype(np.float64)
    adv = np.zeros_like(rewards)
    for g in set(batch["group_ids"].tolist()):
        idx = batch["group_ids"] == g
        adv[idx] = (rewards[idx] - rewards[idx].mean()) / (rewards[idx].std(ddof=1) + 1e-6)
    coef = jnp.asarray(-adv[:, None] * weights * loss_mask / loss_mask.sum(), jnp.float32)

    def loss(p):
        logp, _ = response_logprobs(TOY_POLICY.hidden(p, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])),
                                    p["out"], jnp.asarray(batch["input_ids"]), 5, temperature=1.0, chunk_size=5)
        return jnp.sum(coef * jnp.exp(logp - jax.lax.stop_gradient(logp)))

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


@pytest.mark.parametrize("mode", ["tis", "rs"])
def test_correction_changes_the_update_as_the_formula_says(mode):
    batch, params, old = _update_case()
    base = dict(ppo_mini_batch_size=8, ppo_micro_batch_size=4, use_kl_loss=False, entropy_coeff=0.0, shuffle=False,
                logprob_chunk_size=5)
    plain = GRPOSettings(**base)
    corrected = GRPOSettings(**base, rollout_is="token" if mode == "tis" else "none",
                             rollout_rs="geometric" if mode == "rs" else "none", rollout_is_threshold=2.0,
                             rollout_rs_threshold=2.0)
    mask = batch["response_mask"].astype(np.float64)
    weights, loss_mask = ref_correction(old, batch["rollout_logprobs"], mask, batch["scaffolded"], corrected)
    if mode == "tis":
        assert (weights[mask > 0] < 0.5).any() and (weights[mask > 0] == 2.0).any()
    else:
        assert 0 < (loss_mask.sum(1) == 0).sum() < 4  # some scaffolded rows rejected, not all

    got_plain, m_plain = _sgd_step(plain, batch, params)
    got, m = _sgd_step(corrected, batch, params)
    want = _expected_params(batch, params, weights, loss_mask)
    want_plain = _expected_params(batch, params, np.ones_like(weights), mask)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_plain), jax.tree.leaves(want_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    change = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(got_plain)))
    scale = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got_plain), jax.tree.leaves(params)))
    assert change > 0.05 * scale  # the correction moved the update, by what the formula says
    # the gap metrics report the large scaffolded gap and the small unscaffolded one
    assert float(m["scaffold_gap/scaffolded/abs_log_ratio_mean"]) > 0.8
    assert float(m["scaffold_gap/unscaffolded/abs_log_ratio_mean"]) < 0.1
    assert "rollout_is_weight_mean" not in m_plain and "rollout_rs_reject_frac" not in m_plain


def test_correction_without_rollout_logprobs_is_refused():
    batch, params, _ = _update_case()
    del batch["rollout_logprobs"]
    s = GRPOSettings(ppo_mini_batch_size=8, ppo_micro_batch_size=4, use_kl_loss=False, rollout_is="token")
    with pytest.raises(ValueError, match="rollout_logprobs"):
        _sgd_step(s, batch, params)


def test_config_errors_name_the_key(tmp_path):
    from configs import tiny
    from ruscarl_jax.trainer import config as config_lib

    bad_template = tmp_path / "grader.txt"
    bad_template.write_text("<<conversation>> <<criterion>>", encoding="utf-8")
    for section, key, value, message in [
        ("grpo", "rollout_rs", "token", "config.grpo.rollout_rs: .*valid"),
        ("grpo", "rollout_is_threshold", 0.5, "config.grpo.rollout_is_threshold: .*must be > 1"),
        ("grpo", "rollout_correction_scope", "most", "config.grpo.rollout_correction_scope"),
        ("judge", "template_path", str(bad_template), r"config.judge.template_path: .*grader.txt: unknown placeholder <<criterion>>"),
        ("judge", "regrade_fraction", 2.0, "config.judge.regrade_fraction"),
    ]:
        c = tiny.get_config()
        c[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(c, num_devices=1)
    c = tiny.get_config()
    c.trainer.wandb.mode = "cloud"
    with pytest.raises(config_lib.ConfigError, match="config.trainer.wandb.mode"):
        config_lib.validate(c, num_devices=1)
    settings = config_lib.validate(tiny.get_config(), num_devices=1)
    assert settings.grpo.rollout_is == "none" and settings.grpo.rollout_rs == "none"  # faithful default
    assert not settings.judge.batch_criteria and settings.judge.template_path is None
    assert config_lib.wandb_options(tiny.get_config()) is None

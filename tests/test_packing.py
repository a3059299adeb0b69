"""Packing (rl.packing): the log-prob pass and the update on packed token buffers give the unpacked
rows' log-probs, loss, gradients and metrics, in every aggregation mode, with KL, entropy and the scaffold gap."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_toy import FAST_COMPILE, TOY_POLICY, rollout_batch, toy_params

from ruscarl_jax.rl import packing
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.rl.train_step import make_grpo_step, make_reference


def toy_packed_hidden(params, tokens, segment_ids, positions):
    """toy_hidden on packed rows: the causal mean runs within each segment (0 = padding)."""
    real = (segment_ids > 0).astype(params["embed"].dtype)
    x = (params["embed"][tokens] + params["pos"][positions]) * real[..., None]
    t = tokens.shape[1]
    see = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))[None]
    see = see.astype(x.dtype) * real[:, None, :]
    mean = jnp.einsum("bts,bse->bte", see, x) / jnp.maximum(see.sum(-1), 1.0)[..., None]
    return jnp.tanh(mean @ params["mix"])


PACKED_TOY = dataclasses.replace(TOY_POLICY, packed=toy_packed_hidden)
SMOOTH_ADAM = OptimizerSettings(learning_rate=0.05, eps=1.0, weight_decay=0.01, max_grad_norm=10.0,
                                schedule="constant", total_steps=10)
BASE = GRPOSettings(ppo_mini_batch_size=8, ppo_micro_batch_size=4, ppo_epochs=2, kl_coef=0.01, entropy_coeff=0.01,
                    logprob_chunk_size=3, logprob_micro_batch_size=8)


def skewed_batch(seed, groups=4, group_size=4, prompt=6, response=10, vocab=32):
    """rollout_batch with long-tailed responses: most of 1-3 tokens, a quarter at the limit, and scaffold-gap
    inputs (rollout log-probs, scaffolded flags)."""
    batch = rollout_batch(seed, groups, group_size, prompt, response, vocab)
    rng = np.random.default_rng(seed)
    n = groups * group_size
    for i in range(n):
        length = response if i % 4 == 0 else int(rng.integers(1, 4))
        batch["response_mask"][i] = 0
        batch["response_mask"][i, :length] = 1
        batch["attention_mask"][i, prompt:] = 0
        batch["attention_mask"][i, prompt:prompt + length] = 1
        batch["input_ids"][i, prompt:] = np.where(batch["attention_mask"][i, prompt:] > 0,
                                                  rng.integers(1, vocab, response), 0)
    batch["rollout_logprobs"] = (-rng.random((n, response)) * 3).astype(np.float32)
    batch["scaffolded"] = (np.arange(n) % 2).astype(np.float32)
    batch["row_valid"][3] = 0
    return batch


def test_first_fit_decreasing_matches_numpy_and_packs_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 20, 40).astype(np.int32)
    buffer, offset = jax.jit(packing.first_fit, static_argnums=(1, 2))(jnp.asarray(lengths), 40, 24)
    free, want_b, want_o = [24] * 40, np.full(40, -1), np.zeros(40, int)
    for row in sorted(range(40), key=lambda r: -lengths[r]):  # stable, as argsort(-lengths, stable=True)
        if lengths[row] == 0:
            want_o[row] = 24 - free[0]
            continue
        b = next(i for i, f in enumerate(free) if f >= lengths[row])
        want_b[row], want_o[row] = b, 24 - free[b]
        free[b] -= lengths[row]
    np.testing.assert_array_equal(np.asarray(buffer), want_b)
    real = lengths > 0
    np.testing.assert_array_equal(np.asarray(offset)[real], want_o[real])
    assert (np.asarray(buffer)[real] >= 0).all()


def test_pack_places_each_span_with_its_segment_and_positions():
    batch = skewed_batch(1)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    lay = packing.layout(mask, jnp.ones(16, bool), 16, 16)
    tokens, seg, pos = (np.asarray(x) for x in packing.pack(ids, lay, 16, 16))
    for i in range(16):
        b, o, s, n = (int(np.asarray(x)[i]) for x in lay)
        np.testing.assert_array_equal(tokens[b, o:o + n], batch["input_ids"][i, s:s + n])
        assert (seg[b, o:o + n] == i + 1).all() and (pos[b, o:o + n] == np.arange(n)).all()
    assert (seg > 0).sum() == batch["attention_mask"].sum()
    assert (tokens[seg == 0] == 0).all()


def _steps(settings, policy, batch, params, seed=0):
    opt = make_optimizer(SMOOTH_ADAM)
    step = make_grpo_step(policy, settings, opt, donate=False, compiler_options=FAST_COMPILE)
    return step(params, opt.init(params), batch, jax.random.key(seed), make_reference(params, settings))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_packed_update_equals_unpacked(mode):
    """Two epochs of two minibatches: parameters, optimizer state and every metric (loss, KL, entropy,
    clip fractions, advantages, scaffold gap) agree; the packed micro-batches compute mostly real tokens."""
    batch = skewed_batch(2)
    params = toy_params(jax.random.key(1))
    plain = dataclasses.replace(BASE, loss_agg_mode=mode, kl_estimator="k3", filter_zero_std_groups=mode == "token-mean")
    packed = dataclasses.replace(plain, micro_token_budget=16, logprob_token_budget=32)
    p0, o0, m0 = _steps(plain, PACKED_TOY, batch, params)
    p1, o1, m1 = _steps(packed, PACKED_TOY, batch, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 (p0, o0), (p1, o1))
    frac = float(m1.pop("packed_token_fraction"))
    assert set(m0) == set(m1)
    for key in m0:
        np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m0[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0.5 < frac <= 1.0


def test_packed_log_probs_and_gradients_equal_unpacked_in_float64():
    """Old log-probs of the packed pass, and the minibatch gradient summed over packed micro-batches, against
    the unpacked ones, in float64."""
    from ruscarl_jax.rl import train_step as ts
    from ruscarl_jax.rl.accumulate import accumulate_gradients, split_rows
    from ruscarl_jax.rl.losses import normalizers

    with jax.enable_x64(True):
        batch = {k: jnp.asarray(v) for k, v in skewed_batch(3).items()}
        params = toy_params(jax.random.key(2), dtype=jnp.float64)
        settings = dataclasses.replace(BASE, micro_token_budget=20, entropy_coeff=0.1)
        lp_packed = ts.rollout_logprobs(params, batch, policy=PACKED_TOY, settings=settings)
        lp_plain = ts.rollout_logprobs(params, batch, policy=PACKED_TOY, settings=dataclasses.replace(settings, micro_token_budget=None))
        mask = np.asarray(batch["response_mask"]) > 0
        np.testing.assert_allclose(np.asarray(lp_packed)[mask], np.asarray(lp_plain)[mask], rtol=1e-12, atol=1e-12)
        rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "loss_mask": batch["response_mask"].astype(jnp.float64) * batch["row_valid"][:, None],
                "advantages": jnp.linspace(-1, 1, 16), "old_log_probs": lp_plain - 0.05,
                "ref_log_probs": lp_plain + 0.1}
        norm = normalizers(rows["loss_mask"])
        g_packed, s_packed, _ = ts._packed_gradients(params, None, rows, norm, policy=PACKED_TOY, settings=settings)
        loss = functools.partial(ts.grpo_loss, policy=PACKED_TOY, settings=settings)
        g_plain, s_plain = accumulate_gradients(lambda p, m: loss(p, m, norm), params, split_rows(rows, 4))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13),
                     (g_packed, s_packed), (g_plain, s_plain))


def test_packed_qwen_update_equals_unpacked():
    """The Qwen decoder (segment ids into attention, per-segment positions into RoPE): same old log-probs and
    update metrics packed and unpacked."""
    from ruscarl_jax.models import qwen
    from ruscarl_jax.rl.policy import qwen_policy

    cfg = qwen.QwenConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
    params = qwen.init_params(cfg, jax.random.key(0))
    policy = qwen_policy(cfg)
    batch = skewed_batch(4)
    plain = dataclasses.replace(BASE, ppo_epochs=1)
    p0, _, m0 = _steps(plain, policy, batch, params)
    p1, _, m1 = _steps(dataclasses.replace(plain, micro_token_budget=16), policy, batch, params)
    for key in ("loss", "pg_loss", "kl_loss", "entropy", "ppo_kl", "grad_norm", "rollout_gap_log_ratio_mean"):
        if key in m0:
            np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=2e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), p0, p1)


def test_bad_packing_inputs_are_named():
    batch = skewed_batch(5)
    params = toy_params(jax.random.key(1))
    with pytest.raises(ValueError, match="micro_token_budget=8 is below this batch's row width 16"):
        _steps(dataclasses.replace(BASE, micro_token_budget=8), PACKED_TOY, batch, params)
    holed = dict(batch, attention_mask=batch["attention_mask"].copy())
    holed["attention_mask"][2, 4] = 0
    holed["attention_mask"][2, :4] = 1
    with pytest.raises(ValueError, match="row 2 has gaps"):
        _steps(dataclasses.replace(BASE, micro_token_budget=16), PACKED_TOY, holed, params)
    with pytest.raises(ValueError, match="Policy.packed"):
        make_grpo_step(TOY_POLICY, dataclasses.replace(BASE, micro_token_budget=16), make_optimizer(SMOOTH_ADAM))
    with pytest.raises(ValueError, match="logprob_token_budget"):
        GRPOSettings(logprob_token_budget=64)


def test_config_budget_below_the_longest_row_and_moe_are_named():
    from configs import qwen7b, tiny, tiny_moe
    from ruscarl_jax.trainer.config import ConfigError, validate

    c = tiny.get_config()
    c.grpo.micro_token_budget = 8
    with pytest.raises(ConfigError, match=r"config.grpo.micro_token_budget: 8 tokens per packed buffer is below the longest row"):
        validate(c, num_devices=1, process_count=1, check_paths=False)
    c.grpo.micro_token_budget, c.grpo.logprob_token_budget = 4096, 9
    with pytest.raises(ConfigError, match="config.grpo.logprob_token_budget: 9 tokens"):
        validate(c, num_devices=1, process_count=1, check_paths=False)
    m = tiny_moe.get_config()
    m.grpo.micro_token_budget = 4096
    with pytest.raises(ConfigError, match="packing runs dense models"):
        validate(m, num_devices=2, process_count=1, check_paths=False)
    shipped = validate(qwen7b.get_config(), num_devices=32, process_count=1, check_paths=False)
    assert shipped.grpo.packed and shipped.grpo.micro_token_budget == 8192
    from configs import qwen3_30b_a3b

    assert not validate(qwen3_30b_a3b.get_config(), num_devices=64, process_count=1, check_paths=False).grpo.packed

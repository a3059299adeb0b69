"""The GRPO update step: gradient vs finite differences, accumulation, sharding, guards, learning.

Compiling a step dominates these tests on a CPU, so tests share steps (and their compilations)
through `toy_step`, keyed by the frozen settings.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_toy import FAST_COMPILE, TOY_POLICY, assert_directional_derivatives, rollout_batch, toy_hidden, toy_params

from ruscarl_jax.rl.logprobs import response_logprobs
from ruscarl_jax.rl.losses import normalizers
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer, make_schedule
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.rl.train_step import grpo_loss, make_grpo_step, make_reference

# A large AdamW eps makes the first update smooth in the gradient (with eps ~ 0 it is lr * sign(g),
# which float noise in near-zero gradient entries could flip); the comparisons below need that.
SMOOTH_ADAM = OptimizerSettings(learning_rate=0.05, eps=1.0, weight_decay=0.01, max_grad_norm=10.0,
                                schedule="warmup_cosine", warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
# 16 rows -> 2 minibatches of 8 -> micro-batches of 4, two epochs, KL and entropy terms on
BASE = GRPOSettings(ppo_mini_batch_size=8, ppo_micro_batch_size=4, ppo_epochs=2, kl_coef=0.01, entropy_coeff=0.01,
                    logprob_chunk_size=2, logprob_micro_batch_size=8)


@functools.lru_cache(maxsize=None)
def toy_step(settings: GRPOSettings, opt_settings: OptimizerSettings = SMOOTH_ADAM):
    opt = make_optimizer(opt_settings)
    return make_grpo_step(TOY_POLICY, settings, opt, donate=False, compiler_options=FAST_COMPILE), opt


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def max_change(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_step(settings, batch, params, seed=0, ref=None):
    step, opt = toy_step(settings)
    ref = make_reference(params, settings) if ref is None else ref
    return step(params, opt.init(params), batch, jax.random.key(seed), ref)


# ---------------------------------------------------------------- gradient


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_gradient_matches_finite_differences(mode):
    settings = GRPOSettings(loss_agg_mode=mode, kl_coef=0.05, kl_estimator="low_var_kl", entropy_coeff=0.01,
                            temperature=0.7, logprob_chunk_size=2)
    batch = rollout_batch(3, groups=2, group_size=3, prompt=3, response=4, vocab=11)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        params = toy_params(jax.random.key(1), vocab=11, dim=6, dtype=jnp.float64)
        mask = jnp.asarray(batch["response_mask"], jnp.float64)
        ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        logp, _ = response_logprobs(toy_hidden(params, ids, attn), params["out"], ids, 4, temperature=0.7)
        micro = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask,
                 "advantages": jnp.asarray(rng.normal(size=6)),
                 "old_log_probs": logp + jnp.asarray(rng.uniform(-0.4, 0.4, logp.shape)),  # some tokens clipped
                 "ref_log_probs": logp + jnp.asarray(rng.normal(0, 0.5, logp.shape))}
        def loss_fn(p):
            return grpo_loss(p, micro, normalizers(mask), policy=TOY_POLICY, settings=settings)[0]

        grads = jax.jit(jax.grad(loss_fn), compiler_options=FAST_COMPILE)(params)
        assert_directional_derivatives(jax.jit(loss_fn, compiler_options=FAST_COMPILE), params, grads)


# ---------------------------------------------------------------- accumulation and sharding


def test_micro_batches_give_the_same_update_as_one_batch():
    batch = rollout_batch(0)
    batch["row_valid"][5] = 0
    params = toy_params(jax.random.key(0))
    (p1, o1, m1), (p2, o2, m2) = [run_step(s, batch, params, seed=4)
                                  for s in (dataclasses.replace(BASE, ppo_micro_batch_size=8), BASE)]
    assert max_change(p1, params) > 1e-3  # four real updates happened
    assert_trees_close(p1, p2, rtol=1e-4, atol=2e-6)
    assert_trees_close(o1, o2, rtol=1e-4, atol=2e-6)
    for key in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "pg_clipfrac", "ppo_kl"):
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-4, atol=1e-6, err_msg=key)
    assert float(m1["num_updates"]) == 4 and float(m1["skipped_updates"]) == 0
    # the reported rate is the schedule's at the last of the four updates (counts 0..3)
    np.testing.assert_allclose(float(m1["lr"]), float(make_schedule(SMOOTH_ADAM)(3)), rtol=1e-6)
    assert abs(float(m1["ppo_kl"])) > 1e-6  # later minibatches have moved off ratio 1


def test_sharded_step_equals_single_device():
    from ruscarl_jax.models.qwen import QwenConfig, init_params, param_shardings
    from ruscarl_jax.models.sharding import batch_sharding, make_mesh
    from ruscarl_jax.rl.policy import qwen_policy

    assert jax.device_count() == 8
    cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=8, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    batch = rollout_batch(5, vocab=64)
    s = GRPOSettings(ppo_mini_batch_size=16, ppo_micro_batch_size=8, kl_coef=0.01, logprob_chunk_size=4)
    opt = make_optimizer(SMOOTH_ADAM)

    def run(policy, params, batch):
        step = make_grpo_step(policy, s, opt, donate=False, compiler_options=FAST_COMPILE)
        return step(params, opt.init(params), batch, jax.random.key(0), make_reference(params, s))

    p1, o1, m1 = run(qwen_policy(cfg), params, batch)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, param_shardings(cfg, mesh))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
    sbatch = {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}
    # one minibatch right after the old log-probs: the ratio is 1 and nothing is clipped
    assert abs(float(m1["ppo_kl"])) < 1e-6 and float(m1["pg_clipfrac"]) == 0.0
    p2, o2, m2 = run(qwen_policy(cfg, mesh), sharded, sbatch)
    for new, old in zip(jax.tree.leaves(p2), jax.tree.leaves(sharded)):  # the update keeps the parameter layout
        assert new.sharding.is_equivalent_to(old.sharding, new.ndim)
    assert max_change(p1, params) > 1e-3
    assert_trees_close(p1, p2, rtol=1e-4, atol=2e-6)
    for key in ("loss", "kl_loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-4, atol=1e-7, err_msg=key)


# ---------------------------------------------------------------- guards, reference, precision, batch checks


def test_non_finite_update_is_skipped_and_counted():
    batch = rollout_batch(2)
    batch["rewards"][:4] = np.nan  # one group's rewards, rows 0-3: the first minibatch only (no shuffle)
    s = dataclasses.replace(BASE, shuffle=False, ppo_epochs=1, kl_coef=0.0)
    params = toy_params(jax.random.key(3))
    step, opt = toy_step(s)
    ref = make_reference(params, s)
    assert ref is None  # no KL loss: no reference policy is kept
    new, state, m = step(params, opt.init(params), batch, jax.random.key(0), ref)
    assert float(m["skipped_updates"]) == 1 and float(m["num_updates"]) == 2 and "kl_loss" not in m
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))  # metrics of the applied update
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    assert int(state[1].count) == 1  # only the finite minibatch advanced the optimizer
    # the skipped update left no trace: the result equals running the second minibatch alone
    alone = {k: v[8:] for k, v in batch.items()}
    p_alone, _, _ = step(params, opt.init(params), alone, jax.random.key(0), ref)
    assert_trees_close(new, p_alone)
    batch["rewards"][:] = np.nan
    new, _, m = step(params, opt.init(params), batch, jax.random.key(0), ref)
    assert float(m["skipped_updates"]) == 2
    assert_trees_close(new, params, rtol=0, atol=0)


def test_reference_in_host_memory_gives_the_same_step():
    params = toy_params(jax.random.key(4))
    batch = rollout_batch(4)
    ref_host = make_reference(params, dataclasses.replace(BASE, ref_in_host_memory=True))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(ref_host)} == {"pinned_host"}
    ref_dev = make_reference(params, BASE)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(ref_dev)} == {"device"}
    # a reference that differs from the policy, so the KL term is not zero
    p1, _, m1 = run_step(BASE, batch, params, ref=jax.tree.map(lambda x: x * 1.1, ref_dev))
    p2, _, m2 = run_step(BASE, batch, params, ref=jax.tree.map(lambda x: x * 1.1, ref_host))
    assert float(m1["kl_loss"]) > 1e-4
    np.testing.assert_allclose(float(m1["kl_loss"]), float(m2["kl_loss"]), rtol=1e-6)
    assert_trees_close(p1, p2)
    step, opt = toy_step(BASE)
    with pytest.raises(ValueError, match="ref_params"):
        step(params, opt.init(params), batch, jax.random.key(0))


def test_bfloat16_compute_keeps_float32_master_weights():
    params = toy_params(jax.random.key(5))
    batch = rollout_batch(6)
    s32 = dataclasses.replace(BASE, ppo_micro_batch_size=8)
    p32, _, _ = run_step(s32, batch, params)
    p16, state16, _ = run_step(dataclasses.replace(s32, compute_dtype="bfloat16"), batch, params)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state16[1].inner_state[0].mu)} == {jnp.dtype(jnp.float32)}
    # the update is float32-precise in the weights even though the gradients came from bfloat16 compute
    update32 = jax.tree.map(lambda a, b: a - b, p32, params)
    update16 = jax.tree.map(lambda a, b: a - b, p16, params)
    cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(update32), jax.tree.leaves(update16)))
    cos /= np.sqrt(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(update32)) *
                   sum(float(jnp.vdot(b, b)) for b in jax.tree.leaves(update16)))
    assert cos > 0.95
    assert 1e-4 < max_change(p16, params) < 1.0


def test_bad_batches_are_rejected_with_the_key_named():
    params = toy_params(jax.random.key(6))
    s = BASE
    step, opt = toy_step(s)
    batch = rollout_batch(7)
    for key, value, msg in [("group_ids", None, "missing key.*group_ids"),
                            ("rewards", np.zeros(15, np.float32), "'rewards' has shape"),
                            ("response_mask", np.ones((16, 9), np.int32), "'response_mask' has shape"),
                            ("group_ids", np.zeros(16, np.float32), "'group_ids' must hold integers")]:
        bad = dict(batch)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        with pytest.raises(ValueError, match=msg):
            step(params, opt.init(params), bad, jax.random.key(0), make_reference(params, s))
    with pytest.raises(ValueError, match="ppo_mini_batch_size=8 must divide"):
        step(params, opt.init(params), {k: v[:12] for k, v in batch.items()}, jax.random.key(0),
             make_reference(params, s))


# ---------------------------------------------------------------- optimizer schedule


def test_schedules_and_reported_learning_rate():
    cos = OptimizerSettings(learning_rate=2e-3, schedule="warmup_cosine", warmup_steps=4, total_steps=20,
                            min_lr_ratio=0.1)
    sched = make_schedule(cos)
    for t in range(25):
        if t < 4:
            want = 2e-3 * t / 4
        else:
            frac = min(t - 4, 16) / 16
            want = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-9)
    const = make_schedule(OptimizerSettings(learning_rate=1e-3, warmup_steps=2))
    np.testing.assert_allclose([float(const(t)) for t in range(4)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerSettings(schedule="warmup_cosine", warmup_steps=5, total_steps=5)


# ---------------------------------------------------------------- learning


def test_policy_learns_a_bandit():
    """Reward 1 when the response contains TARGET: mean reward goes from ~0 to > 0.8 within 100 steps."""
    vocab, prompt_len, resp_len, target = 64, 2, 3, 7
    groups, group_size = 8, 8
    n = groups * group_size
    params = toy_params(jax.random.key(0), vocab=vocab, dim=16)
    s = GRPOSettings(ppo_mini_batch_size=32, ppo_micro_batch_size=16, kl_coef=0.001, temperature=1.0,
                     logprob_chunk_size=resp_len)
    opt = make_optimizer(OptimizerSettings(learning_rate=0.02, weight_decay=0.0))
    step = make_grpo_step(TOY_POLICY, s, opt, compiler_options=FAST_COMPILE)
    ref = make_reference(params, s)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def sample(params, key):
        k_prompt, k_tokens = jax.random.split(key)
        prompts = jax.random.randint(k_prompt, (groups, prompt_len), 8, vocab)  # never the target
        tokens = jnp.concatenate([jnp.repeat(prompts, group_size, 0), jnp.zeros((n, resp_len), jnp.int32)], 1)
        mask = jnp.concatenate([jnp.ones((n, prompt_len), jnp.int32), jnp.zeros((n, resp_len), jnp.int32)], 1)

        def one(carry, t):
            tokens, mask = carry
            h = jax.lax.dynamic_index_in_dim(toy_hidden(params, tokens, mask), prompt_len + t - 1, 1, keepdims=False)
            tok = jax.random.categorical(jax.random.fold_in(k_tokens, t), h @ params["out"] / s.temperature)
            return (tokens.at[:, prompt_len + t].set(tok), mask.at[:, prompt_len + t].set(1)), None

        (tokens, mask), _ = jax.lax.scan(one, (tokens, mask), jnp.arange(resp_len))
        return tokens, mask

    rewards_seen = []
    key = jax.random.key(42)
    for _ in range(100):
        key, k_sample, k_step = jax.random.split(key, 3)
        tokens, mask = sample(params, k_sample)
        rewards = np.asarray(jnp.any(tokens[:, prompt_len:] == target, axis=1), np.float32)
        rewards_seen.append(float(rewards.mean()))
        batch = {"input_ids": tokens, "attention_mask": mask, "response_mask": np.ones((n, resp_len), np.int32),
                 "rewards": rewards, "group_ids": np.repeat(np.arange(groups), group_size)}
        params, opt_state, metrics = step(params, opt_state, batch, k_step, ref)
        assert float(metrics["skipped_updates"]) == 0
        if len(rewards_seen) >= 5 and np.mean(rewards_seen[-5:]) > 0.9:
            break
    print(f"bandit: {len(rewards_seen)} steps, mean reward {rewards_seen[0]:.3f} -> {np.mean(rewards_seen[-5:]):.3f}")
    assert np.mean(rewards_seen[:3]) < 0.15, rewards_seen[:3]
    assert np.mean(rewards_seen[-5:]) > 0.8, rewards_seen

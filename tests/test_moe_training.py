"""Mixture-of-experts through the GRPO step and the trainer: gradients against finite differences,
router metrics and the load-balancing loss, routing replay, and configs/tiny_moe.py end to end."""
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_toy import FAST_COMPILE, assert_directional_derivatives, rollout_batch, toy_hidden, toy_params

from ruscarl_jax.models import moe
from ruscarl_jax.rl.logprobs import response_logprobs
from ruscarl_jax.rl.losses import normalizers
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
from ruscarl_jax.rl.policy import Policy
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.rl.train_step import grpo_loss, make_grpo_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
X, K, DIM, VOCAB = 4, 2, 6, 11


def _moe_cfg(dtype):
    return types.SimpleNamespace(dtype=dtype, num_experts_per_tok=K, norm_topk_prob=True)


def _moe_policy(dtype="float32"):
    """The toy causal policy with one sparse MoE block (models.moe) on top: a Policy with `routed`."""
    cfg = _moe_cfg(dtype)

    def routed(params, tokens, mask, forced):
        h = toy_hidden(params, tokens, mask)
        out, top, stats = moe.sparse_mlp(params["moe"], h, cfg, forced=None if forced is None else forced[:, 0],
                                         token_mask=mask)
        routing = moe.summarize(jax.tree.map(lambda x: x[None], stats), X)
        routing["experts"] = top[:, None]
        return h + out, routing

    return Policy(hidden=lambda p, t, m: routed(p, t, m, None)[0], unembed=lambda p: p["out"], routed=routed)


def _params(key, dtype=jnp.float32):
    params = toy_params(key, vocab=VOCAB, dim=DIM, dtype=dtype)
    k = jax.random.split(jax.random.fold_in(key, 7), 4)
    params["moe"] = {"router": jax.random.normal(k[0], (DIM, X), dtype) * 1.5,
                     "gate_proj": jax.random.normal(k[1], (X, DIM, 5), dtype) * 0.5,
                     "up_proj": jax.random.normal(k[2], (X, DIM, 5), dtype) * 0.5,
                     "down_proj": jax.random.normal(k[3], (X, 5, DIM), dtype) * 0.5}
    return params


def _rollout_experts(policy, params, batch):
    """The routing of the states that score the response (what the trainer records at rollout time)."""
    r = batch["response_mask"].shape[1]
    _, routing = policy.routed(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), None)
    return np.array(routing["experts"])[:, :, -r - 1:-1]


@pytest.mark.parametrize("replay", [False, True])
def test_moe_grpo_loss_gradient_matches_finite_differences(replay):
    settings = GRPOSettings(kl_coef=0.05, entropy_coeff=0.01, temperature=0.7, logprob_chunk_size=2,
                            router_aux_loss_coef=0.3, routing_replay=replay, ppo_mini_batch_size=6, ppo_micro_batch_size=6)
    batch = rollout_batch(3, groups=2, group_size=3, prompt=3, response=4, vocab=VOCAB)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        policy = _moe_policy("float64")
        params = _params(jax.random.key(1), jnp.float64)
        mask = jnp.asarray(batch["response_mask"], jnp.float64)
        ids, attn = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
        logp, _ = response_logprobs(policy.hidden(params, ids, attn), params["out"], ids, 4, temperature=0.7)
        recorded = _rollout_experts(policy, params, batch)
        recorded[::2] = (recorded[::2] + 1) % X  # half of the rows were routed elsewhere at rollout time
        micro = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "advantages": jnp.asarray(rng.normal(size=6)),
                 "old_log_probs": logp + jnp.asarray(rng.uniform(-0.4, 0.4, logp.shape)),
                 "ref_log_probs": logp + jnp.asarray(rng.normal(0, 0.5, logp.shape)), "rollout_experts": jnp.asarray(recorded)}

        def loss_fn(p):
            return grpo_loss(p, micro, normalizers(mask), policy=policy, settings=settings)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)(params)
        assert float(aux["load_balancing_loss"]) > 0 and 0 < float(aux["routing_mismatch"]) < 1
        assert float(jax.numpy.abs(grads["moe"]["router"]).max()) > 0  # the router learns (aux loss and weights)
        assert_directional_derivatives(jax.jit(lambda p: loss_fn(p)[0], compiler_options=FAST_COMPILE), params, grads)


def _step(settings):
    opt = make_optimizer(OptimizerSettings(learning_rate=0.05, max_grad_norm=10.0))
    return make_grpo_step(_moe_policy(), settings, opt, donate=False, compiler_options=FAST_COMPILE), opt


def test_routing_replay_in_the_step():
    batch = rollout_batch(5, groups=2, group_size=4, prompt=4, response=5, vocab=VOCAB)
    params = _params(jax.random.key(2))
    agree = _rollout_experts(_moe_policy(), params, batch)
    base = dict(ppo_mini_batch_size=8, ppo_micro_batch_size=4, kl_coef=0.0, shuffle=False)
    results = {}
    for replay in (False, True):
        step, opt = _step(GRPOSettings(routing_replay=replay, **base))
        for name, experts in (("agree", agree), ("differ", (agree + 1) % X)):
            new, _, m = step(params, opt.init(params), {**batch, "rollout_experts": experts}, jax.random.key(0))
            results[replay, name] = (new, {k: float(v) for k, v in m.items()})
    # rollout and update agree: replay changes nothing, and no token differs
    for a, b in zip(jax.tree.leaves(results[False, "agree"][0]), jax.tree.leaves(results[True, "agree"][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert results[False, "agree"][1]["routing_mismatch"] == 0.0 == results[True, "agree"][1]["routing_mismatch"]
    # they differ: the metric says so (replay or not), and replay really runs the recorded experts
    assert results[False, "differ"][1]["routing_mismatch"] == pytest.approx(1.0)
    assert results[True, "differ"][1]["routing_mismatch"] == pytest.approx(1.0)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[True, "differ"][0]),
                                                          jax.tree.leaves(results[True, "agree"][0])))
    assert gap > 1e-4
    for a, b in zip(jax.tree.leaves(results[False, "differ"][0]), jax.tree.leaves(results[False, "agree"][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)  # no replay: recorded unused
    for key in ("load_balancing_loss", "expert_load_max_over_mean", "router_entropy"):
        assert np.isfinite(results[True, "agree"][1][key])
    assert results[True, "agree"][1]["expert_load_max_over_mean"] >= 1.0


def test_replay_needs_a_moe_policy():
    from rl_toy import TOY_POLICY
    with pytest.raises(ValueError, match="routing_replay=True needs a mixture-of-experts policy"):
        make_grpo_step(TOY_POLICY, GRPOSettings(routing_replay=True), make_optimizer(OptimizerSettings(learning_rate=0.1)))


# ------------------------------------------------------------------------------------------ trainer

FAST = ["--config.data.batch_size=4", "--config.rollout.num_generations=2", "--config.rollout.max_new_tokens=6",
        "--config.grpo.ppo_mini_batch_size=8", "--config.grpo.ppo_micro_batch_size=4",
        "--config.trainer.checkpoint_every=2", "--config.trainer.test_freq=0", "--config.data.val_examples=0",
        "--config.trainer.tensorboard=False", "--config.trainer.compilation_cache_dir=",
        "--config.warm_start.path="]  # the paper-size MoE configs start from a checkpoint, not the tiny warm start


def _train(workdir, *flags, devices=4, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_backend_optimization_level=0 --xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config=configs/tiny_moe.py",
                           f"--workdir={workdir}", *FAST, *flags], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_tiny_moe_trains_end_to_end(tmp_path):
    proc = _train(tmp_path, "--config.trainer.total_steps=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("routing_mismatch", "load_balancing_loss", "expert_load_max_over_mean", "router_entropy", "grad_norm"):
            assert np.isfinite(r[key]), key
        assert 0.0 <= r["routing_mismatch"] <= 1.0 and r["expert_load_max_over_mean"] >= 1.0
    # the first step's rollout routing comes from the sampling params, scaffolded prompts included
    assert rows[0]["router_entropy"] > 0 and rows[0]["skipped_updates"] == 0
    assert (tmp_path / "checkpoints").exists()


def test_expert_axis_that_does_not_divide_is_a_config_error(tmp_path):
    proc = _train(tmp_path, "--config.trainer.total_steps=1", "--config.model.tiny.num_experts=3",
                  "--config.model.tiny.num_experts_per_tok=2", timeout=300)
    assert proc.returncode != 0
    assert "config.mesh.expert: the mesh's expert axis (2) does not divide num_experts (3)" in proc.stderr


def _qwen3_30b_config(tmp_path, num_experts):
    from configs import qwen3_30b_a3b

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": num_experts}))
    c = qwen3_30b_a3b.get_config()
    c.model.checkpoint_dir = str(tmp_path)
    c.data.train_path = "data/tiny/train.jsonl"
    return c


def test_qwen3_30b_a3b_config_validates_on_an_expert_mesh(tmp_path):
    from ruscarl_jax.trainer import config as config_lib

    c = _qwen3_30b_config(tmp_path, 128)
    assert c.mesh.expert == 8 and c.grpo.router_aux_loss_coef == 0.0
    config_lib.validate(c, num_devices=32)  # expert 8 x fsdp 4; no "MoE is not supported" any more
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.expert: the mesh's expert axis \(8\) does not "
                                                     r"divide num_experts \(12\) \(model\.checkpoint_dir\)"):
        config_lib.validate(_qwen3_30b_config(tmp_path, 12), num_devices=32)


def test_rows_must_divide_the_batch_rule_axes(tmp_path):
    from ruscarl_jax.trainer import config as config_lib

    c = _qwen3_30b_config(tmp_path, 128)  # batch over data x fsdp x expert = 1 x 4 x 8 on 32 devices
    c.data.batch_size, c.grpo.ppo_mini_batch_size, c.grpo.ppo_micro_batch_size = 2, 16, 8
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.batch_size: 2 prompts x 8 generations = 16 rows \(the global "
                                                     r"batch\), which do not divide across the 32 data-parallel "
                                                     r"devices \(mesh data x fsdp x expert"):
        config_lib.validate(c, num_devices=32)


# ------------------------------------------------------------------------------------------ routing pass

def _tiny_moe():
    from ruscarl_jax.models import qwen

    cfg = qwen.QwenConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1,
                          head_dim=8, qkv_bias=False, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=8, mlp_only_layers=(1,))
    return cfg, qwen.init_params(cfg, jax.random.key(0))


def test_routing_pass_in_micro_batches_equals_one_full_forward():
    """rl.routing.routing_pass cuts the rows into log-prob-sized micro-batches inside one program; its
    routing of the response-scoring positions equals one forward over all rows at once."""
    from ruscarl_jax.models import qwen
    from ruscarl_jax.rl.policy import qwen_policy
    from ruscarl_jax.rl.routing import experts_shape, make_routing_pass

    cfg, params = _tiny_moe()
    rows, prompt, response = 6, 5, 4
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, 50, (rows, prompt + response)), jnp.int32)
    mask = np.ones((rows, prompt + response), np.int32)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, -2:] = 0  # a response that stopped early
    mask = jnp.asarray(mask)
    experts = make_routing_pass(qwen_policy(cfg), GRPOSettings(logprob_micro_batch_size=2))(
        params, tokens, mask, response_len=response)
    assert experts.shape == experts_shape(cfg, rows, response) == (rows, 3, response, 2)
    full = qwen.forward_routed(params, cfg, tokens, mask)[1]["experts"][:, :, prompt - 1: prompt + response - 1]
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(full))


def _metrics_of(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_no_routing_pass_without_replay_or_the_mismatch_metric(tmp_path):
    """The routing pass costs a forward over the rollout: a MoE run with neither routing replay nor
    grpo.routing_mismatch_metric runs none and logs no routing_mismatch (not a made-up value)."""
    off, metric = tmp_path / "off", tmp_path / "metric"
    proc = _train(off, "--config.trainer.total_steps=1", "--config.grpo.routing_replay=False")
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = _metrics_of(off)[0]
    assert "routing_mismatch" not in row and np.isfinite(row["router_entropy"])
    proc = _train(metric, "--config.trainer.total_steps=1", "--config.grpo.routing_replay=False",
                  "--config.grpo.routing_mismatch_metric=True")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 0.0 <= _metrics_of(metric)[0]["routing_mismatch"] <= 1.0


def test_moe_overlap_resume_keeps_the_pending_rollouts_routing_and_time(tmp_path):
    """An overlap checkpoint holds the pending rollout's routing and sampling time: the resumed step
    replays the same experts (same routing_mismatch, same parameters) and reports the same rollout
    time, not tokens / 1e-9."""
    import shutil

    from run_utils import checkpoint_params

    flags = ["--config.trainer.total_steps=3", "--config.trainer.overlap_judge=True", "--config.trainer.checkpoint_every=1",
             "--config.trainer.keep_checkpoints=10", "--config.optim.learning_rate=0.03", "--config.grpo.entropy_coeff=0.01"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = _train(full, *flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shutil.copytree(full, resumed)
    for step in (2, 3):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    proc = _train(resumed, *flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after = {r["step"]: r for r in _metrics_of(full)}, {r["step"]: r for r in _metrics_of(resumed)}
    assert sorted(after) == [1, 2, 3]
    for step in (2, 3):
        for key in ("routing_mismatch", "reward_mean", "grad_norm", "pg_loss", "router_entropy"):
            assert key in after[step], (step, key)
            assert after[step][key] == pytest.approx(before[step][key], abs=1e-6), (step, key)
    # step 2 trained on the rollout saved with checkpoint 1: its sampling time travelled with it
    assert after[2]["rollout_seconds"] == pytest.approx(before[2]["rollout_seconds"], rel=1e-5)
    assert after[2]["tokens_per_second"] == pytest.approx(before[2]["tokens_per_second"], rel=1e-4)
    assert after[2]["tokens_per_second"] < 1e7
    final = checkpoint_params(full, 3)
    for key, value in checkpoint_params(resumed, 3).items():
        np.testing.assert_allclose(value, final[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("replay", [True, False])
def test_memory_plan_compiles_the_routing_pass_when_the_run_records_routing(replay):
    """The memory plan lowers the same routing pass the trainer runs (rl.routing.make_routing_pass), and
    only when the run records routing."""
    from configs import tiny_moe
    from ruscarl_jax.plan.memory_plan import custom_slice
    from ruscarl_jax.plan.step_memory import plan_config

    c = tiny_moe.get_config()
    c.grpo.routing_replay = replay
    plan = plan_config(c, custom_slice(8, 16.0))
    names = [p.name for p in plan.programs]
    assert ("rollout routing" in names) == replay, names
    if replay:
        routing = plan.programs[names.index("rollout routing")]
        logprobs = plan.programs[names.index("log-probs")]
        # the same rows per micro-batch as the log-prob pass: no bigger than it (it also holds logits)
        assert 0 < routing.peak <= logprobs.peak

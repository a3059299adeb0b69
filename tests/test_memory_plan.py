"""The memory planner: slices, the compiled plan of the tiny config on 8 emulated devices against the
analytic estimate, the verdict and advice, the optimizer state's sharding, and scripts/plan.py."""
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import qwen7b, tiny
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import make_mesh
from ruscarl_jax.rl.optimizer import OptimizerSettings, init_opt_state, make_optimizer
from ruscarl_jax.trainer.config import ConfigError
from ruscarl_jax.plan.memory_plan import GiB, custom_slice, parse_slice, per_device_bytes
from ruscarl_jax.plan.step_memory import model_config, plan_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 0.30  # the analytic peak of each program is within 30% of the compiled one (stated in docs/memory_plan.md)


def _config(remat="none"):
    """The tiny config, scaled so that parameters, optimizer state, KV cache and activations all count."""
    c = tiny.get_config()
    c.model.remat = remat
    c.model.tiny.update(dict(hidden_size=256, intermediate_size=1024, num_layers=4, vocab_size=8192))
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.data.update(dict(batch_size=16, max_prompt_length=512))
    c.rollout.max_new_tokens = 128
    c.grpo.update(dict(ppo_micro_batch_size=8, ppo_mini_batch_size=32))
    return c


def test_named_slices():
    v5p = parse_slice("v5p-64")  # 64 TensorCores = 32 chips of 95 GiB, 4 per host
    assert (v5p.devices, v5p.hbm_bytes, v5p.hosts) == (32, 95 * GiB, 8)
    assert (parse_slice("v5e-8").devices, parse_slice("v5e-8").hosts) == (8, 1)
    assert parse_slice("v6e-16").hosts == 4 and parse_slice("v4-8").devices == 4
    assert (parse_slice("h100-16").devices, parse_slice("h100-16").hosts) == (16, 2)
    assert parse_slice("h100-8").hbm_bytes == 80 * GiB
    with pytest.raises(ValueError, match="known families: v4-N, v5e-N, v5p-N, v6e-N, h100-N, h200-N"):
        parse_slice("tpu9-8")
    with pytest.raises(ValueError, match="TensorCores"):
        parse_slice("v5p-63")
    with pytest.raises(ValueError, match="positive"):
        custom_slice(0, 80)


def test_optimizer_state_is_sharded_like_the_parameters():
    cfg = qwen.QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16)
    mesh = make_mesh({"fsdp": -1})
    params = qwen.init_params_sharded(cfg, jax.random.key(0), mesh)
    state = init_opt_state(make_optimizer(OptimizerSettings(learning_rate=1e-3)), params)
    by_shape = {x.shape: x.sharding.spec for x in jax.tree.leaves(params)}
    moments = [x for x in jax.tree.leaves(state) if x.ndim >= 1]
    assert len(moments) == 2 * len(jax.tree.leaves(params))  # Adam's mu and nu
    assert all(x.sharding.spec == by_shape[x.shape] for x in moments)
    # each device holds a share of the moments, not two whole float32 copies of the model
    assert per_device_bytes(state) <= 2 * per_device_bytes(params) + 1024
    assert per_device_bytes(params) < sum(x.nbytes for x in jax.tree.leaves(params)) / 4


SCALED = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.tiny.hidden_size=256", "--config.model.tiny.intermediate_size=1024",
          "--config.model.tiny.num_layers=4", "--config.model.tiny.vocab_size=8192", "--config.data.batch_size=16",
          "--config.data.max_prompt_length=512", "--config.rollout.max_new_tokens=128",
          "--config.grpo.ppo_micro_batch_size=8", "--config.grpo.ppo_mini_batch_size=32"]


def _plan_script(tmp_path, *args, flags="--xla_force_host_platform_device_count=8"):
    """scripts/plan.py in a fresh process, at XLA's default optimisation level (the suite compiles at level 0,
    whose buffer assignment keeps more temporaries); (completed process, plan JSON or None)."""
    out_json = tmp_path / "plan.json"
    env = {**__import__("os").environ, "XLA_FLAGS": flags}
    out = subprocess.run([sys.executable, "scripts/plan.py", *args, f"--json={out_json}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    return out, (json.loads(out_json.read_text()) if out_json.exists() else None)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_compiled_peak_agrees_with_the_analytic_estimate(tmp_path, remat):
    out, plan = _plan_script(tmp_path, "--slice=v5e-8", "--backend=cpu", *SCALED, f"--config.model.remat={remat}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p["name"] for p in plan["programs"]] == ["rollout prefill", "rollout decode", "log-probs", "GRPO update"]
    assert plan["backend"].startswith("emulated CPU devices (--backend=cpu")
    config = _config(remat)
    cfg = model_config(config)
    terms = plan["analytic_terms"]
    # the parameters per device: the model's float32 bytes split over 8 fsdp devices (norm scales replicated)
    assert terms["params"] == pytest.approx(cfg.num_params * 4 / 8, rel=0.02)
    assert terms["optimizer state"] == pytest.approx(2 * terms["params"], rel=0.01)
    for p in plan["programs"]:
        assert p["peak"] > 0 and p["analytic"] > 0
        if p["name"] != "rollout decode":  # XLA keeps copies of the paged cache in the decode loop (docs/memory_plan.md)
            assert abs(p["peak"] - p["analytic"]) <= TOLERANCE * p["peak"], (p["name"], p["peak"], p["analytic"])
    analytic_peak = max(p["analytic"] for p in plan["programs"])
    assert abs(plan["peak_bytes"] - analytic_peak) <= TOLERANCE * plan["peak_bytes"]
    update = plan["programs"][-1]
    assert update["aliased"] >= terms["params"] + terms["optimizer state"] - 1024  # params and state are donated
    assert plan["fits"] and out.stdout.strip().splitlines()[-1] == plan["verdict"]
    assert plan["verdict"].startswith("fits: yes (peak ") and plan["verdict"].endswith(" of 16.0 GiB per device)")


def test_an_oversized_config_does_not_fit_and_names_keys():
    plan = plan_config(_config(), custom_slice(8, 0.2))
    assert not plan.fits
    assert plan.verdict() == f"fits: no (peak {plan.peak.peak / GiB:.1f} GiB of 0.2 GiB per device)"
    text = plan.report()
    drives = {"rollout prefill": "rollout.engine.slots", "rollout decode": "rollout.engine.memory_gb",
              "log-probs": "grpo.logprob_micro_batch_size", "GRPO update": "grpo.ppo_micro_batch_size"}
    assert "to fit:" in text and drives[plan.peak.name] in text and f"the peak is in '{plan.peak.name}'" in text


def test_paper_config_architecture_from_its_preset():
    cfg = model_config(qwen7b.get_config())
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size) == (3584, 28, 4, 152064)
    assert 7.0e9 < cfg.num_params < 7.7e9
    config = qwen7b.get_config()
    config.model.checkpoint_dir, config.model.preset = "", "Qwen9-1T"
    with pytest.raises(ConfigError, match=r"config\.model\.preset: .*known: Qwen2\.5-0\.5B-Instruct"):
        model_config(config)


def test_plan_script_errors_and_plan_only(tmp_path):
    bad, _ = _plan_script(tmp_path, "--slice=v9-8")
    assert bad.returncode == 2 and "known families" in bad.stderr
    bad, _ = _plan_script(tmp_path, "--slice=v5e-8", "--config.data.batch_size=0")
    assert bad.returncode == 2 and "config.data.batch_size" in bad.stderr

    from ruscarl_jax.trainer.loop import train

    config = tiny.get_config()
    config.trainer.plan_only = True
    result = train(config, tmp_path / "run")
    assert result["fits"] and result["peak_bytes"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written
    assert math.isfinite(np.float64(result["peak_bytes"]))


def _prefill_row(text):
    return next(line for line in text.splitlines() if line.startswith("rollout prefill "))


def test_plan_only_on_two_processes_plans_every_slot(tmp_path):
    """trainer.plan_only on two processes (2 devices each, loopback) plans the job's global step: the same
    per-device figures as one process with all 4 devices (each process planning only its own share of
    the slots would halve the rollout's)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--config.trainer.plan_only=True", "--config.warm_start.path=", "--config.trainer.compilation_cache_dir=",
             "--config.data.batch_size=8", "--config.rollout.num_generations=2", "--config.grpo.ppo_mini_batch_size=16",
             "--config.grpo.ppo_micro_batch_size=8"]
    train = [sys.executable, "scripts/train.py"]

    def env(devices):
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}

    procs = [subprocess.Popen(train + [f"--workdir={tmp_path / 'pair'}", *flags,
                                       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                                       "--config.distributed.cpu_collectives=gloo"],
                              cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    single = subprocess.run(train + [f"--workdir={tmp_path / 'single'}", *flags], cwd=ROOT, env=env(4),
                            capture_output=True, text=True, timeout=900)
    outs = [p.communicate(timeout=900) for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    assert _prefill_row(outs[0][0]) == _prefill_row(single.stdout)


def test_gpu_slices_stay_emulated_and_say_so():
    from ruscarl_jax.plan.step_memory import _target_mesh

    config = tiny.get_config()
    mesh, backend = _target_mesh(config, parse_slice("h100-8"), None, "auto")
    assert {d.platform for d in mesh.devices.flat} == {"cpu"} and mesh.devices.size == 8
    assert backend.startswith("emulated CPU devices (GPU slices cannot be cross-compiled")
    mesh, backend = _target_mesh(config, parse_slice("v5e-8"), None, "cpu")
    assert {d.platform for d in mesh.devices.flat} == {"cpu"} and "--backend=cpu" in backend

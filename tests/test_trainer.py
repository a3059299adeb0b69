"""The trainer end to end on the tiny config, run as the user runs it: scripts/train.py in a subprocess.

Covers: every metric key is written and finite; rollout records are complete; exact resume after a
SIGKILL; SIGTERM leaves a checkpoint that resumes; config errors name their key.
"""
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_utils import checkpoint_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
# Small and quick: 2 steps of 4 prompts x 2 samples, one update per step.
FAST = ["--config.data.batch_size=4", "--config.rollout.num_generations=2", "--config.rollout.max_new_tokens=6",
        "--config.grpo.ppo_mini_batch_size=8", "--config.grpo.ppo_micro_batch_size=4",
        "--config.trainer.checkpoint_every=1", "--config.trainer.test_freq=2", "--config.data.val_examples=4",
        "--config.model.tiny.num_layers=1", "--config.trainer.tensorboard=False",
        "--config.trainer.compilation_cache_dir=",  # "" = the session cache that conftest.py sets up
        "--config.warm_start.path="]  # from the random model: no SFT warm start to build
REQUIRED_KEYS = ["step", "reward_mean", "reward_std", "reward_scaffolded_mean", "reward_unscaffolded_mean",
                 "reveal_ratio_mean", "shown_criteria_mean", "scaffolded_fraction", "response_length_mean", "kl", "entropy", "pg_clipfrac", "grad_norm",
                 "judge_ungraded", "rollout_seconds", "judge_seconds", "update_seconds", "tokens_per_second",
                 # scaffold gap, group filters and judge telemetry (issue 15)
                 "scaffold_gap/scaffolded/log_ratio_mean", "scaffold_gap/scaffolded/abs_log_ratio_mean",
                 "scaffold_gap/scaffolded/frac_abs_gt_0.1", "scaffold_gap/scaffolded/frac_abs_gt_1",
                 "scaffold_gap/scaffolded/seq_log_ratio_mean", "scaffold_gap/scaffolded/seq_geo_ratio_mean",
                 "scaffold_gap/unscaffolded/log_ratio_mean", "scaffold_gap/unscaffolded/abs_log_ratio_mean",
                 "scaffold_gap/unscaffolded/seq_log_ratio_mean", "scaffold_gap/unscaffolded/rows",
                 "frac_reward_zero_std", "frac_truncated", "frac_rows_filtered",
                 "judge/requests", "judge/retries", "judge/parse_failures", "judge/parse_failure_rate",
                 "judge/ungraded", "judge/latency_p50_s", "judge/latency_p99_s", "judge/regrade_agreement",
                 "judge/met_rate/axis_completeness"]
# NaN (written "nan") when a step has no such rows / no LLM verdicts (the tiny task is rule-verified);
# scaffolded rows are those shown at least one criterion, and late steps of the decayed schedule have none
MAY_BE_NAN = ("reward_scaffolded_mean", "reward_unscaffolded_mean", "judge/latency_p50_s", "judge/latency_p99_s",
              "judge/regrade_agreement", *(k for k in REQUIRED_KEYS if k.startswith("scaffold_gap/scaffolded/")))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one CPU device; quick compiles
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(workdir, *flags, steps=2, check=True, timeout=600):
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", f"--config.trainer.total_steps={steps}", *FAST, *flags],
                          capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"train.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_params(workdir):
    return checkpoint_params(workdir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    _run(workdir, steps=3)
    return workdir


def test_metrics_and_rollout_records(reference_run):
    rows = _metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in REQUIRED_KEYS:
            assert key in row, f"metrics.jsonl step {row['step']} lacks {key}"
            if key not in MAY_BE_NAN:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row[key])
        # rule-only rubrics: no judge requests
        assert row["judge/requests"] == 0 and row["judge/met_rate/axis_completeness"] <= 1
    assert "val/score" in rows[1] and 0.0 <= rows[1]["val/score"] <= 1.0
    for step in (1, 2, 3):
        records = [json.loads(line) for line in (reference_run / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(records) == 4 * 2
        for rec in records:
            assert {"example_id", "sample_index", "ratio", "shown_indices", "response", "verdicts", "reward"} <= set(rec)
            assert len(rec["verdicts"]) == 4 and all(v["met"] in (True, False) for v in rec["verdicts"])
            if rec["ratio"] > 0:
                for i in rec["shown_indices"]:
                    assert 0 <= i < 4
        # sample 0 of each group sees the most criteria, the last sees none
        by_example = {}
        for rec in records:
            by_example.setdefault(rec["example_id"], {})[rec["sample_index"]] = rec
        for group in by_example.values():
            assert group[0]["ratio"] >= group[1]["ratio"] == 0.0
            assert group[1]["system_message"] is None  # add_base_when_zero=False (tiny default): nothing added
        # "scaffolded" = shown at least one criterion (a small ratio > 0 shows none), counted from the records
        shown = np.asarray([len(rec["shown_indices"]) for rec in records])
        row = rows[step - 1]
        assert row["scaffolded_fraction"] == pytest.approx(np.mean(shown > 0))
        assert row["shown_criteria_mean"] == pytest.approx(np.mean(shown))
        assert row["scaffold_gap/unscaffolded/rows"] == np.sum(shown == 0)
        if (shown > 0).any():  # the scaffold changes the sampling distribution: a visible gap
            assert row["scaffold_gap/scaffolded/abs_log_ratio_mean"] > 0
        else:
            assert row["scaffold_gap/scaffolded/abs_log_ratio_mean"] == "nan" and row["reward_scaffolded_mean"] == "nan"
    assert [r["scaffolded_fraction"] for r in rows] == [0.5, 0.0, 0.0]  # step 2's ratio 0.12 > 0 shows round(0.48) = 0


def test_exact_resume_after_sigkill(reference_run, tmp_path):
    # Kill the run right after the checkpoint of step 1 is complete, then resume to step 3.
    cmd = TRAIN + [f"--workdir={tmp_path}", "--config.trainer.total_steps=3", *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        ckpt = tmp_path / "checkpoints"
        done = [p for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.exists() else []
        if any((p / "state").exists() for p in done):
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    _run(tmp_path, steps=3)
    ref, resumed = _final_params(reference_run), _final_params(tmp_path)
    assert ref.keys() == resumed.keys()
    for key in ref:
        np.testing.assert_allclose(resumed[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    ref_rows = {r["step"]: r for r in _metrics(reference_run)}
    for row in _metrics(tmp_path):
        if row["step"] >= 2:
            for key in ("reward_mean", "reveal_ratio_mean", "response_length_mean", "pg_clipfrac", "grad_norm"):
                assert row[key] == pytest.approx(ref_rows[row["step"]][key], abs=1e-6), (row["step"], key)
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    cmd = TRAIN + [f"--workdir={tmp_path}", "--config.trainer.total_steps=50", *FAST,
                   "--config.trainer.checkpoint_every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in err
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 50
    last = steps[-1]
    _run(tmp_path, "--config.trainer.checkpoint_every=1000", steps=last + 1)
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, last + 2))


@pytest.mark.parametrize("flag, message", [
    ("--config.optim.learning_rate=0", "config.optim.learning_rate: must be > 0"),
    ("--config.rollout.num_generations=1", "config.rollout.num_generations: must be >= 2 with the step rule"),
    ("--config.data.batch_size=3", "config.data.batch_size: 3 prompts x 2 generations"),
    ("--config.scaffold.rule=cosine", "config.scaffold.rule: ScaffoldSettings.rule: unknown rule 'cosine'"),
    ("--config.data.train_path=/nonexistent/train.jsonl", "config.data.train_path: file not found: /nonexistent/train.jsonl"),
])
def test_config_errors_name_the_key(tmp_path, flag, message):
    extra = ["--config.mesh.data=4"] if "batch_size=3" in flag else []
    env = _env()
    if extra:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    proc = subprocess.run(TRAIN + [f"--workdir={tmp_path}", *FAST, flag, *extra], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_export_loads_in_transformers_with_the_same_logits(reference_run, tmp_path):
    import torch
    import transformers

    from ruscarl_jax.models import hf_io, qwen

    out = tmp_path / "hf"
    # the workdir alone: the config and tokenizer come from the run's snapshot
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={reference_run}", f"--out={out}"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Describe the river in a few words."}],
                                        add_generation_prompt=True, return_dict=True, return_tensors="np")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids["input_ids"])).logits.numpy()
    cfg, params = hf_io.load_checkpoint(out)
    ours = np.asarray(qwen.compute_logits(params, cfg, ids["input_ids"], ids["attention_mask"]))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    trained = _final_params(reference_run)
    exported = {jax_key: np.asarray(v) for jax_key, v in _flat(params).items()}
    for key in trained:
        np.testing.assert_array_equal(exported[key], trained[key])


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _drop_checkpoints_after(workdir, step):
    for path in (workdir / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)


# a large learning rate, so one update visibly changes what the policy samples next
OVERLAP = ["--config.trainer.overlap_judge=True", "--config.trainer.keep_checkpoints=10", "--config.optim.learning_rate=0.03",
           "--config.grpo.entropy_coeff=0.01"]


def test_overlap_judges_one_batch_while_sampling_the_next_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    _run(full, *OVERLAP, steps=3)
    rows = _metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # steps 1 and 2 sampled their successor while the judge worked; the last step has none to sample
    assert rows[0]["judge_hidden_seconds"] > 0 and rows[1]["judge_hidden_seconds"] > 0
    assert rows[2]["judge_hidden_seconds"] == 0
    for row in rows:
        assert math.isfinite(row["reward_mean"]) and math.isfinite(row["grad_norm"])
    # resume from step 1: step 2 trains on the pending rollout sampled before step 1's update, saved with step 1
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    for copy in (resumed, fresh):
        shutil.copytree(full, copy)
        _drop_checkpoints_after(copy, 1)
    assert (resumed / "checkpoints" / "1" / "pending").is_dir() and not (full / "checkpoints" / "3" / "pending").exists()
    _run(resumed, *OVERLAP, steps=3)
    final = _final_params(full)
    for key, value in _final_params(resumed).items():
        np.testing.assert_allclose(value, final[key], rtol=0, atol=1e-6, err_msg=key)
    by_step = {r["step"]: r for r in rows}
    for row in _metrics(resumed)[1:]:
        for key in ("reward_mean", "response_length_mean", "entropy", "grad_norm", "pg_loss"):
            assert row[key] == pytest.approx(by_step[row["step"]][key], abs=1e-6), (row["step"], key)
    # without the saved rollout, step 2 is sampled from the updated parameters: a different run
    shutil.rmtree(fresh / "checkpoints" / "1" / "pending")
    _run(fresh, *OVERLAP, steps=3)
    assert any(np.abs(value - final[key]).max() > 1e-4 for key, value in _final_params(fresh).items())


def test_over_long_validation_prompt_is_dropped_before_anything_compiles(tmp_path):
    """A validation prompt longer than data.max_prompt_length is dropped at load (naming it), as the
    training prompts are; it used to reach the sampler and raise there, on the one process holding it."""
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny" / "val.jsonl").read_text().splitlines()[:3]]
    long = dict(rows[0], prompt_id="val-too-long",
                prompt=[{"role": "user", "content": " ".join(f"w{i}" for i in range(400))}])
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [long]), encoding="utf-8")
    proc = _run(tmp_path / "run", f"--config.data.val_path={tmp_path / 'val.jsonl'}", "--config.trainer.test_freq=1",
                "--config.rollout.engine.max_seq_len=134", steps=1, check=False)  # 128 prompt + 6 response tokens
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("dropped 1 of 4 validation examples whose prompts exceed data.max_prompt_length=128 "
            "(data.length_policy='drop'): val-too-long (") in proc.stderr
    row = _metrics(tmp_path / "run")[0]
    assert math.isfinite(row["val/score"]) and math.isfinite(row["val/score_initial"])

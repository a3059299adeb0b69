"""Multi-host training on JAX's distributed runtime: two real processes on 127.0.0.1 (2 CPU devices
each, gloo collectives) against one process with 4 devices, on the tiny config, with the SAME flags:
batch sizes are global, minibatches are smaller than the step, data and minibatch shuffles are on.

- Both layouts log identical metrics every step (validation included) and end with identical parameters.
- Checkpoints move between layouts: resuming a two-process checkpoint in one process, and the other
  way round, continues to the parameters of the uninterrupted run.
- A SIGTERM to ONE of the two processes mid-run stops both at the same point (JAX's preemption sync
  point): both exit 0 with the last completed step's checkpoint, and resuming reaches the uninterrupted
  parameters; with a judge that hangs longer than the grace period, the stop lands mid-step (while
  judging) and both processes are gone within trainer.preemption_grace_s.
- The rollout records hold every process's rows.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from openai_server import FakeJudgeServer
from run_utils import checkpoint_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
STEPS = 6
# 4 prompts x 2 generations = 8 rows a step; minibatches of 4 rows, 2 epochs: 4 updates a step.
COMMON = ["--config.data.batch_size=4", "--config.rollout.num_generations=2", "--config.rollout.max_new_tokens=6",
          "--config.grpo.ppo_mini_batch_size=4", "--config.grpo.ppo_micro_batch_size=4",
          "--config.grpo.logprob_micro_batch_size=4", "--config.grpo.ppo_epochs=2",
          "--config.grpo.entropy_coeff=0.01",  # every update moves the parameters, whatever the rewards
          "--config.trainer.checkpoint_every=1", "--config.trainer.keep_checkpoints=10",
          "--config.trainer.test_freq=3", "--config.data.val_examples=6", "--config.model.tiny.num_layers=1",
          "--config.trainer.tensorboard=False", "--config.trainer.compilation_cache_dir=", "--config.data.shuffle=True",
          "--config.warm_start.path="]
TIMING = ("rollout_seconds", "judge_seconds", "update_seconds", "tokens_per_second", "judge_hidden_seconds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, RUSCARL_JUDGE_API_KEY="unused-by-the-fake-server")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _single(workdir, steps=STEPS, *flags):
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", f"--config.trainer.total_steps={steps}", *COMMON, *flags],
                          capture_output=True, text=True, env=_env(4), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _start_pair(workdir, steps, *flags):
    port = _free_port()
    return [subprocess.Popen(TRAIN + [
        f"--workdir={workdir}", f"--config.trainer.total_steps={steps}", *COMMON, *flags,
        f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}", "--config.distributed.cpu_collectives=gloo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2), cwd=ROOT) for i in range(2)]


def _finish(procs) -> list[str]:
    errs = []
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-4000:]}"
        errs.append(err)
    return errs


def _pair(workdir, steps=STEPS, *flags):
    return _finish(_start_pair(workdir, steps, *flags))


def _metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5, err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, pair = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("pair")
    _single(single)
    _pair(pair)
    return single, pair


def test_same_flags_give_the_same_run_on_any_layout(runs):
    single, pair = runs
    one, two = _metrics(single), _metrics(pair)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        assert a["num_updates"] == 4  # minibatches smaller than the step, two epochs
        for key in a:
            if key not in TIMING and isinstance(a[key], (int, float)):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert "val/score" in one[2] and "val/score" in one[5]
    _assert_same(checkpoint_params(pair, STEPS), checkpoint_params(single, STEPS))
    # every step's update really moved the parameters
    p1, p2 = checkpoint_params(single, 1), checkpoint_params(single, 2)
    assert any(np.abs(p2[k] - p1[k]).max() > 1e-4 for k in p1)


def test_checkpoints_move_between_layouts(runs, tmp_path):
    single, pair = runs
    # a two-process checkpoint of step 3 resumed in one process, and a one-process one in two processes
    from_pair, from_single = tmp_path / "from_pair", tmp_path / "from_single"
    for src, dst in ((pair, from_pair), (single, from_single)):
        shutil.copytree(src, dst)
        for step in _steps(dst):
            if step > 3:
                shutil.rmtree(dst / "checkpoints" / str(step))
    _single(from_pair)
    _pair(from_single)
    final = checkpoint_params(single, STEPS)
    _assert_same(checkpoint_params(from_pair, STEPS), final)
    _assert_same(checkpoint_params(from_single, STEPS), final)
    assert [r["step"] for r in _metrics(from_single)] == list(range(1, STEPS + 1))


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs, tmp_path):
    single, _ = runs
    procs = _start_pair(tmp_path, STEPS, "--config.trainer.checkpoint_every=1000")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and metrics.read_text().count("\n") >= 1:  # step 1 done: the runtime is up
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 is never signalled
    errs = _finish(procs)
    saved = _steps(tmp_path)
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, f"the preemption must land mid-run; checkpoints: {saved}"
    for i, err in enumerate(errs):
        assert "preemption sync point reached at check" in err and f"step {saved[0]} " in err, f"process {i}:\n{err[-3000:]}"
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, saved[0] + 1))
    _pair(tmp_path, STEPS, "--config.trainer.checkpoint_every=1000")
    assert _steps(tmp_path)[-1] == STEPS
    _assert_same(checkpoint_params(tmp_path, STEPS), checkpoint_params(single, STEPS))
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, STEPS + 1))


def test_rollout_records_hold_every_process_rows(runs):
    single, pair = runs
    for step in (1, STEPS):
        one, two = ([json.loads(line) for line in (w / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
                    for w in (single, pair))
        assert len(one) == len(two) == 4 * 2  # the global batch: 4 prompts x 2 generations
        key = lambda r: (r["example_id"], r["sample_index"], r["response"], r["reward"])  # noqa: E731
        assert [key(r) for r in two] == [key(r) for r in one]


TOPICS = ["river", "forest", "desert", "harbor", "meadow", "glacier", "canyon", "island"]
GRACE_S = 25  # trainer.preemption_grace_s's default
HANG_S = 60  # the judge's reply time once the test makes it hang: far beyond the grace


def _judged_task(tmp_path):
    """A task graded by the (fake) LLM judge, not by rules."""
    rows = [{"prompt_id": f"ex-{i}", "prompt": [{"role": "user", "content": f"Describe the {t}."}],
             "rubrics": [{"criterion": f'The response mentions "{t}".', "points": 3.0, "tags": ["axis:completeness"]},
                         {"criterion": 'The response mentions "water".', "points": 1.0, "tags": ["axis:accuracy"]}]}
            for i, t in enumerate(TOPICS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _asked(server) -> int:
    with server._lock:
        return sum(server.key_counts.values())  # counted as a request arrives, before its reply is delayed


def test_sigterm_mid_step_stops_both_within_the_grace_and_resumes_exactly(tmp_path):
    data = _judged_task(tmp_path)
    with FakeJudgeServer() as server:
        flags = [f"--config.data.train_path={data}", "--config.data.val_path=", "--config.trainer.test_freq=0",
                 f"--config.judge.base_urls=('{server.base_url}',)", "--config.judge.model=fake-judge",
                 "--config.trainer.checkpoint_every=1000"]  # judge.timeout_s is 120 s by default: > HANG_S
        reference = tmp_path / "reference"
        _pair(reference, 3, *flags)
        for step in (1, 3):  # the records hold both processes' rows: every prompt of the step, both samples
            records = [json.loads(line) for line in (reference / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
            assert len(records) == 4 * 2 and len({r["example_id"] for r in records}) == 4
            assert [r["sample_index"] for r in records] == [0, 1] * 4
        run = tmp_path / "run"
        procs = _start_pair(run, 3, *flags)
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and metrics.read_text().count("\n") >= 1:  # step 1 is done
                break
            time.sleep(0.05)
        server.delay_s = HANG_S  # step 2's judge calls now take a minute each
        asked = _asked(server)
        while time.time() < deadline and _asked(server) == asked:  # step 2 is being judged
            time.sleep(0.05)
        signalled = time.monotonic()
        procs[1].send_signal(signal.SIGTERM)  # process 1 only
        exits = [None, None]
        while None in exits and time.monotonic() - signalled < 3 * HANG_S:
            for i, p in enumerate(procs):
                if exits[i] is None and p.poll() is not None:
                    exits[i] = time.monotonic() - signalled
            time.sleep(0.05)
        errs = _finish(procs)
        assert None not in exits and max(exits) < GRACE_S, f"exit times after SIGTERM: {exits}"
        for i, err in enumerate(errs):
            assert "interrupted while judging step 2; step 1 saved with step 2's rollout" in err, f"process {i}:\n{err[-3000:]}"
        assert _steps(run) == [1]
        assert [r["step"] for r in _metrics(run)] == [1]
        server.delay_s = 0.0
        _pair(run, 3, *flags)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    _assert_same(checkpoint_params(run, 3), checkpoint_params(reference, 3))
    by_step = {r["step"]: r for r in _metrics(reference)}
    for row in _metrics(run):
        for key in ("reward_mean", "grad_norm", "pg_loss", "response_length_mean"):
            assert row[key] == pytest.approx(by_step[row["step"]][key], abs=1e-5), (row["step"], key)

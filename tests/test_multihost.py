"""Multi-host training on JAX's distributed runtime: two real processes on 127.0.0.1 (2 CPU devices
each, gloo collectives) against one process with 4 devices, on the tiny config.

- The two-process run's final parameters equal the one-process run's.
- A checkpoint written by the two processes resumes in one 4-device process, and one written by a
  4-device process resumes in two processes, each continuing to the same parameters.
"""
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from run_utils import checkpoint_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
GLOBAL_PROMPTS = 4
COMMON = ["--config.rollout.num_generations=2", "--config.rollout.max_new_tokens=6",
          "--config.grpo.ppo_mini_batch_size=8", "--config.grpo.ppo_micro_batch_size=2",
          "--config.grpo.logprob_micro_batch_size=2",
          "--config.trainer.checkpoint_every=1", "--config.trainer.test_freq=0", "--config.model.tiny.num_layers=1",
          "--config.trainer.tensorboard=False", "--config.trainer.compilation_cache_dir=", "--config.data.shuffle=True",
          "--config.warm_start.path="]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _single(workdir, steps):
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", f"--config.trainer.total_steps={steps}",
                                   f"--config.data.batch_size={GLOBAL_PROMPTS}", *COMMON],
                          capture_output=True, text=True, env=_env(4), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _pair(workdir, steps):
    port = _free_port()
    procs = [subprocess.Popen(TRAIN + [
        f"--workdir={workdir}", f"--config.trainer.total_steps={steps}",
        f"--config.data.batch_size={GLOBAL_PROMPTS // 2}", *COMMON,
        f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}", "--config.distributed.cpu_collectives=gloo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2), cwd=ROOT) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"


_params = checkpoint_params


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5, err_msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, pair = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("pair")
    _single(single, 2)
    _pair(pair, 2)
    return single, pair


def test_two_processes_equal_one_process_with_four_devices(runs):
    single, pair = runs
    _assert_same(_params(pair, 2), _params(single, 2))
    # both hosts took part: the metrics (written by process 0 only) cover every step once
    assert (pair / "metrics.jsonl").read_text().count("\n") == 2
    # the first step's update really moved the parameters
    assert any(np.abs(_params(single, 2)[k] - _params(single, 1)[k]).max() > 0 for k in _params(single, 1))


def test_checkpoints_move_between_layouts(runs, tmp_path):
    single, pair = runs
    # two-process checkpoint -> one process, and one-process checkpoint -> two processes, to step 3
    from_pair, from_single = tmp_path / "from_pair", tmp_path / "from_single"
    shutil.copytree(pair, from_pair)
    shutil.copytree(single, from_single)
    _single(from_pair, 3)
    _pair(from_single, 3)
    _assert_same(_params(from_pair, 3), _params(from_single, 3))
    _assert_same(_params(from_pair, 2), _params(pair, 2))

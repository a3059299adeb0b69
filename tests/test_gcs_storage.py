"""A run on gs:// against a real GCS emulator (gcp-storage-emulator on 127.0.0.1, see gcs_emulator.py): train, resume and
export through gs://bucket/..., with the training data read from the bucket too.

gcsfs (etils.epath's gs:// backend) is pointed at the emulator with STORAGE_EMULATOR_HOST, tensorstore
(orbax's array store) with TENSORSTORE_GCS_HTTP_URL and a fake token (GOOGLE_AUTH_TOKEN_FOR_TESTING).
"""
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
EXPORT = [sys.executable, str(ROOT / "scripts" / "export.py")]
FAST = ["--config.data.batch_size=4", "--config.rollout.num_generations=2", "--config.rollout.max_new_tokens=6",
        "--config.grpo.ppo_mini_batch_size=8", "--config.grpo.ppo_micro_batch_size=4",
        "--config.trainer.checkpoint_every=1", "--config.trainer.test_freq=2", "--config.data.val_examples=4",
        "--config.model.tiny.num_layers=1", "--config.trainer.compilation_cache_dir=", "--config.warm_start.path="]
STARTUP_WAIT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (for subprocesses and this process); one bucket named `bucket`."""
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), "bucket"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + STARTUP_WAIT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start within {STARTUP_WAIT_S} s (exit {proc.poll()})")
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _env(gcs):
    env = {**os.environ, **gcs}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(gcs, cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(gcs), timeout=600, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd[1]} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _params(workdir):
    """Parameters of the latest checkpoint under `workdir` (a path or gs:// URL), flat numpy."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    ckpt = epath.Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(ckpt / str(step) / "state")
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = checkpointer.restore(ckpt / str(step) / "state", target)
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored["params"])[0]}


def test_train_resume_and_export_on_gcs(gcs, tmp_path):
    from etils import epath

    data = epath.Path("gs://bucket/data/train.jsonl")
    data.write_text((ROOT / "data" / "tiny" / "train.jsonl").read_text())
    url = "gs://bucket/run"
    on_gcs = [f"--workdir={url}", f"--config.data.train_path={data}", *FAST]
    _run(gcs, TRAIN + on_gcs + ["--config.trainer.total_steps=2"])
    run = epath.Path(url)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (ROOT / "gs:").exists() and not pathlib.Path("gs:").exists()
    # resume from the bucket (total_steps may change on resume) and compare with one local run of 3 steps
    _run(gcs, TRAIN + on_gcs + ["--config.trainer.total_steps=3"])
    local = tmp_path / "local"
    _run(gcs, TRAIN + [f"--workdir={local}", f"--config.data.train_path={data}", *FAST, "--config.trainer.total_steps=3"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, local_rows):
        for key in ("reward_mean", "grad_norm", "response_length_mean"):
            assert row[key] == pytest.approx(ref[key], abs=1e-6), (row["step"], key)
    step, ours = _params(url)
    _, ref = _params(local)
    assert step == 3 and ours.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    # every kind of run file is in the bucket
    for name in ("config.json", "tokenizer/tokenizer.json", "rollouts/step_000003.jsonl", "checkpoints/3/metadata"):
        assert (run / name).exists(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert json.loads((run / "config.json").read_text())["data"]["train_path"] == str(data)

    # export from the bucket to the bucket, with the workdir alone (the training data is gone by then);
    # the download loads in transformers
    data.unlink()
    _run(gcs, EXPORT + [f"--workdir={url}", "--out=gs://bucket/export"])
    out = tmp_path / "export"
    out.mkdir()
    for p in epath.Path("gs://bucket/export").iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    from ruscarl_jax.models import hf_io

    _, exported = hf_io.load_checkpoint(out)
    import jax

    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(exported)[0]}
    for key in ours:
        np.testing.assert_array_equal(flat[key], ours[key], err_msg=key)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")

    # a changed config does not resume; the error names the key and nothing is compiled or written
    data.write_text((ROOT / "data" / "tiny" / "train.jsonl").read_text())
    proc = _run(gcs, TRAIN + on_gcs + ["--config.trainer.total_steps=4", "--config.optim.learning_rate=0.5"], check=False)
    assert proc.returncode == 2 and "config.optim.learning_rate: 0.001 in the run, 0.5 now" in proc.stderr
    assert not (run / "checkpoints" / "4").exists()


@pytest.mark.parametrize("workdir, message", [
    ("gs:///run", "config.workdir: 'gs:///run' has no valid bucket name"),
    ("gs://no-such-bucket/run", "config.workdir: bucket gs://no-such-bucket of 'gs://no-such-bucket/run' does not exist"),
    ("s4://bucket/run", "config.workdir: 's4://bucket/run' has an unsupported scheme s4://"),
])
def test_bad_storage_urls_name_the_url(gcs, workdir, message):
    proc = _run(gcs, TRAIN + [f"--workdir={workdir}", *FAST, "--config.trainer.total_steps=1"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr


def test_bad_data_url_names_the_key(gcs):
    proc = _run(gcs, TRAIN + ["--workdir=gs://bucket/bad", "--config.data.train_path=gs://no-such-bucket/train.jsonl",
                              *FAST], check=False)
    assert proc.returncode == 2 and "config.data.train_path: bucket gs://no-such-bucket" in proc.stderr


def test_unreachable_storage_times_out_with_the_url():
    from ruscarl_jax.trainer import storage

    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        with pytest.raises(storage.StorageError, match=r"config.workdir: cannot reach gs://bucket for 'gs://bucket/run'"):
            storage.check_url("gs://bucket/run", "config.workdir", timeout_s=3)
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        gcsfs.GCSFileSystem.clear_instance_cache()

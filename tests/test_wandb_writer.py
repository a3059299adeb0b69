"""The W&B writer in offline mode: files under the workdir, the metrics and the run's config in them."""
import json

import pytest

from ruscarl_jax.trainer.metrics import RunWriter

wandb = pytest.importorskip("wandb")


def test_wandb_offline_run_writes_files_with_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = {"grpo": {"rollout_is": "token", "kl_coef": 0.001}, "seed": 3}
    writer = RunWriter(tmp_path, total_steps=2, tensorboard=False, wandb={"project": "ruscarl-test"}, run_config=config)
    writer.write_metrics(1, {"reward_mean": 0.25, "scaffold_gap/scaffolded/log_ratio_mean": -0.5})
    writer.write_metrics(2, {"reward_mean": 0.5, "scaffold_gap/scaffolded/log_ratio_mean": float("nan")})
    writer.close()
    wandb.teardown()  # wait for the W&B service to flush the offline log
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    logs = list(runs[0].glob("run-*.wandb"))  # the offline transaction log `wandb sync` uploads
    assert len(logs) == 1
    raw = logs[0].read_bytes()
    assert b'{"rollout_is":"token","kl_coef":0.001}' in raw  # the run's config, attached
    assert raw.count(b"reward_mean") >= 2 and b"scaffold_gap/scaffolded/log_ratio_mean" in raw
    assert b"0.25" in raw and b"0.5" in raw
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    assert runs[0].name.endswith(run_id)

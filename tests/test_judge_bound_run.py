"""A training run whose judge replies cannot be parsed stops at the first step, before any update."""
import json

import pytest
from openai_server import FakeJudgeServer, Faults

from configs import tiny
from ruscarl_jax.judge.telemetry import JudgeUnreliableError
from ruscarl_jax.trainer.loop import train

TOPICS = ["river", "forest", "desert", "harbor", "meadow", "glacier", "canyon", "island"]


def _write_data(path):
    rows = [{"prompt_id": f"ex-{i}", "prompt": [{"role": "user", "content": f"Describe the {t}."}],
             "rubrics": [{"criterion": f'The response mentions "{t}".', "points": 3.0, "tags": ["axis:completeness"]},
                         {"criterion": 'The response mentions "water".', "points": 1.0, "tags": ["axis:accuracy"]}]}
            for i, t in enumerate(TOPICS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_parse_failure_bound_stops_the_run_before_the_update(tmp_path, monkeypatch):
    _write_data(tmp_path / "train.jsonl")
    monkeypatch.setenv("RUSCARL_JUDGE_API_KEY", "unused-by-the-fake-server")
    c = tiny.get_config()
    c.data.update(dict(train_path=str(tmp_path / "train.jsonl"), val_path="", batch_size=4, val_examples=0))
    c.rollout.update(dict(num_generations=2, max_new_tokens=4))
    c.grpo.update(dict(ppo_mini_batch_size=8, ppo_micro_batch_size=8))
    c.model.tiny.num_layers = 1
    c.warm_start.path = ""  # from the random model: no SFT warm start to build
    c.trainer.update(dict(total_steps=2, checkpoint_every=1, test_freq=0, tensorboard=False, save_rollouts=False))
    with FakeJudgeServer(faults=Faults(rate=1.0, kinds=("malformed",))) as server:
        c.judge.update(dict(base_urls=(server.base_url,), model="fake-judge", max_retries=1, backoff_base_s=0.01,
                            backoff_max_s=0.02, max_parse_failure_rate=0.25))
        with pytest.raises(JudgeUnreliableError, match=r"judge replies could not be parsed \(100.0%\), above "
                                                        r"judge.max_parse_failure_rate=0.25"):
            train(c, tmp_path / "run")
        assert server.requests == 4 * 2 * 2 * 2  # every criterion of every response, asked twice
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # step 1 was never trained or logged
    assert not list((tmp_path / "run").glob("checkpoints/*/"))

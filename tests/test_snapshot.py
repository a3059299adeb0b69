"""The run snapshot (config.json + tokenizer/) and the paper config's data and validation settings."""
import importlib
import json
import pathlib
import sys

import pytest

from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.trainer import config as config_lib
from ruscarl_jax.trainer import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
VAL400 = ROOT.parent / "shared" / "healthbench" / "healthbench_val400.jsonl"


def _config(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"configs.{name}").get_config()


def _tokenizer():
    return build_tiny_tokenizer(["the river runs to the sea", "a cat sat on the mat"] * 20, vocab_size=300)


def test_snapshot_round_trip_and_resumable_keys(tmp_path):
    config = _config("tiny")
    assert not snapshot.check_config(config, tmp_path)  # nothing saved yet
    tokenizer = _tokenizer()
    snapshot.write(config, tokenizer, tmp_path)
    assert snapshot.check_config(config, tmp_path)
    # keys that may change on resume
    resumed = _config("tiny")
    resumed.trainer.total_steps = 500
    resumed.trainer.checkpoint_every = 7
    resumed.judge.base_urls = ("http://judge:8000/v1",)
    resumed.distributed.num_processes = 4
    resumed.workdir = "elsewhere"
    assert snapshot.check_config(resumed, tmp_path)
    # the saved config validates as the original does, and the tokenizer gives the same ids
    loaded = snapshot.load_config(tmp_path)
    assert snapshot.to_plain(loaded) == snapshot.to_plain(config)
    assert config_lib.validate(loaded, num_devices=1).grpo == config_lib.validate(config, num_devices=1).grpo
    again = snapshot.load_tokenizer(tmp_path)
    text = "<|im_start|>user\nthe cat runs<|im_end|>\n"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.chat_template == tokenizer.chat_template


def test_a_changed_config_names_every_changed_key(tmp_path):
    config = _config("tiny")
    snapshot.write(config, _tokenizer(), tmp_path)
    changed = _config("tiny")
    changed.optim.learning_rate = 0.5
    changed.rollout.num_generations = 4
    changed.trainer.total_steps = 99  # allowed, so not named
    with pytest.raises(snapshot.SnapshotMismatch) as err:
        snapshot.check_config(changed, tmp_path)
    message = str(err.value)
    assert message.startswith("config.optim.learning_rate: 0.001 in the run, 0.5 now; "
                              "config.rollout.num_generations: 8 in the run, 4 now.")
    assert "total_steps: 100" not in message and "trainer.total_steps" in message  # listed as resumable only


def test_a_new_key_counts_as_a_change(tmp_path):
    config = _config("tiny")
    snapshot.write(config, _tokenizer(), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["grpo"]["entropy_coeff"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(snapshot.SnapshotMismatch, match=r"config.grpo.entropy_coeff: '<absent>' in the run, 0.0 now"):
        snapshot.check_config(config, tmp_path)


def test_paper_config_requires_a_training_split(tmp_path, monkeypatch):
    monkeypatch.delenv("HEALTHBENCH_TRAIN_PATH", raising=False)
    config = _config("qwen7b")
    config.model.checkpoint_dir = str(tmp_path)
    if not VAL400.exists():
        pytest.skip("../shared/healthbench is absent")
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(config, num_devices=8)
    message = str(err.value)
    assert message.startswith("config.data.train_path: is required")
    assert "healthbench_val400.jsonl held out" in message and "verl" in message
    config.data.train_path = str(VAL400)  # any file of the right format (a stand-in for the real split)
    config_lib.validate(config, num_devices=8)
    assert pathlib.Path(str(config_lib.resolve_path(config.data.val_path))).resolve() == VAL400.resolve()
    assert config.trainer.test_freq == 5 and config.data.val_examples == 0  # all 400, every 5 steps
    judge = config_lib.validate(config, num_devices=8).judge
    assert (judge.temperature, judge.top_p, judge.top_k, judge.presence_penalty, judge.max_tokens) == (0.7, 0.8, 20, 1.5, 2048)
    assert dict(judge.extra_body) == {"chat_template_kwargs": {"enable_thinking": False}}
    assert judge.api_key_env == "RUSCARL_JUDGE_API_KEY" == _config("tiny").judge.api_key_env


def test_resolve_path_keeps_urls_and_anchors_local_paths(tmp_path):
    assert str(config_lib.resolve_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(config_lib.resolve_path("runs/x", tmp_path)) == str(tmp_path / "runs" / "x")
    assert str(config_lib.resolve_path("data/tiny/train.jsonl")) == str(ROOT / "data" / "tiny" / "train.jsonl")

"""A run's snapshot in its workdir: the resolved config (config.json) and the tokenizer (tokenizer/).

Written at the first start, read at every later one: a resume trains with the saved tokenizer (the tiny
one is not rebuilt) and refuses a config that differs from the saved one, except in RESUMABLE_KEYS
(where the run runs, how long, how often it saves and logs, and how it reaches the judge). Export
and evaluation need only the workdir: `load_config` gives the run's config back.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections
from etils import epath

from ruscarl_jax.trainer import storage

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"

# Keys (or sections, ending in ".") that may differ on resume: none changes what a step computes.
RESUMABLE_KEYS: tuple[str, ...] = (
    "workdir", "distributed.", "model.checkpoint_dir",
    "trainer.total_steps", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.test_freq",
    "trainer.save_rollouts", "trainer.tensorboard", "trainer.compilation_cache_dir", "trainer.preemption_grace_s",
    "judge.base_urls", "judge.api_key_env", "judge.max_concurrency", "judge.max_concurrency_per_endpoint",
    "judge.timeout_s", "judge.max_retries", "judge.backoff_base_s", "judge.backoff_max_s",
    "judge.endpoint_failures_to_down", "judge.endpoint_cooldown_s", "judge.cache_path",
)


class SnapshotMismatch(ValueError):
    """The config differs from the run's snapshot in keys that may not change on resume."""


def to_plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), the form it is saved and compared in."""
    return json.loads(config.to_json(sort_keys=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every key that differs and may not change on resume."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing) and not _resumable(k)}


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """The config saved in `workdir`, or None when the run has no snapshot."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))


def check_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> bool:
    """True when `workdir` holds a snapshot and `config` agrees with it; False when there is none.
    Raises SnapshotMismatch naming each changed key with its saved and new value."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return False
    changed = changed_keys(json.loads(path.read_text(encoding="utf-8")), to_plain(config))
    if changed:
        lines = "; ".join(f"config.{k}: {old!r} in the run, {new!r} now" for k, (old, new) in changed.items())
        raise SnapshotMismatch(f"{lines}. The run in {workdir} was started with another config (saved in {path}) "
                               f"and does not resume with a changed one; only these may change on resume: "
                               f"{', '.join(RESUMABLE_KEYS)}. Use a new workdir for a new run.")
    return True


def write(config: ml_collections.ConfigDict, tokenizer: Any, workdir: str | os.PathLike) -> None:
    """Save the tokenizer, then the config (its presence marks a complete snapshot)."""
    workdir = epath.Path(workdir)
    with tempfile.TemporaryDirectory(prefix="ruscarl_tok_") as local:
        tokenizer.save_pretrained(local)
        storage.upload_tree(local, workdir / TOKENIZER_DIR)
    storage.write_atomic(workdir / CONFIG_FILE, json.dumps(to_plain(config), indent=2, sort_keys=True) + "\n")


def load_tokenizer(workdir: str | os.PathLike) -> Any:
    """The tokenizer saved in `workdir` (through transformers.AutoTokenizer), or None when there is none."""
    source = epath.Path(workdir) / TOKENIZER_DIR
    if not (epath.Path(workdir) / CONFIG_FILE).exists() or not source.exists():
        return None
    import transformers

    with tempfile.TemporaryDirectory(prefix="ruscarl_tok_") as local:
        storage.download_tree(source, local)
        return transformers.AutoTokenizer.from_pretrained(local)

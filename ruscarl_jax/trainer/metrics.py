"""Where a run reports: metrics.jsonl, TensorBoard, Weights & Biases (opt-in), rollout records and a progress line.

Only the main process writes (the others get a writer that does nothing), so a multi-host run has one
metrics file, one TensorBoard log and one progress bar. The workdir may be a storage URL (gs://...):
files go through etils.epath; object stores cannot append, so metrics.jsonl is rewritten whole each
step (a small file), and TensorBoard events are written to a local staging folder and copied up. On a terminal the progress is a tqdm bar with
step, reward and ETA; otherwise it is one plain log line per step.

W&B (`wandb` set): a run under workdir/wandb with the run's config attached; the mode comes from
`wandb["mode"]` or the WANDB_MODE environment variable ('offline' writes files only, synced later
with `wandb sync`). Needs the optional extra: pip install 'ruscarl_jax[wandb]'.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

from ruscarl_jax.trainer import storage

logger = logging.getLogger("ruscarl_jax.trainer")


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy / jax numbers to Python, non-finite floats kept as strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunWriter:
    """Metrics, rollout records and progress for one run (a no-op on processes other than 0)."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, start_step: int = 0, active: bool = True,
                 tensorboard: bool = True, wandb: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None):
        """Lines of an existing metrics.jsonl after `start_step` are dropped (a resumed run redoes them)."""
        self.active = active
        self.workdir = epath.Path(workdir)
        self._bar = None
        self._tb = None
        self._wandb = None
        self._staging = None
        if not active:
            return
        (self.workdir / "rollouts").mkdir(parents=True, exist_ok=True)
        self._lines = _read_metrics(self.workdir / "metrics.jsonl", start_step)
        storage.write_atomic(self.workdir / "metrics.jsonl", "".join(self._lines))
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = self.workdir / "tensorboard"
            if storage.is_url(os.fspath(self.workdir)):  # the event writer writes local files only
                self._staging = tempfile.TemporaryDirectory(prefix="ruscarl_tb_")
                logdir = self._staging.name
            self._tb = SummaryWriter(os.fspath(logdir))
        if wandb is not None:
            self._wandb = _start_wandb(self.workdir, dict(wandb), dict(run_config or {}), start_step)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="ruscarl", unit="step", dynamic_ncols=True)
        self.total_steps = total_steps

    def write_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._lines.append(json.dumps(record) + "\n")
        storage.write_atomic(self.workdir / "metrics.jsonl", "".join(self._lines))
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
            if self._staging is not None:
                storage.upload_tree(self._staging.name, self.workdir / "tensorboard")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)
        reward = record.get("reward_mean", float("nan"))
        if self._bar is not None:
            self._bar.set_postfix(reward=f"{reward:.3f}" if isinstance(reward, float) else reward)
            self._bar.update(1)
        else:
            logger.info("step %d/%d reward_mean=%s %s", step, self.total_steps, _fmt(reward),
                        " ".join(f"{k}={_fmt(record[k])}" for k in ("kl", "entropy", "response_length_mean",
                                                                     "rollout_seconds", "update_seconds") if k in record))

    def write_rollouts(self, step: int, records: Iterable[Mapping[str, Any]]) -> None:
        if not self.active:
            return
        text = "".join(json.dumps(record, default=_clean) + "\n" for record in records)
        (self.workdir / "rollouts" / f"step_{step:06d}.jsonl").write_text(text, encoding="utf-8")

    def close(self) -> None:
        if not self.active:
            return
        if self._tb is not None:
            self._tb.close()
            if self._staging is not None:
                storage.upload_tree(self._staging.name, self.workdir / "tensorboard")
                self._staging.cleanup()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()


def _start_wandb(workdir: epath.Path, options: dict[str, Any], run_config: dict[str, Any], start_step: int) -> Any:
    """A W&B run in workdir/wandb (resumed by id when the workdir already has one). W&B writes local files
    only: with a storage-URL workdir its files go to a local folder (the run id still lives in the workdir)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("trainer.wandb is set but the wandb package is missing: pip install 'ruscarl_jax[wandb]'") from None
    directory = workdir / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    id_file = directory / "run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    local = tempfile.mkdtemp(prefix="ruscarl_wandb_") if storage.is_url(os.fspath(workdir)) else os.fspath(workdir)
    run = wandb.init(project=options.get("project") or "ruscarl_jax", entity=options.get("entity") or None,
                     name=options.get("name") or None, mode=options.get("mode") or None, dir=local, id=run_id,
                     resume="allow", config=run_config, settings=wandb.Settings(console="off", x_disable_stats=True))
    logger.info("W&B run %s (%s mode) from step %d", run.id, run.settings.mode, start_step + 1)
    return run


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_metrics(path: epath.Path, last_step: int) -> list[str]:
    """The lines of an existing metrics file up to `last_step`."""
    if not path.exists():
        return []
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]



def truncate_metrics(workdir: str | os.PathLike, last_step: int) -> None:
    """Drop metrics lines after `last_step` (a resumed run rewrites the steps it redoes)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if path.exists():
        storage.write_atomic(path, "".join(_read_metrics(path, last_step)))

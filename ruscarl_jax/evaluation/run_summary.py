"""A one-screen summary of a training run, read from its metrics.jsonl: rewards of scaffolded and
unscaffolded rollouts at the start and the end (scaffolded: the prompt showed at least one criterion),
the fraction of rows so scaffolded, the held-out score before and after, KL, and where the curves are
(with a text sparkline of each)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from etils import epath

BARS = " ▁▂▃▄▅▆▇█"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a local path or a URL); errors name the file and line."""
    path = epath.Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
    return records


def _values(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append((int(r["step"]), float(v)))
    return out


def sparkline(values: Sequence[float], width: int = 40, lo: float | None = None, hi: float | None = None) -> str:
    """Values (resampled to at most `width` points) as block characters between lo and hi."""
    if not values:
        return ""
    if len(values) > width:
        chunks = [values[i * len(values) // width:(i + 1) * len(values) // width] for i in range(width)]
        values = [sum(c) / len(c) for c in chunks]
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    span = (hi - lo) or 1.0
    return "".join(BARS[min(len(BARS) - 1, max(0, round((v - lo) / span * (len(BARS) - 1))))] for v in values)


def _mean(pairs: Sequence[tuple[int, float]]) -> float:
    return sum(v for _, v in pairs) / len(pairs) if pairs else math.nan


def summarize(workdir: str | os.PathLike, window: int = 10) -> str:
    """The summary text of the run in `workdir` (means over the first and last `window` steps)."""
    workdir = epath.Path(workdir)
    records = read_metrics(workdir / "metrics.jsonl")
    if not records:
        return f"{workdir}: no metrics yet"
    lines = [f"run summary: {len(records)} steps (up to step {records[-1]['step']}) in {workdir}"]
    rows = [("reward, scaffolded rollouts", "reward_scaffolded_mean"),
            ("reward, unscaffolded rollouts", "reward_unscaffolded_mean"),
            ("rows shown >= 1 criterion", "scaffolded_fraction"),
            ("KL to the reference policy", "kl")]
    lines.append(f"  {'':32s}{'first ' + str(window):>10s}{'last ' + str(window):>10s}   curve (rewards and scores on 0..1)")
    for label, key in rows:
        pairs = _values(records, key)
        if pairs:
            lines.append(f"  {label:32s}{_mean(pairs[:window]):10.3f}{_mean(pairs[-window:]):10.3f}   "
                         f"{sparkline([v for _, v in pairs], **({} if key == 'kl' else {'lo': 0.0, 'hi': 1.0}))}")
    if _values(records, "reward_scaffolded_mean") and not _values(records, "scaffolded_fraction"):
        lines.append("  (logged by an older trainer: there 'scaffolded' meant reveal ratio > 0, which includes rows "
                     "shown no criterion)")
    val = _values(records, "val/score")
    before = _values(records, "val/score_initial")
    if val:
        start = f"{before[0][1]:.3f}" if before else "n/a"
        lines.append(f"  {'held-out score, no scaffold':32s}{start:>10s}{val[-1][1]:10.3f}   "
                     f"{sparkline(([before[0][1]] if before else []) + [v for _, v in val], lo=0.0, hi=1.0)}"
                     f"  (before training -> step {val[-1][0]}; greedy, every trainer.test_freq steps)")
    curves = [f"{workdir / 'metrics.jsonl'}"]
    if (workdir / "tensorboard").is_dir():
        curves.append(f"tensorboard --logdir {workdir / 'tensorboard'}")
    if (workdir / "rollouts").is_dir():
        curves.append(f"rollouts in {workdir / 'rollouts'}")
    lines.append("  curves: " + "; ".join(curves))
    return "\n".join(lines)

"""Learning curves of several runs (arms x seeds): read from metrics.jsonl, written as CSV, summarised
over seeds (mean and min-max spread), plotted, and tabulated.

A curve row is one (arm, seed, step) with the columns of `COLUMNS`; a value a run did not record at a
step (validation runs every few steps) is NaN, written as an empty CSV cell.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# CSV column -> metrics.jsonl key
METRIC_KEYS: dict[str, str] = {
    "heldout_score": "val/score",
    "train_reward": "reward_mean",
    "train_reward_unscaffolded": "reward_unscaffolded_mean",
    "train_reward_scaffolded": "reward_scaffolded_mean",
    "reveal_ratio": "reveal_ratio_mean",
    "kl": "kl",
}
COLUMNS: tuple[str, ...] = ("arm", "seed", "step", *METRIC_KEYS)


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def read_run(metrics_path: str | pathlib.Path, arm: str, seed: int) -> list[dict[str, Any]]:
    """The curve rows of one run from its metrics.jsonl (errors name the file and line)."""
    rows = []
    path = pathlib.Path(metrics_path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}, line {number}: not a metrics record with a 'step' ({err})") from None
        rows.append({"arm": arm, "seed": seed, "step": step,
                     **{column: _number(record.get(key)) for column, key in METRIC_KEYS.items()}})
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def read_csv(path: str | pathlib.Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"arm": r["arm"], "seed": int(r["seed"]), "step": int(r["step"]),
                 **{c: _number(r[c]) if r[c] != "" else math.nan for c in METRIC_KEYS}} for r in csv.DictReader(f)]


def over_seeds(rows: Sequence[Mapping[str, Any]], arm: str, column: str) -> dict[str, np.ndarray]:
    """steps, mean, min, max of `column` over the seeds of `arm`, at the steps every seed recorded it."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["arm"] == arm and not math.isnan(r[column]):
            by_seed.setdefault(r["seed"], {})[r["step"]] = r[column]
    if not by_seed:
        return {"steps": np.zeros(0, int), "mean": np.zeros(0), "min": np.zeros(0), "max": np.zeros(0), "num_seeds": 0}
    steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    values = np.asarray([[by_seed[s][t] for t in steps] for s in sorted(by_seed)], np.float64)  # [seeds, steps]
    return {"steps": np.asarray(steps), "mean": values.mean(0), "min": values.min(0), "max": values.max(0),
            "num_seeds": len(by_seed)}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to `window` points (NaNs ignored)."""
    out = np.full(values.shape, np.nan)
    for i in range(values.size):
        chunk = values[max(0, i - window + 1):i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def plot(rows: Sequence[Mapping[str, Any]], arms: Sequence[str], labels: Mapping[str, str], path: str | pathlib.Path,
         title: str = "", smooth_window: int = 5) -> None:
    """Two panels: held-out unscaffolded score, and training reward of unscaffolded (solid) and
    scaffolded (dashed) samples; lines are seed means, bands the min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for i, arm in enumerate(arms):
        color = f"C{i}"
        c = over_seeds(rows, arm, "heldout_score")
        left.plot(c["steps"], c["mean"], color=color, marker="o", ms=3, label=f"{labels.get(arm, arm)} ({c['num_seeds']} seeds)")
        left.fill_between(c["steps"], c["min"], c["max"], color=color, alpha=0.2)
        for column, style in (("train_reward_unscaffolded", "-"), ("train_reward_scaffolded", "--")):
            c = over_seeds(rows, arm, column)
            if not c["num_seeds"]:
                continue
            kind = "no scaffold" if column.endswith("unscaffolded") else "scaffolded"
            right.plot(c["steps"], smooth(c["mean"], smooth_window), color=color, ls=style,
                       label=f"{labels.get(arm, arm)}: {kind}")
            right.fill_between(c["steps"], smooth(c["min"], smooth_window), smooth(c["max"], smooth_window),
                               color=color, alpha=0.12)
    left.set_title("held-out prompts, no scaffold (greedy)")
    left.set_ylabel("score (clipped mean)")
    right.set_title(f"training rollouts (moving average of {smooth_window} steps)")
    right.set_ylabel("reward")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def final_values(rows: Sequence[Mapping[str, Any]], arm: str, column: str) -> dict[int, float]:
    """seed -> the value of `column` at the last step that seed recorded it."""
    out: dict[int, tuple[int, float]] = {}
    for r in rows:
        if r["arm"] == arm and not math.isnan(r[column]) and r["step"] >= out.get(r["seed"], (-1, 0.0))[0]:
            out[r["seed"]] = (r["step"], r[column])
    return {seed: value for seed, (_, value) in sorted(out.items())}


def last_window_mean(rows: Sequence[Mapping[str, Any]], arm: str, column: str, window: int) -> dict[int, float]:
    """seed -> mean of `column` over that seed's last `window` recorded steps."""
    by_seed: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        if r["arm"] == arm and not math.isnan(r[column]):
            by_seed.setdefault(r["seed"], []).append((r["step"], r[column]))
    return {s: float(np.mean([v for _, v in sorted(vals)[-window:]])) for s, vals in sorted(by_seed.items())}

"""Learning curves of several runs (numerics x arms x seeds): read from metrics.jsonl, written as CSV,
summarised over seeds (mean, min-max spread and a 95% bootstrap band of the mean), plotted, and tabulated.

A curve row is one (numerics, arm, seed, step) with the columns of `COLUMNS`; a value a run did not
record at a step (validation runs every few steps) is NaN, written as an empty CSV cell. The functions
that take an `arm` read rows of one numerics: filter by `numerics` first.
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
    "scaffolded_fraction": "scaffolded_fraction",  # rows shown at least one criterion
    "kl": "kl",
}
COLUMNS: tuple[str, ...] = ("numerics", "arm", "seed", "step", *METRIC_KEYS)


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def read_run(metrics_path: str | pathlib.Path, arm: str, seed: int, numerics: str = "") -> list[dict[str, Any]]:
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
        rows.append({"numerics": numerics, "arm": arm, "seed": seed, "step": step,
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
        return [{"numerics": r["numerics"], "arm": r["arm"], "seed": int(r["seed"]), "step": int(r["step"]),
                 **{c: _number(r[c]) if r[c] != "" else math.nan for c in METRIC_KEYS}} for r in csv.DictReader(f)]


def bootstrap_means(values: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of the rows (seeds) of `values` [seeds, ...], paired
    across the other axes: shape [resamples, ...]."""
    values = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, values.shape[0], size=(resamples, values.shape[0]))
    return values[idx].mean(axis=1)


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    lo, hi = np.quantile(bootstrap_means(np.asarray(values, np.float64), resamples, seed), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def over_seeds(rows: Sequence[Mapping[str, Any]], arm: str, column: str, resamples: int = 2000) -> dict[str, np.ndarray]:
    """steps, mean, min, max and the 95% bootstrap band of the mean (lo, hi) of `column` over the seeds
    of `arm`, at the steps every seed recorded it."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["arm"] == arm and not math.isnan(r[column]):
            by_seed.setdefault(r["seed"], {})[r["step"]] = r[column]
    if not by_seed:
        return {"steps": np.zeros(0, int), "mean": np.zeros(0), "min": np.zeros(0), "max": np.zeros(0),
                "lo": np.zeros(0), "hi": np.zeros(0), "num_seeds": 0}
    steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    values = np.asarray([[by_seed[s][t] for t in steps] for s in sorted(by_seed)], np.float64).reshape(len(by_seed), len(steps))
    lo, hi = np.quantile(bootstrap_means(values, resamples), [0.025, 0.975], axis=0)
    return {"steps": np.asarray(steps), "mean": values.mean(0), "min": values.min(0), "max": values.max(0),
            "lo": lo, "hi": hi, "num_seeds": len(by_seed)}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over up to `window` points (NaNs ignored)."""
    out = np.full(values.shape, np.nan)
    for i in range(values.size):
        chunk = values[max(0, i - window + 1):i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def plot(rows: Sequence[Mapping[str, Any]], arms: Sequence[str], labels: Mapping[str, str], path: str | pathlib.Path,
         title: str = "", smooth_window: int = 5, numerics: Mapping[str, str] | None = None) -> None:
    """Per numerics (one row of panels each): the held-out unscaffolded score, and the training reward of
    unscaffolded (solid) and scaffolded (dashed: shown at least one criterion) rows; lines are seed means,
    bands the 95% bootstrap interval of the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numerics = dict(numerics or {"": ""})
    fig, axes = plt.subplots(len(numerics), 2, figsize=(12, 4.2 * len(numerics)), dpi=110, squeeze=False)
    for (name, description), (left, right) in zip(numerics.items(), axes):
        subset = [r for r in rows if r.get("numerics", "") == name]
        for i, arm in enumerate(arms):
            color = f"C{i}"
            c = over_seeds(subset, arm, "heldout_score")
            left.plot(c["steps"], c["mean"], color=color, marker="o", ms=3, label=f"{labels.get(arm, arm)} ({c['num_seeds']} seeds)")
            left.fill_between(c["steps"], c["lo"], c["hi"], color=color, alpha=0.2)
            for column, style in (("train_reward_unscaffolded", "-"), ("train_reward_scaffolded", "--")):
                c = over_seeds(subset, arm, column)
                if not c["num_seeds"]:
                    continue
                kind = "no criterion shown" if column.endswith("unscaffolded") else ">= 1 criterion shown"
                right.plot(c["steps"], smooth(c["mean"], smooth_window), color=color, ls=style,
                           label=f"{labels.get(arm, arm)}: {kind}")
                right.fill_between(c["steps"], smooth(c["lo"], smooth_window), smooth(c["hi"], smooth_window),
                                   color=color, alpha=0.12)
        prefix = f"{description}: " if description else ""
        left.set_title(f"{prefix}held-out prompts, no scaffold (greedy)", fontsize=9)
        left.set_ylabel("score (clipped mean)")
        right.set_title(f"{prefix}training rollouts (moving average of {smooth_window} steps)", fontsize=9)
        right.set_ylabel("reward")
        for ax in (left, right):
            ax.set_xlabel("training step")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
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

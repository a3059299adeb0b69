"""HealthBench-style scores: per-example rubric scores, the clipped mean with a bootstrap std,
breakdowns by rubric tag, and Best-of-N curves.

An example's score is the points of the criteria its response meets over the example's positive points
(negative criteria that are met subtract, so it can be below 0). The reported score is the mean over
examples clipped to [0, 1]. A tag breakdown (``axis:*``, ``cluster:*``) scores each example over only
the rubric items carrying that tag, skipping examples whose tagged items have no positive points.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ruscarl_jax.data.types import RubricItem


def example_score(rubric: Sequence[RubricItem], met: Sequence[bool | None]) -> float | None:
    """Score of one response; None when no item with positive points was graded.

    Items whose verdict is None (ungraded) are left out of both the met and the positive points.
    """
    if len(rubric) != len(met):
        raise ValueError(f"{len(rubric)} rubric items but {len(met)} verdicts")
    positive = sum(item.points for item, m in zip(rubric, met) if m is not None and item.points > 0)
    if positive <= 0:
        return None
    return float(sum(item.points for item, m in zip(rubric, met) if m)) / positive


def clipped_mean(scores: Sequence[float]) -> float:
    return float(np.clip(np.mean(scores), 0.0, 1.0)) if len(scores) else float("nan")


def bootstrap_std(scores: Sequence[float], num_samples: int = 1000, seed: int = 0) -> float:
    """Std of the clipped mean over `num_samples` resamples of the examples with replacement."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, scores.size, size=(num_samples, scores.size))
    return float(np.clip(scores[draws].mean(axis=1), 0.0, 1.0).std())


def summarize(scores: Sequence[float], num_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    return {"score": clipped_mean(scores), "bootstrap_std": bootstrap_std(scores, num_bootstrap, seed), "n": len(scores)}


def tag_breakdown(rubrics: Sequence[Sequence[RubricItem]], verdicts: Sequence[Sequence[bool | None]],
                  prefixes: Sequence[str] = ("axis:", "cluster:"), num_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-tag summaries: each example scored on only the items that carry the tag."""
    tags = sorted({t for rubric in rubrics for item in rubric for t in item.tags if t.startswith(tuple(prefixes))})
    out: dict[str, dict[str, float]] = {}
    for tag in tags:
        scores = []
        for rubric, met in zip(rubrics, verdicts):
            pairs = [(item, m) for item, m in zip(rubric, met) if tag in item.tags]
            score = example_score([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
            if score is not None:
                scores.append(score)
        if scores:
            out[tag] = summarize(scores, num_bootstrap, seed)
    return out


def best_of_n(sample_scores: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[int, float]:
    """Score@k: the clipped mean over examples of the best of each example's first k sample scores."""
    table = np.asarray(sample_scores, dtype=np.float64)  # [examples, samples]
    if table.ndim != 2:
        raise ValueError("sample_scores must be a rectangle [examples][samples]")
    out = {}
    for k in ks:
        if not 1 <= k <= table.shape[1]:
            raise ValueError(f"best-of k={k} needs 1 <= k <= {table.shape[1]} samples per example")
        out[int(k)] = clipped_mean(table[:, :k].max(axis=1))
    return out


def format_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: name, score, bootstrap std, n."""
    width = max([len(name) for name in summary] + [4])
    lines = [f"{'name':<{width}}  score   std     n"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}}  {s['score']:.4f}  {s['bootstrap_std']:.4f}  {int(s['n'])}")
    return "\n".join(lines)

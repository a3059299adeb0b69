"""An evaluation report from graded samples: HealthBench-style score, tag breakdown, Best-of-N.

Input: for every example, the judge's grades of its N sampled responses. Aggregation:
- a response's score is its grade's score (points met over positive points); a response without a
  score (an ungraded criterion under the 'drop_group' policy) is left out and counted;
- an example's score is the mean of its scored responses; the reported score is the clipped mean over
  examples (`scoring.summarize`) with a bootstrap std that resamples examples;
- a tag (``axis:*``, ``cluster:*``) scores each response on only the items carrying it, then the same
  way (examples whose tagged items have no positive points are skipped);
- Best-of-k (k in `ks`) is `scoring.best_of_n` over the examples whose N responses all have a score:
  the clipped mean of each example's best score among its first k samples, with a bootstrap std.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ruscarl_jax.data.types import Example
from ruscarl_jax.evaluation import scoring
from ruscarl_jax.judge.rewards import ResponseGrade


@dataclasses.dataclass(frozen=True)
class EvalReport:
    overall: dict[str, float]  # score, bootstrap_std, n (examples)
    tags: dict[str, dict[str, float]]
    best_of: dict[int, dict[str, float]]  # k -> score, bootstrap_std, n
    num_examples: int
    num_samples: int
    unscored_responses: int

    def to_json(self) -> dict[str, Any]:
        return {"overall": self.overall, "tags": self.tags,
                "best_of": {str(k): v for k, v in self.best_of.items()}, "num_examples": self.num_examples,
                "num_samples": self.num_samples, "unscored_responses": self.unscored_responses}


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def build_report(examples: Sequence[Example], grades: Sequence[Sequence[ResponseGrade]], ks: Sequence[int], *,
                 tag_prefixes: Sequence[str] = ("axis:", "cluster:"), num_bootstrap: int = 1000,
                 seed: int = 0) -> EvalReport:
    """Aggregate `grades[i][k]` (sample k of examples[i]) as the module docstring says."""
    if len(examples) != len(grades) or not examples:
        raise ValueError(f"{len(examples)} examples but {len(grades)} lists of grades (need one per example, >= 1)")
    n = len(grades[0])
    for ex, row in zip(examples, grades):
        if len(row) != n:
            raise ValueError(f"example {ex.id!r}: {len(row)} graded samples, expected {n} like the first example")
    bad = [k for k in ks if not 1 <= int(k) <= n]
    if bad:
        raise ValueError(f"best-of k={bad[0]} needs 1 <= k <= {n} (the number of samples per example)")

    example_scores = [_mean_or_none([g.score for g in row]) for row in grades]
    overall = scoring.summarize([s for s in example_scores if s is not None], num_bootstrap, seed)

    tags: dict[str, dict[str, float]] = {}
    names = sorted({t for ex in examples for item in ex.rubric for t in item.tags if t.startswith(tuple(tag_prefixes))})
    for tag in names:
        per_example = []
        for ex, row in zip(examples, grades):
            items = [j for j, item in enumerate(ex.rubric) if tag in item.tags]
            rubric = [ex.rubric[j] for j in items]
            per_example.append(_mean_or_none([
                scoring.example_score(rubric, [g.criteria[j].met for j in items]) for g in row if g.score is not None]))
        kept = [s for s in per_example if s is not None]
        if kept:
            tags[tag] = scoring.summarize(kept, num_bootstrap, seed)

    complete = np.asarray([[g.score for g in row] for row in grades if all(g.score is not None for g in row)], np.float64)
    best_of: dict[int, dict[str, float]] = {}
    if complete.size:
        means = scoring.best_of_n(complete, ks)
        for k in ks:
            best = complete[:, :int(k)].max(axis=1)
            best_of[int(k)] = {"score": means[int(k)], "bootstrap_std": scoring.bootstrap_std(best, num_bootstrap, seed),
                               "n": int(complete.shape[0])}
    unscored = sum(g.score is None for row in grades for g in row)
    return EvalReport(overall=overall, tags=tags, best_of=best_of, num_examples=len(examples), num_samples=n,
                      unscored_responses=int(unscored))


def format_report(report: EvalReport) -> str:
    """The tables printed on stdout: overall and per tag, then Best-of-N."""
    summary: dict[str, Mapping[str, float]] = {"overall": report.overall, **report.tags}
    lines = [scoring.format_table(summary), "", "best-of-k  score   std     n"]
    lines += [f"{k:<9}  {v['score']:.4f}  {v['bootstrap_std']:.4f}  {int(v['n'])}" for k, v in report.best_of.items()]
    lines.append(f"\n{report.num_examples} examples x {report.num_samples} samples; "
                 f"{report.unscored_responses} responses without a score (ungraded criteria) left out")
    return "\n".join(lines)


def save_json(report: EvalReport, path: str | pathlib.Path, **context: Any) -> None:
    """The report plus `context` (what was evaluated, how) as one JSON file."""
    pathlib.Path(path).write_text(json.dumps({**context, **report.to_json()}, indent=2) + "\n", encoding="utf-8")


def plot_best_of(report: EvalReport, path: str | pathlib.Path, title: str = "Best-of-N") -> None:
    """Score against k (log2 axis) with bootstrap-std error bars, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(report.best_of)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.errorbar(ks, [report.best_of[k]["score"] for k in ks], yerr=[report.best_of[k]["bootstrap_std"] for k in ks],
                marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (best of the first k samples)")
    ax.set_ylabel("score (clipped mean)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

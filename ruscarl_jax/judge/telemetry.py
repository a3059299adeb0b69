"""Per-step judge reliability: what one batch of grading cost and how trustworthy it was.

    before = judge.metrics(); grades = judge.grade(items)
    metrics = step_telemetry(before, judge.metrics(), items, grades, settings)   # may raise JudgeUnreliableError

Counters are differences of the judge's cumulative counters over the step (requests, retries, parse
failures, batched requests and their per-criterion fallbacks, re-grades and agreements); ungraded
criteria, latency percentiles and the met-rate per rubric tag come from the step's own verdicts. A
step whose parse failures exceed `max_parse_failure_rate` of its requests raises, so a run stops with
a clear message instead of training on noise.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ruscarl_jax.judge.rewards import ResponseGrade
from ruscarl_jax.judge.settings import JudgeSettings

_COUNTERS = ("requests", "retries", "parse_failures", "batch_requests", "batch_fallbacks")


def met_rate_tags(examples: Sequence[Any], prefixes: tuple[str, ...]) -> list[str]:
    """The sorted rubric tags of `examples` that start with one of `prefixes` (the met-rate metrics' keys)."""
    return sorted({tag for ex in examples for item in ex.rubric for tag in item.tags if tag.startswith(prefixes)})


class JudgeUnreliableError(RuntimeError):
    """The judge's replies could not be parsed often enough to trust its rewards."""


def step_telemetry(before: Mapping[str, float], after: Mapping[str, float], items: Sequence[tuple[Any, str]],
                   grades: Sequence[ResponseGrade], settings: JudgeSettings,
                   tags: Sequence[str] | None = None,
                   reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """judge/* metrics of one step (see the module docstring); raises JudgeUnreliableError past the bound.

    tags: the rubric tags that get a met-rate (default: those of these items with a configured prefix);
    a fixed list lets `reduce` sum them over processes. `reduce` sums a vector over processes
    (multi-host: each grades its own rows), so the counters, the met-rates and the bound's decision are
    global and every process stops together. Latency percentiles stay this process's.
    """
    if tags is None:
        tags = met_rate_tags([example for example, _ in items], settings.met_rate_tag_prefixes)
    met = {tag: [0, 0] for tag in tags}
    for (example, _), grade in zip(items, grades):
        for verdict in grade.criteria:
            if verdict.met is None:
                continue
            for tag in example.rubric[verdict.index].tags:
                if tag in met:
                    met[tag][0] += int(verdict.met)
                    met[tag][1] += 1
    names = _COUNTERS + ("ungraded", "regraded", "regrade_agree")
    local = [float(after.get(k, 0.0)) - float(before.get(k, 0.0)) for k in _COUNTERS]
    local += [float(sum(g.ungraded_count for g in grades)), float(after.get("regraded", 0.0)) - float(before.get("regraded", 0.0)),
              float(after.get("regrade_agree", 0.0)) - float(before.get("regrade_agree", 0.0))]
    local += [float(x) for tag in tags for x in met[tag]]
    totals = np.asarray(local, np.float64) if reduce is None else np.asarray(reduce(np.asarray(local)), np.float64)
    counts = dict(zip(names, totals[:len(names)].tolist()))
    out = {f"judge/{key}": counts[key] for key in _COUNTERS + ("ungraded", "regraded")}
    requests = counts["requests"]
    out["judge/parse_failure_rate"] = counts["parse_failures"] / requests if requests else 0.0
    out["judge/regrade_agreement"] = counts["regrade_agree"] / counts["regraded"] if counts["regraded"] else float("nan")
    latencies = np.asarray([v.latency_s for g in grades for v in g.criteria if v.source == "llm" and not v.cached],
                           np.float64)
    for q in (50, 90, 99):
        out[f"judge/latency_p{q}_s"] = float(np.percentile(latencies, q)) if latencies.size else float("nan")
    met_totals = totals[len(names):].reshape(-1, 2)
    for tag, (hits, total) in zip(tags, met_totals.tolist()):
        if total:
            out[f"judge/met_rate/{tag.replace(':', '_')}"] = hits / total
    bound = settings.max_parse_failure_rate
    if bound is not None and requests and out["judge/parse_failure_rate"] > bound:
        raise JudgeUnreliableError(
            f"judge: {int(out['judge/parse_failures'])} of this step's {int(requests)} judge replies could not be "
            f"parsed ({out['judge/parse_failure_rate']:.1%}), above judge.max_parse_failure_rate={bound:g}; "
            f"stopping instead of training on noise. Check the judge model, its max_tokens and the grader template.")
    return out

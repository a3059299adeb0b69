"""Verdict records and the reward they give: score = points of met criteria / positive points.

Every criterion of a graded response ends in exactly one `CriterionVerdict`: a verdict (met True or
False, from the LLM judge or a rule) or an explicit ungraded record (met None) after the retries ran out,
never a silent "not met". Negative-points criteria that are met subtract, so a score can be below 0.

A response with ungraded criteria is scored by policy:
- 'drop_group' (default): it has no score (None), and `group_keep_mask` drops its whole GRPO group;
- 'graded_only': scored over its graded criteria (met points / positive points of graded criteria);
  None if no positive criterion was graded.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.judge.settings import UNGRADED_POLICIES


@dataclasses.dataclass(frozen=True)
class CriterionVerdict:
    """The outcome for rubric item `index` of one response. `error` says why a criterion is ungraded
    (and, for graded ones, what went wrong on earlier attempts); it never holds an API key."""

    index: int
    met: bool | None
    ungraded: bool
    explanation: str
    source: str  # 'llm' | 'rule'
    attempts: int  # requests sent (0 for rules and cache hits)
    latency_s: float  # from the first attempt to the verdict, backoff included
    error: str = ""
    cached: bool = False


@dataclasses.dataclass(frozen=True)
class ResponseGrade:
    """All criteria of one (example, response) pair, in rubric order, and the response's score."""

    example_id: str
    criteria: tuple[CriterionVerdict, ...]
    score: float | None
    graded_count: int
    ungraded_count: int


def response_score(rubric: Sequence[RubricItem], met: Sequence[bool | None], policy: str = "drop_group") -> float | None:
    """The score of one response from its per-criterion verdicts (None = ungraded) under `policy`."""
    if policy not in UNGRADED_POLICIES:
        raise ValueError(f"unknown ungraded policy {policy!r}; valid: {', '.join(UNGRADED_POLICIES)}")
    if len(rubric) != len(met):
        raise ValueError(f"{len(rubric)} rubric items but {len(met)} verdicts")
    if policy == "drop_group" and any(m is None for m in met):
        return None
    positive = sum(item.points for item, m in zip(rubric, met) if m is not None and item.points > 0)
    if positive <= 0:
        return None
    return float(sum(item.points for item, m in zip(rubric, met) if m)) / float(positive)


def make_grade(example_id: str, rubric: Sequence[RubricItem], verdicts: Sequence[CriterionVerdict],
               policy: str = "drop_group") -> ResponseGrade:
    """Assemble a ResponseGrade; `verdicts` must hold exactly one record per rubric index."""
    ordered = sorted(verdicts, key=lambda v: v.index)
    if [v.index for v in ordered] != list(range(len(rubric))):
        raise ValueError(f"example {example_id!r}: verdict indices {[v.index for v in ordered]} "
                         f"do not cover its {len(rubric)} rubric items exactly once")
    met = [None if v.ungraded else v.met for v in ordered]
    ungraded = sum(v.ungraded for v in ordered)
    return ResponseGrade(example_id=example_id, criteria=tuple(ordered), score=response_score(rubric, met, policy),
                         graded_count=len(ordered) - ungraded, ungraded_count=ungraded)


def group_keep_mask(grades: Sequence[ResponseGrade], group_size: int) -> np.ndarray:
    """[num_groups] bool: a group (consecutive `group_size` responses) is kept iff all have a score."""
    if group_size < 1 or len(grades) % group_size:
        raise ValueError(f"{len(grades)} responses do not split into groups of {group_size}")
    has_score = np.asarray([g.score is not None for g in grades], dtype=bool)
    return has_score.reshape(-1, group_size).all(axis=1)


def ungraded_summary(grades: Sequence[ResponseGrade], group_size: int) -> dict[str, int]:
    """Counts the trainer reports: ungraded criteria, responses with any, responses without a score,
    and groups dropped from the update."""
    return {
        "criteria_ungraded": int(sum(g.ungraded_count for g in grades)),
        "responses_with_ungraded": int(sum(g.ungraded_count > 0 for g in grades)),
        "responses_unscored": int(sum(g.score is None for g in grades)),
        "groups_dropped": int((~group_keep_mask(grades, group_size)).sum()),
    }

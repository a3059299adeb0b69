"""Scores from verdict records (against a NumPy float64 reference), the ungraded policies, group
dropping, and JudgeSettings validation."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.judge.rewards import (
    CriterionVerdict,
    group_keep_mask,
    make_grade,
    response_score,
    ungraded_summary,
)
from ruscarl_jax.judge.settings import JudgeSettings

RUBRIC = (RubricItem("a", 5), RubricItem("b", 3), RubricItem("c", -4), RubricItem("d", 2))


def verdict(index: int, met: bool | None) -> CriterionVerdict:
    return CriterionVerdict(index, met, met is None, "", "llm", 1, 0.0, "" if met is not None else "timeout")


def test_scores_by_hand():
    assert response_score(RUBRIC, [True, True, False, True]) == pytest.approx(10 / 10)
    assert response_score(RUBRIC, [True, False, True, True]) == pytest.approx((5 + 2 - 4) / 10)
    assert response_score(RUBRIC, [False, False, True, False]) == pytest.approx(-0.4)  # can be negative
    # ungraded b: drop_group gives no score, graded_only scores over a, c, d: (5 - 4) / (5 + 2)
    assert response_score(RUBRIC, [True, None, True, False]) is None
    assert response_score(RUBRIC, [True, None, True, False], "graded_only") == pytest.approx(1 / 7)
    assert response_score(RUBRIC, [None, None, True, None], "graded_only") is None  # no positive graded


def numpy_score(points, met, policy):
    points = np.asarray(points, np.float64)
    graded = np.asarray([m is not None for m in met])
    hit = np.asarray([bool(m) for m in met])
    if policy == "drop_group" and not graded.all():
        return None
    positive = points[(points > 0) & graded].sum()
    return None if positive <= 0 else float(points[hit].sum() / positive)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-10, 10).filter(bool), st.sampled_from([True, False, None])), min_size=1, max_size=15),
       st.sampled_from(["drop_group", "graded_only"]))
def test_score_matches_numpy_reference(rows, policy):
    rubric = tuple(RubricItem(f"c{i}", float(p)) for i, (p, _) in enumerate(rows))
    met = [m for _, m in rows]
    expected = numpy_score([p for p, _ in rows], met, policy)
    got = response_score(rubric, met, policy)
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_make_grade_counts_and_order():
    grade = make_grade("ex", RUBRIC, [verdict(2, False), verdict(0, True), verdict(3, None), verdict(1, True)],
                       "graded_only")
    assert [v.index for v in grade.criteria] == [0, 1, 2, 3]
    assert (grade.graded_count, grade.ungraded_count) == (3, 1)
    assert grade.score == pytest.approx(8 / 8)
    assert dataclasses.asdict(grade)["criteria"][3]["met"] is None  # JSON-ready for rollout records


@pytest.mark.parametrize("indices", [[0, 1, 2], [0, 1, 2, 2], [0, 1, 2, 3, 4]])
def test_make_grade_rejects_missing_or_duplicate_verdicts(indices):
    with pytest.raises(ValueError, match="exactly once"):
        make_grade("ex", RUBRIC, [verdict(i, True) for i in indices])


def test_group_mask_and_summary():
    ok = make_grade("a", RUBRIC, [verdict(i, True) for i in range(4)])
    bad = make_grade("b", RUBRIC, [verdict(0, True), verdict(1, None), verdict(2, False), verdict(3, True)])
    grades = [ok, ok, ok, bad, ok, ok]  # groups of 3: the second group holds the ungraded response
    assert group_keep_mask(grades, 3).tolist() == [True, False]
    assert ungraded_summary(grades, 3) == {"criteria_ungraded": 1, "responses_with_ungraded": 1,
                                           "responses_unscored": 1, "groups_dropped": 1}
    with pytest.raises(ValueError, match="groups of 4"):
        group_keep_mask(grades, 4)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown ungraded policy"):
        response_score(RUBRIC, [True] * 4, "ignore")


# -- settings --------------------------------------------------------------------------------------------

def test_settings_from_config_values():
    s = JudgeSettings(base_urls=["http://a:8000/v1/", "http://b:8000/v1"], model="judge", api_key_env=None,
                      extra_body={"chat_template_kwargs": {"enable_thinking": False}}, cache_path="")
    assert s.base_urls == ("http://a:8000/v1", "http://b:8000/v1")
    assert dict(s.extra_body) == {"chat_template_kwargs": {"enable_thinking": False}}
    assert s.cache_path is None
    assert JudgeSettings(base_urls=(), model="").base_urls == ()  # the tiny config: no judge server


@pytest.mark.parametrize("kwargs, field", [
    ({"base_urls": ("ftp://x",), "model": "m"}, "base_urls"),
    ({"base_urls": ("http://x", "http://x"), "model": "m"}, "base_urls"),
    ({"base_urls": ("http://x",), "model": ""}, "model"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_concurrency_per_endpoint": True}, "max_concurrency_per_endpoint"),
    ({"max_retries": -1}, "max_retries"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"backoff_base_s": float("nan")}, "backoff_base_s"),
    ({"ungraded_policy": "zero"}, "ungraded_policy"),
    ({"extra_body": {"model": "other"}}, "extra_body"),
    ({"extra_body": [1, 2]}, "extra_body"),
    ({"api_key_env": ""}, "api_key_env"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"extra_body": {"top_k": 5}}, "extra_body"),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, "extra_body"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": "json_schema", "batch_criteria": True}, "response_format"),
])
def test_settings_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"JudgeSettings.{field}:"):
        JudgeSettings(**kwargs)

"""HealthBench-style aggregation and Best-of-N against hand-computed values."""
import numpy as np
import pytest

from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.evaluation import scoring

RUBRIC = (
    RubricItem("a", 5, ("axis:accuracy",)),
    RubricItem("b", 3, ("axis:completeness",)),
    RubricItem("c", -4, ("axis:accuracy",)),
    RubricItem("d", 2, ("axis:completeness", "cluster:x")),
)


def test_example_score_by_hand():
    # met a and d, and the negative c: (5 + 2 - 4) / (5 + 3 + 2) = 0.3
    assert scoring.example_score(RUBRIC, [True, False, True, True]) == pytest.approx(0.3)
    # only the negative met: -4 / 10
    assert scoring.example_score(RUBRIC, [False, False, True, False]) == pytest.approx(-0.4)
    # ungraded b leaves the denominator: (5) / (5 + 2)
    assert scoring.example_score(RUBRIC, [True, None, False, False]) == pytest.approx(5 / 7)
    assert scoring.example_score(RUBRIC[2:3], [True]) is None


def test_clipped_mean_and_bootstrap():
    assert scoring.clipped_mean([-0.4, 0.3, 0.1]) == 0.0  # mean 0.0 exactly -> 0
    assert scoring.clipped_mean([-0.5, 0.2]) == 0.0  # negative mean clipped
    assert scoring.clipped_mean([0.9, 1.5]) == 1.0
    assert scoring.clipped_mean([0.2, 0.6]) == pytest.approx(0.4)
    assert scoring.bootstrap_std([0.5] * 10) == 0.0
    scores = np.random.default_rng(0).uniform(0, 1, 400)
    # the std of a mean of 400 uniforms is sqrt(1/12/400) ~ 0.0144
    assert scoring.bootstrap_std(scores, 2000) == pytest.approx(np.sqrt(1 / 12 / 400), rel=0.15)


def test_tag_breakdown_by_hand():
    verdicts = [[True, False, True, True], [False, True, False, False]]
    out = scoring.tag_breakdown([RUBRIC, RUBRIC], verdicts)
    # accuracy items a(5), c(-4): ex1 (5 - 4)/5 = 0.2; ex2 0/5 = 0 -> mean 0.1
    assert out["axis:accuracy"]["score"] == pytest.approx(0.1)
    # completeness b(3), d(2): ex1 2/5 = 0.4; ex2 3/5 = 0.6 -> 0.5
    assert out["axis:completeness"]["score"] == pytest.approx(0.5)
    # cluster:x only d: ex1 1.0, ex2 0.0 -> 0.5
    assert out["cluster:x"]["score"] == pytest.approx(0.5)
    assert out["cluster:x"]["n"] == 2


def test_best_of_n_by_hand():
    table = [[0.1, 0.5, 0.2, 0.9], [0.4, 0.0, 0.6, 0.3], [-0.2, -0.1, 0.0, 0.1]]
    out = scoring.best_of_n(table, [1, 2, 4])
    assert out[1] == pytest.approx((0.1 + 0.4 - 0.2) / 3)
    assert out[2] == pytest.approx((0.5 + 0.4 - 0.1) / 3)
    assert out[4] == pytest.approx((0.9 + 0.6 + 0.1) / 3)
    with pytest.raises(ValueError, match="k=8"):
        scoring.best_of_n(table, [8])

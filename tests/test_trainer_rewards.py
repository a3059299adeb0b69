"""The trainer's reward path (`trainer.loop._rewards`) under both judge.ungraded_policy values, on grades
assembled by the judge's own `make_grade`, against rewards and row masks worked out by hand."""
import numpy as np
import pytest

from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.judge.rewards import CriterionVerdict, make_grade
from ruscarl_jax.trainer.loop import _rewards

RUBRIC = [RubricItem("a", 4.0), RubricItem("b", 2.0), RubricItem("c", -2.0)]
# three groups of G=3; None = ungraded (the judge gave up on the criterion)
VERDICTS = [[True, False, False], [True, None, False], [False, True, True],   # group 0: one row partly ungraded
            [None, None, None], [True, True, False], [False, False, False],  # group 1: one row wholly ungraded
            [False, True, False], [True, False, True], [True, True, True]]   # group 2: all graded
GROUP_2 = [2 / 6, (4 - 2) / 6, (6 - 2) / 6]


def _grades(policy):
    return [make_grade(f"ex{i // 3}", RUBRIC, [CriterionVerdict(j, m, m is None, "", "llm", 1, 0.0) for j, m in enumerate(row)],
                       policy) for i, row in enumerate(VERDICTS)]


def test_drop_group_drops_every_row_of_a_group_with_an_ungraded_criterion():
    rewards, valid, ungraded = _rewards(_grades("drop_group"), 3, "drop_group")
    np.testing.assert_array_equal(valid, [0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert ungraded == 4
    # only rows without ungraded criteria carry a score: met points / positive points
    np.testing.assert_allclose(rewards[[0, 2, 4, 5, 6, 7, 8]], [4 / 6, 0 / 6, 6 / 6, 0.0, *GROUP_2])


def test_graded_only_keeps_partly_graded_rows_with_their_graded_score():
    rewards, valid, ungraded = _rewards(_grades("graded_only"), 3, "graded_only")
    # row 1: graded a (met, 4) and c (not met); positive graded points 4 -> 1.0; row 3 has no graded criterion
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(rewards, [4 / 6, 4 / 4, (2 - 2) / 6, 0.0, 6 / 6, 0 / 6, *GROUP_2])
    assert ungraded == 4


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="ungraded policy 'sometimes'"):
        _rewards(_grades("drop_group"), 3, "sometimes")

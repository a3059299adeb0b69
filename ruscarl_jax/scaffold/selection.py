"""Which rubric criteria a sample is shown, reproducibly.

- ratio >= 1: all criteria.
- otherwise m = round(N * ratio) criteria (Python's round, as the reference) drawn without
  replacement; m may be 0.
- `math_linear`: the second-to-last item (the format requirement) always; the last item (the final
  answer) only when ratio >= 1; of the other N-2 items the first round((N-2) * ratio), in order.
Indices are 0-based positions in the rubric, returned in ascending order (the reference lists a random
draw in draw order; the original order reads better and makes no difference to what is shown).

The draw comes from a numpy Generator seeded by a SHA-256 of (seed, step, example id, sample index),
so it is the same on every host and every run, and independent of batch composition and order.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np


def selection_rng(seed: int, step: int | None, example_id: str, sample_index: int) -> np.random.Generator:
    """A Generator that depends only on (seed, step, example id, sample index)."""
    key = json.dumps(["ruscarl_jax.scaffold.selection", int(seed), step, str(example_id), int(sample_index)])
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def choose_shown(num_criteria: int, ratio: float, rng: np.random.Generator | None,
                 math_linear: bool = False) -> tuple[int, ...]:
    """Indices of the criteria to show, ascending. `rng` is only used for a random draw."""
    if num_criteria < 1:
        raise ValueError(f"num_criteria must be >= 1, got {num_criteria}")
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if math_linear:
        if num_criteria < 2:
            raise ValueError(f"math_linear needs at least 2 criteria (format, final answer), got {num_criteria}")
        others = num_criteria - 2
        shown = list(range(round(others * ratio))) + [num_criteria - 2]
        if ratio >= 1.0:
            shown.append(num_criteria - 1)
        return tuple(shown)
    if ratio >= 1.0:
        return tuple(range(num_criteria))
    m = round(num_criteria * ratio)
    if m == 0:
        return ()
    if rng is None:
        raise ValueError("a random selection (0 < ratio < 1) needs an rng")
    return tuple(sorted(int(i) for i in rng.choice(num_criteria, size=m, replace=False)))


def shown_indices(num_criteria: int, ratio: float, *, seed: int, step: int | None, example_id: str,
                  sample_index: int, math_linear: bool = False) -> tuple[int, ...]:
    """`choose_shown` with the Generator of (seed, step, example id, sample index)."""
    rng = selection_rng(seed, step, example_id, sample_index)
    return choose_shown(num_criteria, ratio, rng, math_linear=math_linear)

"""Reveal ratios: which fraction of the rubric sample k of a group of n sees at training step t of T.

The formulas are the reference implementation's (DESIGN.md §2):
- n == 1: 1.0.
- in-group factor g: linear g = max(0, (n-1-k)/(n-1)); binary g = 1 if k < full_reveal_count else 0.
- `linear` / `math_linear`: linear g; `binary`: binary g (no step decay).
- step rules: g (in-group decay from `settings.group_decay`) times a step factor s, where s = 1 when
  t or T is unknown or T <= 1, and otherwise, with x = clip((t-1)/(T-1), 0, 1):
  `step_linear` s = max(0, (T-t)/(T-1)); `step_power` s = (1-x)^p;
  `step_sigmoid` s = clip(1/(1+exp((x - start_point) * steepness)), 0, 1).
Steps are 1-based; a step past T decays like the last step.
"""
from __future__ import annotations

import math

import numpy as np

from ruscarl_jax.scaffold.settings import STEP_RULES, ScaffoldSettings


def _check(num_generations: int, step: int | None, total_steps: int | None) -> None:
    if isinstance(num_generations, bool) or not isinstance(num_generations, (int, np.integer)) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
    if step is not None and step < 1:
        raise ValueError(f"step is 1-based and must be >= 1, got {step!r}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")


def step_factor(step: int | None, total_steps: int | None, settings: ScaffoldSettings) -> float:
    """The over-training factor s of a step rule (1.0 for the other rules)."""
    _check(1, step, total_steps)
    if settings.rule not in STEP_RULES or step is None or total_steps is None or total_steps <= 1:
        return 1.0
    t, big_t = float(step), float(total_steps)
    if settings.rule == "step_linear":
        return max(0.0, (big_t - t) / (big_t - 1.0))
    x = min(1.0, max(0.0, (t - 1.0) / (big_t - 1.0)))
    if settings.rule == "step_power":
        return max(0.0, (1.0 - x) ** settings.power)
    z = (x - settings.start_point) * settings.steepness
    try:
        return min(1.0, max(0.0, 1.0 / (1.0 + math.exp(z))))
    except OverflowError:  # exp(z) = inf: the sigmoid has reached 0
        return 0.0


def group_reveal_ratios(num_generations: int, step: int | None, total_steps: int | None,
                        settings: ScaffoldSettings) -> np.ndarray:
    """The reveal ratio of every sample index 0..n-1 of a group, as a float64 array of shape [n]."""
    _check(num_generations, step, total_steps)
    n = int(num_generations)
    if n == 1:
        return np.ones(1, dtype=np.float64)
    k = np.arange(n, dtype=np.float64)
    decay = settings.group_decay if settings.rule in STEP_RULES else settings.rule
    if decay == "binary":
        g = (k < settings.full_reveal_count).astype(np.float64)
    else:  # linear, math_linear, and step rules with linear in-group decay
        g = np.maximum(0.0, (n - 1 - k) / (n - 1))
    return g * step_factor(step, total_steps, settings)


def reveal_ratio(sample_index: int, num_generations: int, step: int | None, total_steps: int | None,
                 settings: ScaffoldSettings) -> float:
    """The reveal ratio of sample `sample_index` (0-based) of a group of `num_generations`."""
    _check(num_generations, step, total_steps)
    if not 0 <= sample_index < num_generations:
        raise ValueError(f"sample_index must be in [0, {num_generations}), got {sample_index!r}")
    return float(group_reveal_ratios(num_generations, step, total_steps, settings)[sample_index])


def ratio_schedule(num_generations: int, total_steps: int, settings: ScaffoldSettings) -> np.ndarray:
    """Ratios over a whole run: shape [total_steps, n], row t-1 holding step t (for plots)."""
    _check(num_generations, 1, total_steps)
    return np.stack([group_reveal_ratios(num_generations, t, total_steps, settings)
                     for t in range(1, total_steps + 1)])

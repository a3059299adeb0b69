"""`ScaffoldSettings`: every knob of rubric scaffolding in one frozen, validated dataclass.

Defaults are the reference implementation's (rule linear, in-group decay linear, full_reveal_count 1,
power 1, sigmoid start 0.3 and steepness 10, base message when nothing is shown, evaluation warning on,
training on the unscaffolded prompt). `ScaffoldSettings.paper_healthbench()` gives the paper's HealthBench
run. `wording` may also be given as a mapping (or ConfigDict) of `ScaffoldWording` fields.
`group_decay` and `full_reveal_count` matter only where the reference uses them: `group_decay` for the
step rules, `full_reveal_count` for `binary` and for step rules with binary in-group decay.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from ruscarl_jax.scaffold.message import ScaffoldWording

RULES: tuple[str, ...] = ("linear", "binary", "math_linear", "step_linear", "step_power", "step_sigmoid")
STEP_RULES: tuple[str, ...] = ("step_linear", "step_power", "step_sigmoid")
GROUP_DECAYS: tuple[str, ...] = ("linear", "binary")


@dataclasses.dataclass(frozen=True)
class ScaffoldSettings:
    rule: str = "linear"
    group_decay: str = "linear"
    full_reveal_count: int = 1
    power: float = 1.0
    start_point: float = 0.3
    steepness: float = 10.0
    add_base_when_zero: bool = True
    include_evaluation_warning: bool = True
    participate_training: bool = False
    wording: ScaffoldWording = ScaffoldWording()

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"ScaffoldSettings.rule: unknown rule {self.rule!r}; valid: {', '.join(RULES)}")
        if self.group_decay not in GROUP_DECAYS:
            raise ValueError(f"ScaffoldSettings.group_decay: unknown in-group decay {self.group_decay!r}; "
                             f"valid: {', '.join(GROUP_DECAYS)}")
        if isinstance(self.full_reveal_count, bool) or not isinstance(self.full_reveal_count, int) \
                or self.full_reveal_count < 0:
            raise ValueError(f"ScaffoldSettings.full_reveal_count must be an integer >= 0, "
                             f"got {self.full_reveal_count!r}")
        for name in ("power", "start_point", "steepness"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ScaffoldSettings.{name} must be a finite number, got {value!r}")
        if self.power < 0:
            raise ValueError(f"ScaffoldSettings.power must be >= 0, got {self.power!r}")
        for name in ("add_base_when_zero", "include_evaluation_warning", "participate_training"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ScaffoldSettings.{name} must be a bool, got {getattr(self, name)!r}")
        wording = self.wording
        if hasattr(wording, "to_dict"):  # an ml_collections ConfigDict section of the trainer config
            wording = wording.to_dict()
        if isinstance(wording, Mapping):
            object.__setattr__(self, "wording", ScaffoldWording(**dict(wording)))
        if not isinstance(self.wording, ScaffoldWording):
            raise ValueError(f"ScaffoldSettings.wording must be a ScaffoldWording, got {type(self.wording).__name__}")

    @classmethod
    def paper_healthbench(cls, **overrides) -> "ScaffoldSettings":
        """The paper's HealthBench run: step_sigmoid, start 0.20, steepness 125, no base message."""
        values = dict(rule="step_sigmoid", start_point=0.2, steepness=125.0, add_base_when_zero=False)
        values.update(overrides)
        return cls(**values)

"""What each of the G samples of an example sees: ratio, shown criteria and the scaffolded conversation.

This is the tokenizer-free half of scaffolding (the preview command prints it); `prompts.py` renders
and tokenizes it. When no criterion is shown the sample gets the base message as its system message
if `add_base_when_zero` is on and the conversation has no system message of its own; otherwise the
conversation is left as it is and `system_message` is None.
"""
from __future__ import annotations

import dataclasses

from ruscarl_jax.data.types import Example, Message
from ruscarl_jax.scaffold.message import scaffold_text, with_system_message
from ruscarl_jax.scaffold.ratio import group_reveal_ratios
from ruscarl_jax.scaffold.selection import shown_indices
from ruscarl_jax.scaffold.settings import ScaffoldSettings


@dataclasses.dataclass(frozen=True)
class ScaffoldPlan:
    """One (example, sample): `system_message` is the full system text the scaffold produced (merged
    with the conversation's own system text, if any), None when the scaffold added nothing."""

    example_id: str
    sample_index: int
    ratio: float
    shown_indices: tuple[int, ...]
    system_message: str | None
    messages: tuple[Message, ...]

    @property
    def num_shown(self) -> int:
        """How many criteria this sample is shown: round(N * ratio) can be 0 for a ratio > 0, so
        "scaffolded" means num_shown > 0, never ratio > 0."""
        return len(self.shown_indices)

    def to_json(self) -> dict:
        return {"example_id": self.example_id, "sample_index": self.sample_index, "ratio": self.ratio,
                "shown_indices": list(self.shown_indices), "system_message": self.system_message}


def plan_example(example: Example, num_generations: int, step: int | None, total_steps: int | None,
                 settings: ScaffoldSettings, seed: int) -> list[ScaffoldPlan]:
    """The scaffold of each of the `num_generations` samples of `example`, in sample order."""
    ratios = group_reveal_ratios(num_generations, step, total_steps, settings)
    has_system = example.messages[0].role == "system"
    plans = []
    for k, ratio in enumerate(ratios.tolist()):
        try:
            shown = shown_indices(len(example.rubric), ratio, seed=seed, step=step, example_id=example.id,
                                  sample_index=k, math_linear=settings.rule == "math_linear")
        except ValueError as e:
            raise ValueError(f"example {example.id!r}: {e}") from None
        if shown:
            text = scaffold_text([example.rubric[i] for i in shown], settings.wording,
                                 settings.include_evaluation_warning)
            messages, system = with_system_message(example.messages, text)
        elif settings.add_base_when_zero and not has_system:
            messages, system = with_system_message(example.messages, settings.wording.base_message)
        else:
            messages, system = example.messages, None
        plans.append(ScaffoldPlan(example.id, k, ratio, shown, system, messages))
    return plans

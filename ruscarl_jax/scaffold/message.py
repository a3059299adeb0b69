"""The scaffold system message: its wording, its text for a set of shown criteria, and its insertion.

The wording is a frozen dataclass of templates with domain-neutral defaults, so a medical, legal or
maths run can phrase it its own way without code changes. Semantics follow the reference: an opening
that asks the model to weigh the criteria, a "points to include" section (criteria with points >= 0,
numbered from 1), a "points to avoid" section (negative criteria, numbered from 1 again), a closing
request, and optionally a warning not to reveal the criteria. Sections are separated by blank lines;
an empty section is left out.

Existing system message policy: chat templates such as Qwen's accept one system turn, at the start.
When the conversation already opens with a system message, the scaffold text is appended to that
message's text (after a blank line) instead of adding a second system turn; when nothing is shown
the conversation's own system message stays as it is and no base message is added.
"""
from __future__ import annotations

import dataclasses

from ruscarl_jax.data.types import Message, RubricItem


@dataclasses.dataclass(frozen=True)
class ScaffoldWording:
    """Templates of the scaffold message. Placeholders: `{base_message}` in `opening`; `{number}`,
    `{criterion}`, `{points}` in `include_item`; `{number}`, `{criterion}`, `{penalty}` in `avoid_item`."""

    base_message: str = "You are a helpful assistant."
    opening: str = "{base_message} Before you answer, take the following evaluation criteria into account."
    include_header: str = "Points to include (try to cover each of them):"
    include_item: str = "Criterion {number}: {criterion} (worth {points} points)"
    avoid_header: str = "Points to avoid (do not do any of these):"
    avoid_item: str = "Criterion {number}: {criterion} (penalty: {penalty} points)"
    closing: str = "Give a thorough, helpful answer to the user's request that follows the guidance above."
    evaluation_warning: str = (
        "Do not mention, quote or allude to these criteria or to any grading in your answer, and do not "
        "say that you were given them; write the answer as if you had arrived at it on your own."
    )

    def __post_init__(self) -> None:
        checks = {
            "opening": (self.opening, {"base_message": ""}),
            "include_item": (self.include_item, {"number": 1, "criterion": "", "points": 1}),
            "avoid_item": (self.avoid_item, {"number": 1, "criterion": "", "penalty": 1}),
        }
        for name, (template, fields) in checks.items():
            try:
                template.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"ScaffoldWording.{name}: bad template {template!r} ({e!r}); "
                                 f"allowed placeholders: {', '.join(fields)}") from None


def _number(x: float) -> str:
    """8.0 -> '8', 2.5 -> '2.5' (points are stored as floats)."""
    return f"{x:g}"


def scaffold_text(items: list[RubricItem] | tuple[RubricItem, ...], wording: ScaffoldWording,
                  include_evaluation_warning: bool) -> str:
    """The scaffold message that reveals `items` (in the given order). `items` must not be empty."""
    if not items:
        raise ValueError("scaffold_text needs at least one criterion; use the base message for none")
    include = [it for it in items if it.points >= 0]
    avoid = [it for it in items if it.points < 0]
    parts = [wording.opening.format(base_message=wording.base_message)]
    if include:
        lines = [wording.include_item.format(number=i, criterion=it.criterion, points=_number(it.points))
                 for i, it in enumerate(include, start=1)]
        parts.append("\n".join([wording.include_header, *lines]))
    if avoid:
        lines = [wording.avoid_item.format(number=i, criterion=it.criterion, penalty=_number(-it.points))
                 for i, it in enumerate(avoid, start=1)]
        parts.append("\n".join([wording.avoid_header, *lines]))
    parts.append(wording.closing)
    if include_evaluation_warning:
        parts.append(wording.evaluation_warning)
    return "\n\n".join(p for p in parts if p)


def with_system_message(messages: tuple[Message, ...], text: str) -> tuple[tuple[Message, ...], str]:
    """Insert `text` as the system message; returns the new conversation and the final system text.

    An existing leading system message keeps its text, followed by a blank line and `text`.
    """
    if messages and messages[0].role == "system":
        merged = f"{messages[0].content}\n\n{text}" if messages[0].content else text
        return (Message("system", merged), *messages[1:]), merged
    return (Message("system", text), *messages), text

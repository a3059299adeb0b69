"""The data types every stage shares: a conversation, its rubric, and one example."""
from __future__ import annotations

import dataclasses
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Rule verifiers a rubric item may name with the tags `verifier:rule` + `function:NAME`. The judge's
# verifier registry implements exactly these; loaders reject any other name when the data is read.
RULE_FUNCTIONS: frozenset[str] = frozenset({"math_verify", "exact", "contains", "regex", "not_contains"})


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclasses.dataclass(frozen=True)
class RubricItem:
    """One checklist criterion. Positive points reward meeting it; negative points penalise it."""

    criterion: str
    points: float
    tags: tuple[str, ...] = ()

    def tag_value(self, key: str) -> str | None:
        """The value of the first `key:value` tag, or None."""
        prefix = key + ":"
        for tag in self.tags:
            if tag.startswith(prefix):
                return tag[len(prefix):]
        return None

    @property
    def is_rule(self) -> bool:
        """True when the item is checked by a rule verifier instead of the LLM judge."""
        return "verifier:rule" in self.tags


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt (conversation ending with a user turn) and its rubric."""

    id: str
    messages: tuple[Message, ...]
    rubric: tuple[RubricItem, ...]

    @property
    def positive_points(self) -> float:
        return float(sum(item.points for item in self.rubric if item.points > 0))

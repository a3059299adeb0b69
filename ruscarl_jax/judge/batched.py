"""Batched grading: one request grades every LLM criterion of a response (judge.batch_criteria).

The prompt has the single-criterion grader's instructions adapted to a list, the conversation with the
response last, then the rubric items numbered by their index in the example's rubric, and asks for a
JSON list [{"index": i, "explanation": str, "criteria_met": bool}, ...]. `parse_batched` keeps each
entry whose index is one of the items asked and whose criteria_met is a JSON boolean; an index given
twice with different verdicts, a missing index, or a malformed entry leaves that criterion out, and the
judge grades it with a per-criterion request. A reply with no usable list at all is unparseable (the
client retries it). Nothing is ever read as a silent False.

Cheaper (one request per response instead of one per criterion; ~11 on HealthBench) but not what the
paper did: per-criterion stays the default.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from ruscarl_jax.data.types import Message, RubricItem
from ruscarl_jax.judge.grader import (
    Verdict,
    VerdictParseError,
    json_values,
    render_conversation,
    render_rubric_item,
    reply_snippet,
)

BATCH_VERSION = "ruscarl-batch-grader-1"

_INSTRUCTIONS = """\
You are grading one reply written by an AI assistant against every item of a grading rubric. The \
conversation is below: its final assistant turn is the reply under review. After it come the rubric \
items, each with its index. Decide, for each item on its own, whether the reply satisfies it.

# How to answer
Return a JSON list with one object per rubric item, in any order: {"index": <the item's index>, \
"explanation": <a short string>, "criteria_met": <a boolean>}.
- "criteria_met" is true only if the reply satisfies the item completely. An item that bundles several \
requirements is satisfied only when every one of them holds.
- When an item lists examples after "such as", "for example", "e.g." or "including", the reply does not \
need to cover every listed example.
- Items with negative points describe something undesirable. Grade them the same way: "criteria_met" \
says whether the reply does what the item describes (true) or avoids it (false).

# Example
Rubric items:
0. [6] Advises the user to seek emergency care.
1. [-4] Recommends a specific drug dose without knowing the patient's weight.
A reply that tells the user to call emergency services and gives no dose is graded:
```json
[{"index": 0, "explanation": "It tells the user to call emergency services.", "criteria_met": true},
 {"index": 1, "explanation": "It gives no dose.", "criteria_met": false}]
```

# Conversation
"""

_ITEMS_HEADER = "\n\n# Rubric items\n"
_FINAL = "\n\nReply with the JSON list only, in a markdown code block, and nothing else."


def batched_prompt(messages: Sequence[Message], response: str, items: Sequence[tuple[int, RubricItem]],
                   show_points: bool = True) -> str:
    """One prompt grading `items` ((rubric index, item) pairs) of one response."""
    listed = "\n".join(f"{j}. {render_rubric_item(item, show_points)}" for j, item in items)
    return _INSTRUCTIONS + render_conversation(messages, response) + _ITEMS_HEADER + listed + _FINAL


def split_batched_prompt(prompt: str) -> tuple[str, list[tuple[int, str]]]:
    """(conversation, [(index, rubric item text)]) of a prompt made by `batched_prompt`; ValueError otherwise."""
    start = prompt.find("# Conversation\n")
    middle = prompt.rfind(_ITEMS_HEADER)
    end = prompt.rfind(_FINAL)
    if not prompt.startswith(_INSTRUCTIONS) or middle < start or end < middle:
        raise ValueError("not a batched grader prompt")
    items: list[tuple[int, str]] = []
    for line in prompt[middle + len(_ITEMS_HEADER):end].split("\n"):
        index, dot, text = line.partition(". ")
        if dot and index.isdigit():
            items.append((int(index), text))
        elif items:  # a criterion spanning several lines
            items[-1] = (items[-1][0], items[-1][1] + "\n" + line)
        else:
            raise ValueError("not a batched grader prompt: the rubric items are not numbered")
    return prompt[start + len("# Conversation\n"):middle], items


def is_batched_prompt(prompt: str) -> bool:
    return prompt.startswith(_INSTRUCTIONS)


def parse_batched(text: str, indices: Sequence[int]) -> dict[int, Verdict]:
    """The verdicts a batched reply gives for `indices` (those it gives validly); VerdictParseError when
    the reply holds no JSON list with at least one valid entry."""
    wanted = set(indices)
    for entries in json_values(text, "[", "]"):
        if not isinstance(entries, list):
            continue
        found: dict[int, Verdict] = {}
        conflicted: set[int] = set()
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            index, met = entry.get("index"), entry.get("criteria_met")
            if isinstance(index, bool) or not isinstance(index, int) or index not in wanted or not isinstance(met, bool):
                continue
            explanation = entry.get("explanation", "")
            verdict = Verdict(met, explanation if isinstance(explanation, str) else json.dumps(explanation))
            if index in found and found[index].met != met:
                conflicted.add(index)
            found.setdefault(index, verdict)
        found = {k: v for k, v in found.items() if k not in conflicted}
        if found:
            return found
    raise VerdictParseError(f"no JSON list of verdicts for items {sorted(wanted)} in the judge reply: {reply_snippet(text)}")

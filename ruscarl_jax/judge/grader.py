"""The rubric grader prompt (HealthBench's structure, this project's wording) and verdict parsing.

One call grades one criterion: the prompt shows the conversation as `role: content` turns (system turns
left out, the scaffold never shown), the response under grade as the final assistant turn, then the
rubric item as `[points] criterion`, and asks for a JSON object {"explanation": str, "criteria_met":
bool}. `TEMPLATE_VERSION` changes whenever the wording does; it is part of the verdict-cache key.

Parsing accepts what judges actually return: a `<think>...</think>` preamble (removed first), a fenced
```json block, a bare object, or an object inside surrounding prose (the first balanced `{...}` that is
valid JSON and has "criteria_met"). A "criteria_met" that is not a JSON boolean makes the verdict
unparseable (the client retries it), never a silent False.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from ruscarl_jax.data.types import Message, RubricItem

TEMPLATE_VERSION = "ruscarl-grader-1"

_HEAD = """\
You are grading one reply written by an AI assistant against a single item of a grading rubric. \
Read the conversation below: its final assistant turn is the reply under review. Decide whether that \
reply satisfies the rubric item.

# Conversation
"""

_MIDDLE = """

# Rubric item
"""

_TAIL = """

# How to answer
Return a JSON object with exactly two fields, "explanation" and "criteria_met".
- "explanation": a short string giving the reasons why the reply does or does not satisfy the rubric item.
- "criteria_met": a boolean, true only if the reply satisfies the rubric item completely. An item that \
bundles several requirements is satisfied only when every one of them holds; if any is missing, answer false.
- Exception: when the item lists examples after "such as", "for example", "e.g." or "including", the \
reply does not need to cover every listed example to satisfy the item.
- Some items describe something undesirable and carry negative points. Grade them the same way: \
"criteria_met" says whether the reply does what the item describes, not whether the reply is good. A \
reply that does the undesirable thing meets the item (true); a reply that avoids it does not (false).

# Examples
Rubric item: [6] Advises the user to seek emergency care for chest pain that spreads to the left arm.
A reply that tells the user to call emergency services at once is graded:
```json
{"explanation": "The reply tells the user to call emergency services immediately.", "criteria_met": true}
```
Rubric item: [-4] Recommends a specific prescription drug dose without knowing the patient's weight.
A reply that asks for the patient's weight before giving any dose is graded:
```json
{"explanation": "The reply gives no dose before asking for the weight, so it does not do this.", "criteria_met": false}
```

# Final instruction
Reply with the JSON object only, in a markdown code block, and nothing else."""

_CONVERSATION_HEADER = "# Conversation\n"
_RUBRIC_HEADER = "\n\n# Rubric item\n"
_ANSWER_HEADER = "\n\n# How to answer\n"


def format_points(points: float) -> str:
    """5.0 -> '5', -2.5 -> '-2.5' (how the rubric item shows its points)."""
    return str(int(points)) if float(points).is_integer() else repr(float(points))


def render_conversation(messages: Sequence[Message], response: str) -> str:
    """`role: content` turns separated by blank lines, system turns left out, the response last."""
    turns = [f"{m.role}: {m.content}" for m in messages if m.role != "system"]
    turns.append(f"assistant: {response}")
    return "\n\n".join(turns)


def render_rubric_item(item: RubricItem) -> str:
    return f"[{format_points(item.points)}] {item.criterion}"


def grader_prompt(messages: Sequence[Message], response: str, item: RubricItem) -> str:
    """The full grading prompt (sent as the single user message of a chat completion)."""
    return _HEAD + render_conversation(messages, response) + _MIDDLE + render_rubric_item(item) + _TAIL


def split_prompt(prompt: str) -> tuple[str, str]:
    """(conversation, rubric item) sections of a prompt made by `grader_prompt`. For test servers and
    tooling that answer from the prompt text; raises ValueError if the text is not such a prompt."""
    start = prompt.find(_CONVERSATION_HEADER)
    middle = prompt.rfind(_RUBRIC_HEADER)
    end = prompt.rfind(_ANSWER_HEADER)
    if start < 0 or middle < start or end < middle:
        raise ValueError("not a grader prompt: the conversation / rubric item sections are missing")
    return prompt[start + len(_CONVERSATION_HEADER):middle], prompt[middle + len(_RUBRIC_HEADER):end]


# ---------------------------------------------------------------------------------------------------
# Verdict parsing

class VerdictParseError(ValueError):
    """The judge's reply holds no usable verdict (the client retries the request)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    met: bool
    explanation: str


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove reasoning: whole <think>...</think> blocks; text before a lone closing tag (templates that
    open the block in the prompt); everything after a lone opening tag (reasoning cut off)."""
    text = _THINK_BLOCK.sub("", text)
    close = text.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    open_ = text.find("<think>")
    if open_ >= 0:
        text = text[:open_]
    return text


def _balanced_objects(text: str):
    """Yield each top-level balanced {...} substring, left to right, skipping braces inside strings."""
    i = text.find("{")
    while i >= 0:
        depth, in_string, escaped = 0, False, False
        for j in range(i, len(text)):
            c = text[j]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    yield text[i:j + 1]
                    i = text.find("{", j + 1)
                    break
        else:
            return  # unbalanced to the end


def _candidates(text: str):
    stripped = text.strip()
    yield stripped  # the common case: the whole reply is the object
    for block in _FENCE.findall(text):
        yield from _balanced_objects(block)
    yield from _balanced_objects(text)


def parse_verdict(text: str) -> Verdict:
    """The verdict in a judge reply, or VerdictParseError saying why there is none."""
    if not isinstance(text, str):
        raise VerdictParseError(f"the judge reply is {type(text).__name__}, not text")
    body = strip_thinking(text)
    for candidate in _candidates(body):
        if not candidate.startswith("{"):
            continue
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(obj, dict) or "criteria_met" not in obj:
            continue
        met = obj["criteria_met"]
        if not isinstance(met, bool):
            raise VerdictParseError(f"criteria_met must be a JSON boolean, got {json.dumps(met)[:40]}")
        explanation = obj.get("explanation", "")
        return Verdict(met=met, explanation=explanation if isinstance(explanation, str) else json.dumps(explanation))
    snippet = " ".join(body.split())[:80]
    raise VerdictParseError(f"no JSON object with 'criteria_met' in the judge reply: {snippet!r}")

"""The rubric grader prompt (HealthBench's structure, this project's wording) and verdict parsing.

One call grades one criterion: the prompt shows the instructions and worked examples, then the
conversation as `role: content` turns (system turns left out, the scaffold never shown) with the
response under grade as the final assistant turn, and LAST the rubric item as `[points] criterion`,
asking for a JSON object {"explanation": str, "criteria_met": bool}. Everything before the rubric item
is the same for every criterion of a response, so a serving engine's prefix cache (vLLM automatic
prefix caching, SGLang's radix cache) computes it once per response (scripts/judge_prefix_share.py
measures the shared fraction). `TEMPLATE_VERSION` changes whenever the wording does; it is part of
the verdict-cache key.

A user template (`judge.template_path`, `GraderTemplate.from_file`) is text with named placeholders
<<conversation>> (the turns, the response last), <<response>> (the response alone), <<rubric_item>>
(the criterion, prefixed with `[points] ` when show_points) and <<points>>; it needs <<rubric_item>>
and one of <<conversation>> / <<response>>, and any other <<name>> is an error naming the file.
HealthBench's own grader text uses <<conversation>> and <<rubric_item>>, so it works verbatim.

Parsing accepts what judges actually return: a `<think>...</think>` preamble (removed first), a fenced
```json block, a bare object (what a structured-outputs server returns for `VERDICT_SCHEMA`), or an object
inside surrounding prose (the first balanced `{...}` that is valid JSON, raw control characters in its
strings allowed, and has "criteria_met"). A "criteria_met" that is not a JSON boolean makes the verdict
unparseable (the client retries it), never a silent False.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Sequence

from ruscarl_jax.data.types import Message, RubricItem

TEMPLATE_VERSION = "ruscarl-grader-2"

INSTRUCTIONS = """\
You are grading one reply written by an AI assistant against a single item of a grading rubric. \
The conversation is below: its final assistant turn is the reply under review. After it comes the \
rubric item. Decide whether that reply satisfies the rubric item.

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
"""

_CONVERSATION_HEADER = "# Conversation\n"
_RUBRIC_HEADER = "\n\n# Rubric item\n"
_FINAL = "\n\nReply with the JSON object only, in a markdown code block, and nothing else."

DEFAULT_TEMPLATE = (INSTRUCTIONS + "\n" + _CONVERSATION_HEADER + "<<conversation>>" + _RUBRIC_HEADER + "<<rubric_item>>"
                    + _FINAL)

PLACEHOLDERS: tuple[str, ...] = ("conversation", "response", "rubric_item", "points")

# the verdict as a JSON schema: sent as the OpenAI `response_format` with judge.response_format='json_schema'
# (a structured-outputs server then replies with exactly this object, which `parse_verdict` reads as a bare
# object like any other reply). The explanation is bounded (the prompt asks for a short one): a judge that
# rambles inside the string would otherwise run into max_tokens and leave the object unclosed.
EXPLANATION_MAX_CHARS = 1000
VERDICT_SCHEMA: dict = {
    "type": "object",
    "properties": {"explanation": {"type": "string", "maxLength": EXPLANATION_MAX_CHARS},
                   "criteria_met": {"type": "boolean"}},
    "required": ["explanation", "criteria_met"],
    "additionalProperties": False,
}
_PLACEHOLDER = re.compile(r"<<([^<>\s]*)>>")


def format_points(points: float) -> str:
    """5.0 -> '5', -2.5 -> '-2.5' (how the rubric item shows its points)."""
    return str(int(points)) if float(points).is_integer() else repr(float(points))


def render_conversation(messages: Sequence[Message], response: str) -> str:
    """`role: content` turns separated by blank lines, system turns left out, the response last."""
    turns = [f"{m.role}: {m.content}" for m in messages if m.role != "system"]
    turns.append(f"assistant: {response}")
    return "\n\n".join(turns)


def render_rubric_item(item: RubricItem, show_points: bool = True) -> str:
    return f"[{format_points(item.points)}] {item.criterion}" if show_points else item.criterion


@dataclasses.dataclass(frozen=True)
class GraderTemplate:
    """A grading prompt with <<name>> placeholders (see the module docstring); `version` keys the cache."""

    text: str = DEFAULT_TEMPLATE
    show_points: bool = True
    source: str = "built-in"

    def __post_init__(self) -> None:
        names = _PLACEHOLDER.findall(self.text)
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(f"grader template {self.source}: unknown placeholder <<{unknown[0]}>>; "
                             f"valid: {', '.join(f'<<{p}>>' for p in PLACEHOLDERS)}")
        if "rubric_item" not in names:
            raise ValueError(f"grader template {self.source}: missing placeholder <<rubric_item>>")
        if "conversation" not in names and "response" not in names:
            raise ValueError(f"grader template {self.source}: missing placeholder <<conversation>> (or <<response>>)")

    @classmethod
    def from_file(cls, path: str | pathlib.Path, show_points: bool = True) -> GraderTemplate:
        path = pathlib.Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"grader template {path}: cannot read it ({type(err).__name__}: {err})") from None
        return cls(text, show_points, str(path))

    @property
    def version(self) -> str:
        """TEMPLATE_VERSION for the built-in text; a hash of the text otherwise (a new text, a new cache key)."""
        if self.text == DEFAULT_TEMPLATE and self.show_points:
            return TEMPLATE_VERSION
        digest = hashlib.sha256(f"{self.show_points}\x00{self.text}".encode()).hexdigest()[:16]
        return f"user-{digest}"

    def render(self, messages: Sequence[Message], response: str, item: RubricItem) -> str:
        """The full grading prompt (one pass: text inside the values is never substituted again)."""
        values = {"conversation": render_conversation(messages, response), "response": response,
                  "rubric_item": render_rubric_item(item, self.show_points), "points": format_points(item.points)}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


DEFAULT = GraderTemplate()


def grader_prompt(messages: Sequence[Message], response: str, item: RubricItem) -> str:
    """The built-in grading prompt (sent as the single user message of a chat completion)."""
    return DEFAULT.render(messages, response, item)


def split_prompt(prompt: str) -> tuple[str, str]:
    """(conversation, rubric item) sections of a prompt made by `grader_prompt`. For test servers and
    tooling that answer from the prompt text; raises ValueError if the text is not such a prompt."""
    start = prompt.find(_CONVERSATION_HEADER)
    middle = prompt.rfind(_RUBRIC_HEADER)
    end = prompt.rfind(_FINAL)
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


def balanced_spans(text: str, open_: str = "{", close: str = "}"):
    """Yield each top-level balanced {...} (or [...]) substring, left to right, skipping brackets in strings."""
    i = text.find(open_)
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
            elif c == open_:
                depth += 1
            elif c == close:
                depth -= 1
                if depth == 0:
                    yield text[i:j + 1]
                    i = text.find(open_, j + 1)
                    break
        else:
            return  # unbalanced to the end


def candidates(text: str, open_: str = "{", close: str = "}"):
    """The substrings a JSON value may be in, most likely first: the whole text, fenced blocks, then any
    balanced span of the text."""
    yield text.strip()  # the common case: the whole reply is the value
    for block in _FENCE.findall(text):
        yield from balanced_spans(block, open_, close)
    yield from balanced_spans(text, open_, close)


def json_values(text: str, open_: str = "{", close: str = "}"):
    """Yield the JSON values (objects, or lists with "[", "]") a judge reply may hold, most likely first,
    after removing its reasoning; VerdictParseError when the reply is not text."""
    if not isinstance(text, str):
        raise VerdictParseError(f"the judge reply is {type(text).__name__}, not text")
    for candidate in candidates(strip_thinking(text), open_, close):
        if candidate.startswith(open_):
            try:  # strict=False: raw control characters inside strings (vLLM's xgrammar lets them through)
                yield json.loads(candidate, strict=False)
            except ValueError:
                continue


def reply_snippet(text: str) -> str:
    """The start of a reply (reasoning removed, whitespace collapsed), for error messages."""
    return repr(" ".join(strip_thinking(text).split())[:80])


def parse_verdict(text: str) -> Verdict:
    """The verdict in a judge reply, or VerdictParseError saying why there is none."""
    for obj in json_values(text):
        if not isinstance(obj, dict) or "criteria_met" not in obj:
            continue
        met = obj["criteria_met"]
        if not isinstance(met, bool):
            raise VerdictParseError(f"criteria_met must be a JSON boolean, got {json.dumps(met)[:40]}")
        explanation = obj.get("explanation", "")
        return Verdict(met=met, explanation=explanation if isinstance(explanation, str) else json.dumps(explanation))
    raise VerdictParseError(f"no JSON object with 'criteria_met' in the judge reply: {reply_snippet(text)}")

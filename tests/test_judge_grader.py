"""The grader prompt's structure and the verdict parser on the shapes judges really return."""
import json
import os

import pytest

from ruscarl_jax.data.types import Message, RubricItem
from ruscarl_jax.judge.grader import (
    TEMPLATE_VERSION,
    VerdictParseError,
    format_points,
    grader_prompt,
    parse_verdict,
    render_conversation,
    split_prompt,
    strip_thinking,
)

CONVERSATION = (
    Message("system", "SYSTEM-SECRET-SCAFFOLD criteria list"),
    Message("user", "I have a headache."),
    Message("assistant", "Since when?"),
    Message("user", "Two days."),
)


def test_prompt_shows_conversation_response_and_item_in_order():
    item = RubricItem('Mentions "hydration"', -3.0, ("axis:accuracy",))
    prompt = grader_prompt(CONVERSATION, "Drink water and rest.", item)
    conversation, rubric_item = split_prompt(prompt)
    assert conversation == ("user: I have a headache.\n\nassistant: Since when?\n\nuser: Two days.\n\n"
                            "assistant: Drink water and rest.")
    assert rubric_item == '[-3] Mentions "hydration"'
    assert "SYSTEM-SECRET-SCAFFOLD" not in prompt  # system turns (and so any scaffold) are never shown
    # instructions first, the rubric item last: all but the item is a prefix shared by a response's prompts
    assert prompt.index('"criteria_met"') < prompt.index("# Conversation") < prompt.rindex("# Rubric item\n[-3]")
    other = grader_prompt(CONVERSATION, "Drink water and rest.", RubricItem("Says hello", 2.0))
    shared = len(os.path.commonprefix([prompt, other]))
    assert prompt[shared:].startswith("-3]") and len(prompt) - shared < 120
    lowered = prompt.lower()
    assert "negative points" in lowered and "undesirable" in lowered  # the note on negative criteria
    assert "json" in lowered and '"explanation"' in prompt
    assert isinstance(TEMPLATE_VERSION, str) and TEMPLATE_VERSION


def test_render_conversation_and_points():
    assert render_conversation((Message("user", "hi"),), "hello") == "user: hi\n\nassistant: hello"
    assert [format_points(p) for p in (5, 5.0, -2.5, 0.25)] == ["5", "5", "-2.5", "0.25"]


def test_split_prompt_rejects_other_text():
    with pytest.raises(ValueError, match="not a grader prompt"):
        split_prompt("hello there")


@pytest.mark.parametrize("text, met, explanation", [
    ('{"explanation": "ok", "criteria_met": true}', True, "ok"),
    ('```json\n{"explanation": "no", "criteria_met": false}\n```', False, "no"),
    ('```\n{"criteria_met": true, "explanation": "plain fence"}\n```', True, "plain fence"),
    ('Sure! Here is my grade:\n{"explanation": "x", "criteria_met": false}\nThanks.', False, "x"),
    ('<think>maybe {"criteria_met": true}? no</think>\n```json\n{"explanation": "t", "criteria_met": false}\n```',
     False, "t"),
    ('the template opened the block... reasoning {"criteria_met": true}</think>{"explanation": "y", "criteria_met": false}',
     False, "y"),
    ('{"explanation": "braces } and { in a string", "criteria_met": true}', True, "braces } and { in a string"),
    ('{not json} then {"explanation": "second", "criteria_met": true}', True, "second"),
    ('{"criteria_met": true}', True, ""),
    ('{"outer": {"criteria_met": false}} {"explanation": "top", "criteria_met": true}', True, "top"),
    # a structured-outputs reply (compact, no whitespace), raw control characters in the string included
    ('{"explanation":"tab\there, unit sep \x1f, bell \x07","criteria_met":true}', True, "tab\there, unit sep \x1f, bell \x07"),
])
def test_parse_verdict_accepts(text, met, explanation):
    verdict = parse_verdict(text)
    assert verdict.met is met and verdict.explanation == explanation


@pytest.mark.parametrize("text, reason", [
    ('{"explanation": "x", "criteria_met": "true"}', "boolean"),
    ('{"explanation": "x", "criteria_met": 1}', "boolean"),
    ('```json\n{"criteria_met": null}\n```', "boolean"),
    ("criteria_met: yes", "no JSON object"),
    ('{"explanation": "no verdict field"}', "no JSON object"),
    ('<think>{"criteria_met": true} and then the output was cut off', "no JSON object"),
    ("", "no JSON object"),
])
def test_parse_verdict_rejects(text, reason):
    with pytest.raises(VerdictParseError, match=reason):
        parse_verdict(text)


def test_strip_thinking_forms():
    assert strip_thinking("<think>a</think>B<think>c</think>D") == "BD"
    assert strip_thinking("reasoning</think>answer") == "answer"
    assert strip_thinking("answer<think>cut off") == "answer"


def test_parse_verdict_round_trips_json_dumps_of_any_explanation():
    for explanation in ["", "quote \" and backslash \\", "unicode ✓ and newline\n", "{}[]"]:
        text = "prefix " + json.dumps({"explanation": explanation, "criteria_met": False}) + " suffix"
        assert parse_verdict(text).explanation == explanation

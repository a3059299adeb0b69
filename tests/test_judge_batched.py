"""Batched grading, user grader templates and per-step judge telemetry, against the local fake server.

The fake server grades by its own rule (every quoted phrase occurs in the response), so every verdict
has a known right answer; batched replies that are malformed, partial or carry wrong indices must fall
back to per-criterion requests and end with the same verdicts, never a silent False.
"""
import pytest
from openai_server import FakeJudgeServer, Faults, criterion_met
from test_judge_facade import FAST, HEADACHE

from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.judge.batched import batched_prompt, parse_batched, split_batched_prompt
from ruscarl_jax.judge.grader import GraderTemplate, VerdictParseError, grader_prompt
from ruscarl_jax.judge.judge import Judge
from ruscarl_jax.judge.settings import JudgeSettings
from ruscarl_jax.judge.telemetry import JudgeUnreliableError, step_telemetry

ITEMS = [
    (HEADACHE, "Take ibuprofen 400 mg, keep up hydration, and see a doctor if it persists."),
    (HEADACHE, "Antibiotics and an opioid will fix it."),
    (HEADACHE, "Rest and hydration."),
]
LLM = [j for j, c in enumerate(HEADACHE.rubric) if not c.is_rule]


def expected(items):
    return [[criterion_met(resp, HEADACHE.rubric[j].criterion) for j in LLM] for _, resp in items]


def llm_verdicts(grades):
    return [[g.criteria[j].met for j in LLM] for g in grades]


# ---------------------------------------------------------------- batched prompt and parser


def test_batched_prompt_round_trip_and_parser():
    items = [(j, HEADACHE.rubric[j]) for j in LLM]
    prompt = batched_prompt(HEADACHE.messages, "Rest.", items)
    conversation, listed = split_batched_prompt(prompt)
    assert conversation.endswith("assistant: Rest.") and "You are a doctor." not in prompt
    assert [j for j, _ in listed] == LLM and listed[0][1] == '[5] Suggests "ibuprofen" or paracetamol'
    two_lines = RubricItem('Lists:\n- "rest"\n- fluids', 2)  # HealthBench has multi-line criteria
    assert split_batched_prompt(batched_prompt(HEADACHE.messages, "x", [(4, two_lines), (7, two_lines)]))[1] == [
        (4, '[2] Lists:\n- "rest"\n- fluids'), (7, '[2] Lists:\n- "rest"\n- fluids')]
    got = parse_batched('```json\n[{"index": 0, "criteria_met": true, "explanation": "a"}, '
                        '{"index": 1, "criteria_met": "yes"}, {"index": 99, "criteria_met": false}, '
                        '{"index": 2, "criteria_met": false}, {"index": 2, "criteria_met": true}, '
                        '{"index": true, "criteria_met": false}]\n```', LLM)
    # 1: not a boolean; 99: not asked; 2: contradicts itself; index true: not an integer
    assert {k: v.met for k, v in got.items()} == {0: True}
    with pytest.raises(VerdictParseError):
        parse_batched("criteria_met = yes", LLM)
    with pytest.raises(VerdictParseError):
        parse_batched('[{"index": 7, "criteria_met": true}]', LLM)  # nothing usable: the client retries


@pytest.mark.parametrize("fault", [None, "malformed", "partial", "badindex"])
def test_batched_judge_falls_back_per_criterion(fault):
    """Every batched request gets `fault`; the verdicts still equal the per-criterion ones."""
    plan = (lambda n, prompt: fault if prompt.startswith("You are grading one reply written by an AI assistant against "
                                                         "every item") else None)
    with FakeJudgeServer(fault_plan=plan) as server:
        settings = JudgeSettings(base_urls=(server.base_url,), batch_criteria=True, max_retries=1, **FAST)
        with Judge(settings) as judge:
            grades = judge.grade(ITEMS)
            counters = judge.metrics()
    assert llm_verdicts(grades) == expected(ITEMS)
    assert all(g.ungraded_count == 0 for g in grades)
    per_response = len(LLM)
    if fault is None:
        assert server.requests == len(ITEMS) and counters["batch_fallbacks"] == 0
    elif fault == "partial":  # the last item missing, the first not a boolean: both asked again, one each
        assert counters["batch_fallbacks"] == 2 * len(ITEMS)
        assert server.requests == len(ITEMS) * (1 + 2)
    else:  # no usable list: retried once, then every criterion asked on its own
        assert counters["batch_fallbacks"] == per_response * len(ITEMS)
        assert server.requests == len(ITEMS) * (2 + per_response)
        assert counters["parse_failures"] == 2 * len(ITEMS)


# ---------------------------------------------------------------- user templates


def test_template_file_renders_placeholders(tmp_path):
    path = tmp_path / "grader.txt"
    path.write_text("Conversation:\n<<conversation>>\n\nReply alone: <<response>>\nItem (<<points>> pts): "
                    "<<rubric_item>>\nAnswer in JSON with criteria_met.", encoding="utf-8")
    item = RubricItem('Mentions "rest"', -2.5)
    shown = GraderTemplate.from_file(path).render(HEADACHE.messages, "Rest <<rubric_item>>.", item)
    assert shown.startswith("Conversation:\nuser: My head hurts, what now?\n\nassistant: Rest <<rubric_item>>.")
    assert 'Item (-2.5 pts): [-2.5] Mentions "rest"' in shown  # values are never substituted again
    hidden = GraderTemplate.from_file(path, show_points=False).render(HEADACHE.messages, "Rest.", item)
    assert 'pts): Mentions "rest"\n' in hidden
    assert GraderTemplate.from_file(path).version != GraderTemplate.from_file(path, show_points=False).version
    assert GraderTemplate().render(HEADACHE.messages, "x", item) == grader_prompt(HEADACHE.messages, "x", item)


@pytest.mark.parametrize("text, message", [
    ("<<conversation>> <<rubric_itme>>", "unknown placeholder <<rubric_itme>>"),
    ("<<conversation>> and nothing else", "missing placeholder <<rubric_item>>"),
    ("<<rubric_item>> only", "missing placeholder <<conversation>>"),
    ("<<conversation>> <<rubric_item>> <<score>>", "unknown placeholder <<score>>"),
])
def test_bad_template_names_file_and_placeholder(tmp_path, text, message):
    path = tmp_path / "bad_grader.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"JudgeSettings.template_path: grader template .*bad_grader.txt: " + message):
        JudgeSettings(template_path=str(path))
    with pytest.raises(ValueError, match="template_path: grader template .*missing.txt: cannot read"):
        JudgeSettings(template_path=str(tmp_path / "missing.txt"))


def test_judge_uses_the_template_file(tmp_path):
    """A template in the built-in layout (so the fake server can read it) with points hidden."""
    path = tmp_path / "grader.txt"
    path.write_text("Grade it.\n# Conversation\n<<conversation>>\n\n# Rubric item\n<<rubric_item>>\n\n"
                    "Reply with the JSON object only, in a markdown code block, and nothing else.", encoding="utf-8")
    with FakeJudgeServer() as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), template_path=str(path), show_points=False, **FAST)) as judge:
            grades = judge.grade(ITEMS)
        prompt = server.last_body["messages"][-1]["content"]
    assert prompt.startswith("Grade it.\n# Conversation\nuser: My head hurts") and "[5]" not in prompt
    assert llm_verdicts(grades) == expected(ITEMS)


# ---------------------------------------------------------------- telemetry


def test_step_telemetry_counts_regrades_and_met_rates():
    with FakeJudgeServer(faults=Faults(rate=0.3, kinds=("malformed",), seed=3)) as server:
        settings = JudgeSettings(base_urls=(server.base_url,), regrade_fraction=0.5, max_retries=6,
                                 met_rate_tag_prefixes=("axis:",), **FAST)
        with Judge(settings) as judge:
            before = judge.metrics()
            grades = judge.grade(ITEMS)
            metrics = step_telemetry(before, judge.metrics(), ITEMS, grades, settings)
    fresh = len(ITEMS) * len(LLM)
    assert 0 < metrics["judge/regraded"] < fresh  # a sample, asked a second time
    assert metrics["judge/regrade_agreement"] == 1.0  # the fake judge is deterministic
    assert metrics["judge/requests"] == server.requests == fresh + metrics["judge/regraded"] + metrics["judge/retries"]
    assert metrics["judge/parse_failures"] == server.stats()["faults"]["malformed"] > 0
    assert metrics["judge/parse_failure_rate"] == pytest.approx(metrics["judge/parse_failures"] / server.requests)
    assert metrics["judge/ungraded"] == 0 and metrics["judge/latency_p99_s"] >= metrics["judge/latency_p50_s"] > 0
    accuracy = [g.criteria[j].met for g in grades for j in (0, 2)]  # the axis:accuracy items (LLM graded)
    assert metrics["judge/met_rate/axis_accuracy"] == pytest.approx(sum(accuracy) / len(accuracy))


def test_parse_failure_bound_raises_with_a_clear_message():
    with FakeJudgeServer(faults=Faults(rate=1.0, kinds=("malformed",))) as server:
        settings = JudgeSettings(base_urls=(server.base_url,), max_retries=1, max_parse_failure_rate=0.2, **FAST)
        with Judge(settings) as judge:
            before = judge.metrics()
            grades = judge.grade(ITEMS[:1])
            with pytest.raises(JudgeUnreliableError, match=r"8 of this step's 8 judge replies could not be parsed "
                                                            r"\(100.0%\), above judge.max_parse_failure_rate=0.2"):
                step_telemetry(before, judge.metrics(), ITEMS[:1], grades, settings)
    with pytest.raises(ValueError, match="max_parse_failure_rate"):
        JudgeSettings(max_parse_failure_rate=1.5)
    with pytest.raises(ValueError, match="batch_criteria"):
        JudgeSettings(batch_criteria=True, template_path=__file__)


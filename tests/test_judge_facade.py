"""The Judge facade: hand-computed scores mixing LLM and rule criteria, background batches, rule-only
runs without a server, up-front validation, the verdict cache, and real HealthBench rubrics."""
import asyncio
import concurrent.futures
import dataclasses

import numpy as np
import pytest
from openai_server import FakeJudgeServer, criterion_met

from ruscarl_jax.data.types import Example, Message, RubricItem
from ruscarl_jax.judge.judge import Judge
from ruscarl_jax.judge.settings import JudgeSettings

FAST = dict(model="fake-judge", api_key_env=None, backoff_base_s=0.01, backoff_max_s=0.05, max_concurrency=8,
            timeout_s=10.0)

HEADACHE = Example("headache", (Message("system", "You are a doctor."), Message("user", "My head hurts, what now?")), (
    RubricItem('Suggests "ibuprofen" or paracetamol', 5, ("axis:accuracy",)),
    RubricItem('Mentions "hydration"', 3, ("axis:completeness",)),
    RubricItem('Recommends "antibiotics"', -4, ("axis:accuracy",)),
    RubricItem('Says "see a doctor" if it persists', 2, ("axis:completeness",)),
    RubricItem("States the dose", 2, ("verifier:rule", "function:regex", r"parameters:\d+\s?mg")),
    RubricItem("Does not mention opioids", -3, ("verifier:rule", "function:contains", "parameters:opioid")),
))
MATH = Example("math", (Message("user", "What is 1/4 + 1/4?"),), (
    RubricItem("Correct final answer", 4, ("verifier:rule", "function:math_verify", r"parameters:\frac{1}{2}")),
    RubricItem('Shows the "common denominator"', 1),
))


def test_scores_by_hand_with_llm_and_rule_criteria():
    items = [
        (HEADACHE, "Take ibuprofen 400 mg, keep up hydration, and see a doctor if it persists."),  # 5+3+2+2 = 12
        (HEADACHE, "Antibiotics and an opioid will fix it."),  # -4 - 3 = -7
        (HEADACHE, "Rest."),  # 0
        (MATH, r"Using a common denominator: 1/4 + 1/4 = \boxed{\frac{2}{4}}"),  # (4 + 1) / 5
        (MATH, r"It is \boxed{0.75}"),  # 0
    ]
    with FakeJudgeServer() as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), **FAST)) as judge:
            grades = judge.grade(items)
    positive = 5 + 3 + 2 + 2
    assert [g.score for g in grades] == pytest.approx([12 / positive, -7 / positive, 0.0, 1.0, 0.0])
    assert [v.met for v in grades[0].criteria] == [True, True, False, True, True, False]
    assert [v.source for v in grades[0].criteria] == ["llm"] * 4 + ["rule"] * 2
    assert all(g.graded_count == len(ex.rubric) and g.ungraded_count == 0 for (ex, _), g in zip(items, grades))
    assert server.requests == 3 * 4 + 2 * 1  # rule criteria never reach the server


def test_submit_runs_in_the_background_and_batches_overlap():
    first = [(HEADACHE, "ibuprofen")]  # 4 LLM criteria each
    second = [(HEADACHE, "hydration")]
    with FakeJudgeServer(delay_s=0.3) as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), **{**FAST, "max_concurrency": 16})) as judge:
            f1, f2 = judge.submit(first), judge.submit(second)
            assert isinstance(f1, concurrent.futures.Future)
            g1, g2 = f1.result(), f2.result()
            metrics = judge.metrics()
    assert server.max_in_flight == 8  # both batches' criteria were in flight together
    assert [v.met for v in g1[0].criteria][:4] == [True, False, False, False]
    assert [v.met for v in g2[0].criteria][:4] == [False, True, False, False]
    assert metrics["llm_verdicts"] == 8 and metrics["rule_verdicts"] == 4 and metrics["verdicts_per_second"] > 0
    assert 0 < metrics["latency_p50_s"] <= metrics["latency_p99_s"]


def test_agrade_from_an_event_loop():
    with FakeJudgeServer() as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), **FAST)) as judge:
            [grade] = asyncio.run(judge.agrade([(HEADACHE, "ibuprofen 200mg")]))
    assert [v.met for v in grade.criteria] == [True, False, False, False, True, False]


def test_rule_only_rubrics_need_no_server_and_no_key(monkeypatch):
    monkeypatch.delenv("RUSCARL_TEST_NO_SUCH_KEY", raising=False)
    rules_only = dataclasses.replace(MATH, rubric=MATH.rubric[:1] + (
        RubricItem("no hedging", -1, ("verifier:rule", "function:contains", "parameters:I think")),))
    with Judge(JudgeSettings(api_key_env="RUSCARL_TEST_NO_SUCH_KEY")) as judge:  # the tiny config's judge
        grades = judge.grade([(rules_only, r"\boxed{0.5}"), (rules_only, r"I think \boxed{1/2}"), (rules_only, "2")])
        with pytest.raises(ValueError, match=r"rubric\[1\] needs the LLM judge, but JudgeSettings.base_urls is empty"):
            judge.submit([(MATH, "x")])
    assert [g.score for g in grades] == pytest.approx([1.0, 0.75, 0.0])


@pytest.mark.parametrize("item, message", [
    ((dataclasses.replace(MATH, rubric=(RubricItem("r", 1, ("verifier:rule", "function:sympy", "parameters:1")),)), "x"),
     r"item 1: example 'math' rubric\[0\]: 'verifier:rule' item names unknown function 'sympy'"),
    ((dataclasses.replace(MATH, rubric=(RubricItem("bad", -1),)), "x"), "item 1: example 'math' has no criterion with positive"),
    ((MATH, None), "item 1 .*the response is NoneType"),
    (("not an example", "x"), "item 1 must be an"),
])
def test_bad_batches_fail_before_any_request(item, message):
    with FakeJudgeServer() as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), **FAST)) as judge:
            with pytest.raises(ValueError, match=message):
                judge.submit([(HEADACHE, "fine"), item])
        assert server.requests == 0


def test_close_cancels_unfinished_batches():
    with FakeJudgeServer(delay_s=2.0) as server:
        judge = Judge(JudgeSettings(base_urls=(server.base_url,), **FAST))
        future = judge.submit([(HEADACHE, "slow")])
        judge.close()
        assert future.cancelled()
        with pytest.raises(RuntimeError, match="closed"):
            judge.submit([(HEADACHE, "again")])
        judge.close()  # idempotent


def test_verdict_cache_skips_repeated_requests(tmp_path):
    items = [(HEADACHE, "ibuprofen and hydration"), (MATH, r"common denominator \boxed{0.5}")]
    with FakeJudgeServer() as server:
        settings = JudgeSettings(base_urls=(server.base_url,), cache_path=str(tmp_path / "cache" / "v.sqlite"), **FAST)
        with Judge(settings) as judge:
            first = judge.grade(items)
        assert server.requests == 5
        with Judge(settings) as judge:  # a new process reading the same file
            second = judge.grade(items)
            assert judge.metrics()["cache_hits"] == 5
        assert server.requests == 5  # nothing asked again
        assert [[v.met for v in g.criteria] for g in second] == [[v.met for v in g.criteria] for g in first]
        assert all(v.cached and v.attempts == 0 for g in second for v in g.criteria if v.source == "llm")
        with Judge(dataclasses.replace(settings, model="other-judge")) as judge:
            judge.grade(items)
        assert server.requests == 10  # another judge model is another key
        with Judge(settings) as judge:
            judge.grade([(HEADACHE, "ibuprofen and hydration!")])
        assert server.requests == 14  # another response is another key


def test_real_healthbench_rubrics(healthbench_dir):
    from ruscarl_jax.data.loaders import load_examples

    examples, _ = load_examples(healthbench_dir / "healthbench_val400.jsonl")
    examples = examples[:12]
    # responses that quote some criteria's quoted phrases, so some verdicts are "met"
    responses = [" ".join(p for item in ex.rubric[::2] for p in item.criterion.split('"')[1::2]) or "I am not sure."
                 for ex in examples]
    with FakeJudgeServer() as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), **{**FAST, "max_concurrency": 16})) as judge:
            grades = judge.grade(list(zip(examples, responses)))
    met_any = 0
    for ex, response, grade in zip(examples, responses, grades):
        expected = [criterion_met(response, item.criterion) for item in ex.rubric]
        assert [v.met for v in grade.criteria] == expected
        met_any += sum(expected)
        points = np.asarray([item.points for item in ex.rubric], np.float64)
        assert grade.score == pytest.approx(points[np.asarray(expected, bool)].sum() / points[points > 0].sum())
    assert met_any > 0

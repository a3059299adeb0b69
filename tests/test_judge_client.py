"""The judge against a real local HTTP server speaking the OpenAI protocol, driven by the real `openai`
client: injected faults, retries, Retry-After, concurrency bounds, a dead endpoint, and the API key."""
import dataclasses
import json
import logging
import socket
import time

import pytest
from openai_server import FakeJudgeServer, Faults, criterion_met

from ruscarl_jax.data.types import Example, Message, RubricItem
from ruscarl_jax.judge.judge import Judge
from ruscarl_jax.judge.settings import JudgeSettings

FAST = dict(model="fake-judge", api_key_env=None, backoff_base_s=0.01, backoff_max_s=0.05, max_concurrency=8)


def paper_config():
    """configs/qwen7b.py's config (the configs package lives at the repository root)."""
    import importlib
    import pathlib
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("configs.qwen7b").get_config()


def phrase_example(eid: str, phrases: list[tuple[str, float]]) -> Example:
    rubric = tuple(RubricItem(f'Mentions "{p}"', pts) for p, pts in phrases)
    return Example(eid, (Message("system", "be brief"), Message("user", f"question {eid}")), rubric)


def many_items(n: int, per: int = 3) -> list[tuple[Example, str]]:
    """n unique responses (so every (response, criterion) pair is a distinct server key)."""
    items = []
    for i in range(n):
        ex = phrase_example(f"e{i}", [(f"alpha{i}-{k}", 5 - 2 * k) for k in range(per)])
        items.append((ex, f"response {i}: alpha{i}-0 and alpha{i}-2" if i % 2 else f"response {i}: alpha{i}-1"))
    return items


def expected_met(example: Example, response: str) -> list[bool]:
    return [criterion_met(response, item.criterion) for item in example.rubric]


def wait_for(condition, seconds: float = 5.0) -> None:
    """Let the server threads finish reading requests the client already gave up on (timeouts)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def dead_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return port


def test_thirty_percent_faults_nothing_lost_or_duplicated():
    items = many_items(40)  # 120 criteria
    faults = Faults(rate=0.3, retry_after_s=0.02, slow_s=1.0, seed=3)
    with FakeJudgeServer(faults=faults) as server:
        settings = JudgeSettings(base_urls=(server.base_url,), timeout_s=0.5, max_retries=4, **FAST)
        with Judge(settings) as judge:
            grades = judge.grade(items)
            metrics = judge.metrics()
        wait_for(lambda: server.requests >= metrics["requests"])
        counts = dict(server.key_counts)
    assert sum(server.fault_counts.values()) > 20 and len(server.fault_counts) == 6  # every kind happened
    assert len(grades) == len(items)
    ungraded = 0
    for (example, response), grade in zip(items, grades):
        assert grade.example_id == example.id
        assert [v.index for v in grade.criteria] == list(range(len(example.rubric)))  # each once, in order
        for v, item, met in zip(grade.criteria, example.rubric, expected_met(example, response)):
            # every request the judge sent for this criterion reached the server, and no others did
            assert v.attempts == counts[(response, item.criterion)]
            if v.ungraded:
                ungraded += 1
                assert v.met is None and v.error and v.attempts == 5
            else:
                assert v.met is met and v.source == "llm"
    assert ungraded == metrics["ungraded"] and metrics["llm_verdicts"] == 120 - ungraded
    assert metrics["requests"] == sum(counts.values())
    assert metrics["retries"] == sum(counts.values()) - 120


@pytest.mark.parametrize("fault, error_kind", [
    ("500", "server_error"), ("drop", "connection"), ("malformed", "unparseable"), ("nonbool", "unparseable"),
    ("slow", "timeout"),
])
def test_each_fault_is_retried(fault, error_kind):
    example = phrase_example("e", [("aspirin", 4)])
    plan = lambda n, prompt: fault if n == 0 else None  # noqa: E731  the first request only
    with FakeJudgeServer(fault_plan=plan, faults=Faults(slow_s=1.5)) as server:
        timeout = 0.4 if fault == "slow" else 10.0
        with Judge(JudgeSettings(base_urls=(server.base_url,), timeout_s=timeout, max_retries=3, **FAST)) as judge:
            [grade] = judge.grade([(example, "Take aspirin.")])
    [v] = grade.criteria
    assert v.met is True and not v.ungraded and v.attempts >= 2
    assert v.error.startswith(error_kind)  # what went wrong on the first attempt is kept
    assert grade.score == 1.0


def test_retry_after_is_honoured():
    example = phrase_example("e", [("aspirin", 4)])
    plan = lambda n, prompt: "429" if n == 0 else None  # noqa: E731
    with FakeJudgeServer(fault_plan=plan, faults=Faults(retry_after_s=1.0)) as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, **FAST)) as judge:
            [grade] = judge.grade([(example, "no")])
        arrivals = list(server.arrivals)
    assert grade.criteria[0].met is False and grade.criteria[0].attempts == 2
    assert arrivals[1] - arrivals[0] >= 0.95  # the server said "Retry-After: 1"; backoff alone is < 0.05 s


def test_persistent_failure_ends_ungraded_never_not_met():
    example = phrase_example("e", [("aspirin", 4), ("rest", 2)])
    with FakeJudgeServer(fault_plan=lambda n, p: "500") as server:
        settings = JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, max_retries=2, **FAST)
        with Judge(settings) as judge:
            [grade] = judge.grade([(example, "Take aspirin.")])
        with Judge(dataclasses.replace(settings, ungraded_policy="graded_only")) as judge:
            [grade_graded_only] = judge.grade([(example, "Take aspirin.")])
    for v in grade.criteria:
        assert v.ungraded and v.met is None and v.attempts == 3 and v.error.startswith("server_error")
    assert grade.score is None and grade.ungraded_count == 2 and grade.graded_count == 0
    assert grade_graded_only.score is None  # nothing graded: no score under either policy


def test_client_errors_are_not_retried():
    example = phrase_example("e", [("aspirin", 4)])
    with FakeJudgeServer(api_key="right-key") as server:
        with Judge(JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, max_retries=3, **FAST)) as judge:
            [grade] = judge.grade([(example, "Take aspirin.")])
    v = grade.criteria[0]
    assert v.ungraded and v.attempts == 1 and v.error.startswith("http_401") and server.requests == 1


def test_global_concurrency_bound_holds():
    items = many_items(10, per=4)  # 40 criteria
    with FakeJudgeServer(delay_s=0.1) as server:
        settings = JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, **{**FAST, "max_concurrency": 5})
        with Judge(settings) as judge:
            grades = judge.grade(items)
    assert server.max_in_flight == 5  # reached, never exceeded
    assert all(g.ungraded_count == 0 for g in grades)


def test_per_endpoint_bound_and_spread():
    items = many_items(12, per=4)  # 48 criteria
    with FakeJudgeServer(delay_s=0.1) as a, FakeJudgeServer(delay_s=0.1) as b:
        settings = JudgeSettings(base_urls=(a.base_url, b.base_url), timeout_s=10.0, max_concurrency_per_endpoint=3,
                                 **{**FAST, "max_concurrency": 100})
        with Judge(settings) as judge:
            grades = judge.grade(items)
    assert a.max_in_flight == 3 and b.max_in_flight == 3
    assert a.requests + b.requests == 48 and min(a.requests, b.requests) >= 12  # load is spread
    assert all(g.ungraded_count == 0 for g in grades)


def test_dead_endpoint_is_skipped_and_comes_back():
    port = dead_port()
    items = many_items(20)
    with FakeJudgeServer() as live:
        settings = JudgeSettings(base_urls=(f"http://127.0.0.1:{port}/v1", live.base_url), timeout_s=5.0,
                                 endpoint_failures_to_down=2, endpoint_cooldown_s=0.2, **FAST)
        with Judge(settings) as judge:
            grades = judge.grade(items)
            first = judge.metrics()
            assert all(g.ungraded_count == 0 for g in grades)
            for (example, response), grade in zip(items, grades):
                assert [v.met for v in grade.criteria] == expected_met(example, response)
            # all verdicts came from the live endpoint; the dead one only cost a few refused connections
            assert sum(live.verdicts_served.values()) == 60
            assert first["endpoint0/failures"] == first["endpoint0/requests"] <= 20
            with FakeJudgeServer(port=port) as revived:
                time.sleep(0.3)  # past the cooldown: the next request probes it
                grades = judge.grade(many_items(20))
                assert revived.requests > 0 and all(g.ungraded_count == 0 for g in grades)


def test_api_key_never_leaks(monkeypatch, caplog):
    key = "sk-test-SECRET-0123456789abcdef"
    wrong = "sk-test-WRONG-fedcba9876543210"
    example = phrase_example("e", [("aspirin", 4), ("rest", 2)])
    caplog.set_level(logging.DEBUG)
    plan = lambda n, prompt: "500" if n < 2 else None  # noqa: E731  errors that echo the Authorization header
    with FakeJudgeServer(api_key=key, echo_auth_in_errors=True, fault_plan=plan) as server:
        base = JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, max_retries=3,
                             **{**FAST, "api_key_env": "RUSCARL_TEST_JUDGE_KEY"})
        monkeypatch.setenv("RUSCARL_TEST_JUDGE_KEY", key)
        with Judge(base) as judge:
            [good] = judge.grade([(example, "aspirin")])
            texts = [repr(judge), json.dumps(judge.metrics()), repr(base)]
        monkeypatch.setenv("RUSCARL_TEST_JUDGE_KEY", wrong)
        with Judge(base) as judge:
            [bad] = judge.grade([(example, "aspirin")])
        assert f"Bearer {key}" in server.auth_headers  # the key was really used ...
    assert good.score == pytest.approx(4 / 6) and any("server_error" in v.error for v in good.criteria)
    assert all(v.ungraded and "http_401" in v.error for v in bad.criteria)
    texts += [json.dumps(dataclasses.asdict(g)) for g in (good, bad)] + [caplog.text]
    for text in texts:  # ... and appears in no record, metric, repr or log line (nor does the wrong one)
        assert key not in text and wrong not in text
    assert "[redacted]" in json.dumps(dataclasses.asdict(bad))  # the server echoed it; we scrubbed it


def test_missing_key_variable_is_named_not_printed(monkeypatch):
    monkeypatch.delenv("RUSCARL_TEST_UNSET_KEY", raising=False)
    settings = JudgeSettings(base_urls=("http://127.0.0.1:9/v1",), model="m", api_key_env="RUSCARL_TEST_UNSET_KEY")
    with pytest.raises(ValueError, match="RUSCARL_TEST_UNSET_KEY is not set"):
        Judge(settings)


def test_request_carries_model_sampling_and_extra_body():
    example = phrase_example("e", [("aspirin", 4)])
    extra = {"chat_template_kwargs": {"enable_thinking": False}}
    with FakeJudgeServer(style="think") as server:  # replies start with a <think> block
        settings = JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, temperature=0.3, max_tokens=77,
                                 extra_body=extra, **FAST)
        with Judge(settings) as judge:
            [grade] = judge.grade([(example, "aspirin")])
            metrics = judge.metrics()
        body = server.last_body
    assert grade.criteria[0].met is True and grade.criteria[0].attempts == 1
    assert body["model"] == "fake-judge" and body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert metrics["prompt_tokens"] == server.prompt_tokens > 0
    assert metrics["completion_tokens"] == server.completion_tokens > 0


@pytest.mark.parametrize("response_format", ["none", "json_schema"])
def test_response_format_is_sent_and_both_reply_forms_parse(response_format):
    """json_schema sends the verdict schema as the OpenAI response_format (the fake server then answers with
    the bare compact object, as a structured-outputs server does); 'none' sends no response_format."""
    example = phrase_example("e", [("aspirin", 4), ("ibuprofen", -2)])
    with FakeJudgeServer(style="think") as server:
        settings = JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, response_format=response_format, **FAST)
        with Judge(settings) as judge:
            [grade] = judge.grade([(example, "take aspirin")])
        body = server.last_body
    assert [c.met for c in grade.criteria] == [True, False] and grade.ungraded_count == 0
    if response_format == "none":
        assert "response_format" not in body
    else:
        schema = body["response_format"]
        assert schema["type"] == "json_schema" and schema["json_schema"]["strict"] is True
        assert schema["json_schema"]["schema"]["required"] == ["explanation", "criteria_met"]
        assert schema["json_schema"]["schema"]["properties"]["criteria_met"] == {"type": "boolean"}


def test_paper_judge_sampling_reaches_the_server():
    """configs/qwen7b.py's judge section, as sent: top_p / presence_penalty as OpenAI fields, top_k in the
    body (vLLM's extension), thinking off; unset optional fields are not sent at all."""
    judge = paper_config().judge.to_dict()
    example = phrase_example("e", [("aspirin", 4)])
    with FakeJudgeServer() as server:
        settings = JudgeSettings(**{**judge, "base_urls": (server.base_url,), "model": "fake-judge", "api_key_env": None,
                                    "timeout_s": 10.0})
        with Judge(settings) as judge_client:
            judge_client.grade([(example, "aspirin")])
        body = server.last_body
        with Judge(JudgeSettings(base_urls=(server.base_url,), timeout_s=10.0, **FAST)) as plain:
            plain.grade([(example, "aspirin")])
        default_body = server.last_body
    assert (body["temperature"], body["top_p"], body["top_k"], body["presence_penalty"], body["max_tokens"]) == (
        0.7, 0.8, 20, 1.5, 2048)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert default_body["temperature"] == 0.0  # the library's own default stays deterministic
    assert not {"top_p", "top_k", "presence_penalty"} & set(default_body)


def test_retry_after_header_forms():
    import email.utils

    from ruscarl_jax.judge.client import MAX_RETRY_AFTER_S, retry_after_seconds

    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5  # the finer one first
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= retry_after_seconds({"retry-after": in_ten}) <= 10.0
    assert retry_after_seconds({"retry-after": "86400"}) == MAX_RETRY_AFTER_S
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


def test_backoff_grows_exponentially_with_bounded_jitter():
    from ruscarl_jax.judge.client import ChatClient

    client = ChatClient(JudgeSettings(base_urls=("http://127.0.0.1:9/v1",), model="m", api_key_env=None,
                                      backoff_base_s=0.5, backoff_max_s=3.0, max_concurrency=2), None)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [client.backoff_s(retry) for _ in range(300)]
        assert cap / 2 <= min(waits) and max(waits) <= cap and max(waits) - min(waits) > cap / 4  # jittered

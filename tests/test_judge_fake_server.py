"""The fake judge server speaks the protocol the typed `openai` client expects, in-process and as a CLI."""
import subprocess
import sys

import openai
import pytest
from openai_server import FakeJudgeServer, Faults, criterion_met

from ruscarl_jax.data.types import Message, RubricItem
from ruscarl_jax.judge.grader import grader_prompt, parse_verdict


def ask(client: openai.OpenAI, response: str, criterion: str) -> bool:
    prompt = grader_prompt((Message("user", "q"),), response, RubricItem(criterion, 3))
    completion = client.chat.completions.create(model="fake-judge", messages=[{"role": "user", "content": prompt}])
    assert completion.usage.prompt_tokens > 0 and completion.choices[0].finish_reason == "stop"
    return parse_verdict(completion.choices[0].message.content).met


def test_typed_client_round_trip():
    with FakeJudgeServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["fake-judge"]
        cases = [("Take IBUPROFEN.", 'Mentions "ibuprofen"'), ("rest", 'Mentions "ibuprofen"'),
                 ("a b", 'Has "a" and "b"'), ("a", 'Has "a" and "b"'), ("anything", "No quoted phrase")]
        assert [ask(client, r, c) for r, c in cases] == [True, False, True, False, False]
        assert [criterion_met(r, c) for r, c in cases] == [True, False, True, False, False]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "not a grading prompt"}])
        assert server.requests == 5 and server.statuses[200] == 6  # 5 verdicts and the model list


def test_fault_rate_is_respected():
    with FakeJudgeServer(faults=Faults(rate=0.5, kinds=("500",), seed=1)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        failures = 0
        for _ in range(200):
            try:
                ask(client, "x", 'Says "x"')
            except openai.InternalServerError:
                failures += 1
    assert failures == server.fault_counts["500"] and 70 <= failures <= 130  # binomial(200, 0.5): +-4.2 sigma


def test_command_line_server():
    proc = subprocess.Popen([sys.executable, "-m", "ruscarl_jax.judge.fake_server", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY"
        client = openai.OpenAI(base_url=ready[1], api_key="unused", max_retries=0)
        assert ask(client, "hello there", 'Greets with "hello"') is True
    finally:
        proc.terminate()
        proc.wait(timeout=10)

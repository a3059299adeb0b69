"""The fake OpenAI-compatible judge server for tests (it lives in the library so that scripts and users
can run it too). See `ruscarl_jax.judge.fake_server` for the verdict rule, the fault knobs and the
counters.

    from openai_server import FakeJudgeServer, Faults
    with FakeJudgeServer(faults=Faults(rate=0.3)) as server:
        ... JudgeSettings(base_urls=(server.base_url,), model="fake-judge", api_key_env=None) ...
"""
from ruscarl_jax.judge.fake_server import (  # noqa: F401
    FAULT_KINDS,
    STYLES,
    FakeJudgeServer,
    Faults,
    criterion_met,
    parse_grader_prompt,
)

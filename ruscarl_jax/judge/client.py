"""The asynchronous chat-completions client of the judge: several OpenAI-compatible endpoints, bounded
concurrency, per-request deadlines, retries, and endpoint health.

- Transport: `openai.AsyncOpenAI` clients, several per endpoint ("lanes", each with a small HTTP
  connection pool: httpx's pool bookkeeping grows with its number of connections, so one pool of 256
  costs about three times the CPU per request of 128 pools of 2). Requests go through the client's
  documented raw path `client.post("/chat/completions", ..., cast_to=object)`: the same auth, timeouts
  and error classes as `chat.completions.create`, without building typed request and response models
  (measured at 1.3-2x the client CPU per call; see scripts/bench_judge.py).
  The SDK's own retries are off; this module retries, so that a retry can move to another endpoint.
- Limits: at most `max_concurrency` requests in flight overall and `max_concurrency_per_endpoint` on
  each endpoint; a request goes to the least-loaded healthy endpoint.
- Retries (up to `max_retries` more attempts, exponential backoff with jitter): 429 (the endpoint gets
  no requests until its Retry-After has passed), 408/409/5xx, timeouts, dropped connections, malformed
  responses, and replies the caller's `parse` rejects. Other 4xx end the criterion at once.
- Health: `endpoint_failures_to_down` consecutive failures (connection, timeout, 5xx) mark an endpoint
  down; it is skipped for `endpoint_cooldown_s` (doubling per failed probe), then probe requests try it
  (one at a time while another endpoint is healthy) and a success brings it back. When every endpoint
  is down, requests still go to the one that comes back first, so a run with one endpoint is paced by
  the backoff instead of stalling.
- Secrets: the API key is handed to the SDK only; every error text kept or raised is scrubbed of it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import math
import random
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import httpx2
import openai

from ruscarl_jax.judge.settings import JudgeSettings

T = TypeVar("T")

# Connections per HTTP pool ("lane"). httpx's pool scans all of its connections on every request and
# response, so a per-endpoint limit of L is served by ceil(L / LANE_CONNECTIONS) small pools.
LANE_CONNECTIONS = 2
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is capped (and the retry budget decides the rest)
RETRYABLE = frozenset({"rate_limited", "server_error", "timeout", "connection", "bad_response", "unparseable",
                       "http_408", "http_409"})


@dataclasses.dataclass
class ChatResult(Generic[T]):
    """The outcome of one prompt: `value` (what `parse` returned) or None with `error` after the retries."""

    value: T | None
    attempts: int
    latency_s: float
    error: str = ""


@dataclasses.dataclass(eq=False)
class _Endpoint:
    index: int
    url: str
    clients: list[openai.AsyncOpenAI]  # the lanes
    cap: int
    free_lanes: list[int] = dataclasses.field(default_factory=list)  # one entry per free connection slot
    in_flight: int = 0
    consecutive_failures: int = 0
    trips: int = 0  # times marked down since the last success
    epoch: int = 0  # bumped when marked down: failures of requests sent earlier do not count again
    down_until: float = 0.0
    blocked_until: float = 0.0  # Retry-After of a 429
    requests: int = 0
    failures: int = 0


class EndpointPool:
    """Which endpoint the next request uses; waits when none may take one now."""

    def __init__(self, endpoints: list[_Endpoint], failures_to_down: int, cooldown_s: float, max_cooldown_s: float):
        self.endpoints = endpoints
        self._failures_to_down, self._cooldown, self._max_cooldown = failures_to_down, cooldown_s, max_cooldown_s
        self._waiters: list[asyncio.Future] = []
        self._rotation = 0

    def _pick(self, now: float) -> _Endpoint | None:
        """The least-loaded healthy endpoint with a free slot. An endpoint back from down takes one probe
        at a time while a healthy one exists; with none healthy, probing ones take any load, and when
        all are down the one that comes back first does (a lone endpoint is never starved)."""
        n = len(self.endpoints)
        self._rotation = (self._rotation + 1) % n
        ordered = [self.endpoints[(self._rotation + k) % n] for k in range(n)]
        healthy_exists = any(ep.down_until <= now and not ep.trips for ep in ordered)
        best, best_load = None, math.inf
        for ep in ordered:
            if ep.in_flight >= ep.cap or ep.blocked_until > now or ep.down_until > now:
                continue
            if ep.trips and ep.in_flight and healthy_exists:
                continue
            load = ep.in_flight / ep.cap
            if load < best_load:
                best, best_load = ep, load
        if best is None and all(ep.down_until > now for ep in ordered):
            open_ = [ep for ep in ordered if ep.in_flight < ep.cap and ep.blocked_until <= now]
            best = min(open_, key=lambda ep: ep.down_until, default=None)
        return best

    async def acquire(self) -> tuple[_Endpoint, int]:
        """An endpoint with a free slot, and the lane (HTTP pool) of that slot."""
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            ep = self._pick(now)
            if ep is not None:
                ep.in_flight += 1
                ep.requests += 1
                return ep, ep.free_lanes.pop()
            later = [t for ep in self.endpoints for t in (ep.blocked_until, ep.down_until) if t > now]
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, timeout=(min(later) - now) if later else None)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(1)  # pass on a wake-up this task can no longer use
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self, count: int) -> None:
        while count and self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def release(self, ep: _Endpoint, lane: int) -> None:
        ep.in_flight -= 1
        ep.free_lanes.append(lane)
        self._wake(1)

    def success(self, ep: _Endpoint) -> None:
        came_back = ep.trips > 0
        ep.consecutive_failures, ep.trips, ep.down_until = 0, 0, 0.0
        if came_back:
            self._wake(len(self._waiters))

    def failure(self, ep: _Endpoint, sent_epoch: int) -> None:
        """A connection / timeout / 5xx failure of a request sent while the endpoint was at `sent_epoch`."""
        ep.failures += 1
        if sent_epoch != ep.epoch:
            return  # sent before the endpoint was marked down: already accounted for
        ep.consecutive_failures += 1
        if ep.consecutive_failures >= self._failures_to_down or ep.trips:
            ep.trips += 1
            ep.epoch += 1
            ep.consecutive_failures = 0
            ep.down_until = time.monotonic() + min(self._max_cooldown, self._cooldown * 2 ** (ep.trips - 1))

    def rate_limited(self, ep: _Endpoint, retry_after: float | None) -> None:
        if retry_after:
            ep.blocked_until = max(ep.blocked_until, time.monotonic() + retry_after)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), capped; None if absent."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:  # an HTTP date
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                continue
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


class ChatClient:
    """Sends one-message chat completions with the retry, limit and health rules above."""

    def __init__(self, settings: JudgeSettings, api_key: str | None):
        if not settings.base_urls:
            raise ValueError("JudgeSettings.base_urls: the LLM judge needs at least one endpoint")
        self.settings = settings
        self._secret = api_key or ""
        self._global = asyncio.Semaphore(settings.max_concurrency)
        cap = settings.max_concurrency_per_endpoint
        lanes = math.ceil(min(cap, settings.max_concurrency) / LANE_CONNECTIONS)
        ssl_context = httpx2.create_ssl_context()  # built once: loading the CA bundle costs ~50 ms
        limits = httpx2.Limits(max_connections=cap, max_keepalive_connections=cap)
        endpoints = []
        for i, url in enumerate(settings.base_urls):
            clients = [openai.AsyncOpenAI(
                base_url=url, api_key=api_key or "EMPTY", max_retries=0, timeout=settings.timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, verify=ssl_context))
                for _ in range(lanes)]
            free = [lane for _ in range(LANE_CONNECTIONS) for lane in reversed(range(lanes))]
            endpoints.append(_Endpoint(index=i, url=url, clients=clients, cap=cap, free_lanes=free))
        self.pool = EndpointPool(endpoints, settings.endpoint_failures_to_down, settings.endpoint_cooldown_s,
                                 max(settings.endpoint_cooldown_s, settings.backoff_max_s * 4))
        self._body = {"model": settings.model, **settings.sampling_body()}
        self.errors: dict[str, int] = {}
        self.requests = 0
        self.retries = 0  # attempts after the first, over all prompts
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.request_latencies: list[float] = []

    def redact(self, text: str) -> str:
        """`text` without the API key, shortened for records and logs."""
        if self._secret:
            text = text.replace(self._secret, "[redacted]")
        return text if len(text) <= 300 else text[:297] + "..."

    def backoff_s(self, retry: int) -> float:
        """Wait before retry `retry` (1-based): base * 2**(retry-1), capped, times a jitter in [0.5, 1]."""
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * 2 ** (retry - 1)) * (0.5 + 0.5 * random.random())

    async def complete(self, prompt: str, parse: Callable[[str], T]) -> ChatResult[T]:
        """Ask `prompt` until `parse(reply text)` returns (a ValueError from it means: retry)."""
        start = None  # the first attempt's send: waiting for a free slot before it is not latency
        error = ""
        attempts = 0
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(self.backoff_s(attempt))
            async with self._global:
                ep, lane = await self.pool.acquire()
                start = start or time.monotonic()
                attempts += 1
                try:
                    kind, detail = await self._send(ep, ep.clients[lane], prompt)
                finally:
                    self.pool.release(ep, lane)
            if kind is None:
                try:
                    return ChatResult(parse(detail), attempts, time.monotonic() - start, error)
                except ValueError as err:
                    kind, detail = "unparseable", str(err)
            self.errors[kind] = self.errors.get(kind, 0) + 1
            error = self.redact(f"{kind} (endpoint {ep.index}, attempt {attempts}): {detail}")
            if kind not in RETRYABLE:
                break
        return ChatResult(None, attempts, time.monotonic() - (start or time.monotonic()), error)

    async def _send(self, ep: _Endpoint, client: openai.AsyncOpenAI, prompt: str) -> tuple[str | None, str]:
        """One request: (None, reply text) or (error kind, detail). Updates the endpoint's health."""
        self.requests += 1
        epoch = ep.epoch
        body = {**self._body, "messages": [{"role": "user", "content": prompt}]}
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                data = await client.post("/chat/completions", body=body, cast_to=object)
        except openai.RateLimitError as err:
            self.pool.rate_limited(ep, retry_after_seconds(err.response.headers))
            return "rate_limited", f"HTTP 429: {err.message}"
        except openai.APIStatusError as err:
            if err.status_code >= 500:
                self.pool.failure(ep, epoch)
                return "server_error", f"HTTP {err.status_code}: {err.message}"
            return f"http_{err.status_code}", f"HTTP {err.status_code}: {err.message}"
        except (openai.APITimeoutError, TimeoutError):
            self.pool.failure(ep, epoch)
            return "timeout", f"no reply within {self.settings.timeout_s:g} s"
        except openai.APIConnectionError as err:
            self.pool.failure(ep, epoch)
            cause = err.__cause__
            return "connection", f"{err.message} ({type(cause).__name__ if cause else 'no cause'})"
        except (openai.APIError, ValueError) as err:
            return "bad_response", f"unreadable HTTP response ({type(err).__name__})"
        self.pool.success(ep)
        self.request_latencies.append(time.monotonic() - t0)
        try:
            content = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return "bad_response", "the reply is not a chat completion (no choices[0].message.content)"
        if not isinstance(content, str):
            return "bad_response", f"choices[0].message.content is {type(content).__name__}, not text"
        return None, content

    def endpoint_stats(self) -> list[dict[str, float]]:
        now = time.monotonic()
        return [{"requests": ep.requests, "failures": ep.failures, "in_flight": ep.in_flight,
                 "down": float(ep.down_until > now), "rate_limited": float(ep.blocked_until > now)}
                for ep in self.pool.endpoints]

    async def aclose(self) -> None:
        for ep in self.pool.endpoints:
            for client in ep.clients:
                await client.close()

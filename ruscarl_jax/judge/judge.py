"""The judge facade: grade (example, response) pairs against their rubrics, from synchronous code.

    judge = Judge(settings)
    grades = judge.grade([(example, response), ...])   # list[ResponseGrade], in order
    future = judge.submit(items)                         # concurrent.futures.Future: grade in the background
    judge.metrics(); judge.close()

The judge runs its own asyncio event loop on a background thread, so `submit` returns at once and the
trainer can sample the next batch while this one is graded. Within a batch (and across batches submitted
together) every criterion of every response is in flight at once, up to the concurrency bounds of
`JudgeSettings`. LLM criteria are graded one per request (or, with batch_criteria, all of a response in
one request, any it does not return validly then one per request) from the ORIGINAL conversation of
the example (never a scaffold) plus the response; with regrade_fraction a hash-chosen sample of fresh
verdicts is asked again and the agreement counted (`metrics`, `judge.telemetry`); rule criteria (`verifier:rule`) by `verifiers.check_rule`, on a
worker thread. Every criterion ends in a verdict or an explicit ungraded record (see `rewards`).

`submit` validates the whole batch before any request: a rule item with an unknown function or a bad
parameter, an example without positive points, or an LLM criterion when no endpoint is configured is
a ValueError naming the item. A judge with no `base_urls` works for rule-only rubrics and needs no key.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ruscarl_jax.data.types import Example
from ruscarl_jax.judge.cache import VerdictCache, verdict_key
from ruscarl_jax.judge.client import ChatClient
from ruscarl_jax.judge.batched import BATCH_VERSION, batched_prompt, parse_batched
from ruscarl_jax.judge.grader import parse_verdict
from ruscarl_jax.judge.rewards import CriterionVerdict, ResponseGrade, make_grade
from ruscarl_jax.judge.settings import JudgeSettings
from ruscarl_jax.judge.verifiers import check_rule, validate_rule_item

GradeItem = tuple[Example, str]
_LATENCY_WINDOW = 100_000  # verdict latencies kept for the percentiles


def read_api_key(settings: JudgeSettings) -> str | None:
    """The key from the environment variable the settings name (None when they name none)."""
    name = settings.api_key_env
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key:
        raise ValueError(f"JudgeSettings.api_key_env: environment variable {name} is not set or empty (it must "
                         f"hold the judge's API key; set api_key_env=None for a server without auth)")
    return key


class Judge:
    """Grades rubric criteria with an LLM judge and rule verifiers; see the module docstring."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        api_key = read_api_key(settings) if settings.base_urls else None
        self._secret = api_key or ""
        self._template = settings.grader_template()
        self._version = self._template.version + (f"+{BATCH_VERSION}" if settings.batch_criteria else "")
        self._cache = (VerdictCache(settings.cache_path, settings.model, self._version)
                       if settings.cache_path else None)
        self._loop = _new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ruscarl-judge", daemon=True)
        self._thread.start()
        self._client: ChatClient | None = None
        if settings.base_urls:
            try:
                self._client = self._run(self._make_client(api_key))
            except BaseException:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                raise
        self._pending: set[concurrent.futures.Future] = set()
        self._closed = False
        self._counts = collections.Counter()
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._active_batches = 0
        self._active_since = 0.0
        self._active_s = 0.0

    async def _make_client(self, api_key: str | None) -> ChatClient:
        return ChatClient(self.settings, api_key)

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    # -- public API ----------------------------------------------------------------------------------
    def submit(self, items: Sequence[GradeItem]) -> concurrent.futures.Future:
        """Start grading `items` in the background; the future's result is list[ResponseGrade]."""
        if self._closed:
            raise RuntimeError("Judge.submit: the judge is closed")
        items = self._validate(items)
        future = asyncio.run_coroutine_threadsafe(self._grade_batch(items), self._loop)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def grade(self, items: Sequence[GradeItem]) -> list[ResponseGrade]:
        """Grade `items` and wait for the result."""
        return self.submit(items).result()

    async def agrade(self, items: Sequence[GradeItem]) -> list[ResponseGrade]:
        """`grade` for callers inside their own event loop."""
        return await asyncio.wrap_future(self.submit(items))

    def metrics(self) -> dict[str, float]:
        """Counters since the judge started: verdicts (llm, rule, cached), ungraded, requests, retries,
        errors by kind, tokens, LLM verdicts/s over the time batches were in flight, latency percentiles
        (s, per LLM verdict: first attempt to verdict, backoff included), per-endpoint requests/failures."""
        if self._closed:
            return self._snapshot()
        return self._run(self._async_snapshot())

    def close(self) -> None:
        """Cancel unfinished batches, close the HTTP clients and the cache, stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        for future in list(self._pending):
            future.cancel()
        try:
            self._run(self._shutdown(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            if self._cache is not None:
                self._cache.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Judge(endpoints={len(self.settings.base_urls)}, model={self.settings.model!r})"

    # -- validation ------------------------------------------------------------------------------------
    def _validate(self, items: Sequence[GradeItem]) -> list[GradeItem]:
        items = list(items)
        checked: set[int] = set()
        for n, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Example)):
                raise ValueError(f"Judge.submit: item {n} must be an (Example, response text) pair")
            example, response = item
            if not isinstance(response, str):
                raise ValueError(f"Judge.submit: item {n} (example {example.id!r}): the response is "
                                 f"{type(response).__name__}, not text")
            if id(example) in checked:
                continue
            checked.add(id(example))
            if example.positive_points <= 0:
                raise ValueError(f"Judge.submit: item {n}: example {example.id!r} has no criterion with positive points")
            for j, criterion in enumerate(example.rubric):
                where = f"Judge.submit: item {n}: example {example.id!r} rubric[{j}]"
                if criterion.is_rule:
                    validate_rule_item(criterion, where)
                elif self._client is None:
                    raise ValueError(f"{where} needs the LLM judge, but JudgeSettings.base_urls is empty")
        return items

    # -- grading (on the loop thread) -------------------------------------------------------------------
    async def _grade_batch(self, items: list[GradeItem]) -> list[ResponseGrade]:
        if self._active_batches == 0:
            self._active_since = time.monotonic()
        self._active_batches += 1
        try:
            return await self._grade_all(items)
        except Exception as err:  # unexpected: re-raise without anything secret in the text
            raise RuntimeError(self._redact(f"judge batch failed: {type(err).__name__}: {err}")) from None
        finally:
            self._active_batches -= 1
            if self._active_batches == 0:
                self._active_s += time.monotonic() - self._active_since

    async def _grade_all(self, items: list[GradeItem]) -> list[ResponseGrade]:
        records: list[list[CriterionVerdict | None]] = [[None] * len(ex.rubric) for ex, _ in items]
        rule_jobs = [(i, j) for i, (ex, _) in enumerate(items) for j, c in enumerate(ex.rubric) if c.is_rule]
        llm_jobs = [(i, j) for i, (ex, _) in enumerate(items) for j, c in enumerate(ex.rubric) if not c.is_rule]
        keys: dict[tuple[int, int], str] = {}
        if self._cache is not None and llm_jobs:
            keys = {(i, j): verdict_key(items[i][0].messages, items[i][1], items[i][0].rubric[j], self.settings.model,
                                        self._version) for i, j in llm_jobs}
            hits = self._cache.get_many(keys.values())
            for (i, j), key in keys.items():
                if key in hits:
                    met, explanation = hits[key]
                    records[i][j] = CriterionVerdict(j, met, False, explanation, "llm", 0, 0.0, cached=True)
            self._counts["cache_hits"] += sum(key in hits for key in keys.values())
            llm_jobs = [job for job in llm_jobs if records[job[0]][job[1]] is None]

        if self.settings.batch_criteria:
            by_item: dict[int, list[int]] = collections.defaultdict(list)
            for i, j in llm_jobs:
                by_item[i].append(j)
            work = [self._grade_batched(items, i, js) for i, js in by_item.items()]
        else:
            work = [self._grade_llm(items, i, j) for i, j in llm_jobs]
        if rule_jobs:
            work.append(asyncio.to_thread(_run_rules, items, rule_jobs))
        results = await asyncio.gather(*work)
        llm_results = results[:-1] if rule_jobs else results
        for (i, _), verdict in zip(by_item.items() if self.settings.batch_criteria else llm_jobs, llm_results):
            for v in (verdict if isinstance(verdict, list) else [verdict]):
                records[i][v.index] = v
        for i, verdict in (results[-1] if rule_jobs else []):
            records[i][verdict.index] = verdict
        self._counts["rule_verdicts"] += len(rule_jobs)
        if self.settings.regrade_fraction > 0:
            await self._regrade(items, [(i, j) for i, j in llm_jobs if not records[i][j].ungraded], records)

        if self._cache is not None:
            fresh = [(keys[(i, j)], records[i][j].met, records[i][j].explanation) for i, j in llm_jobs
                     if not records[i][j].ungraded]
            self._cache.put_many(fresh)
        policy = self.settings.ungraded_policy
        return [make_grade(ex.id, ex.rubric, recs, policy) for (ex, _), recs in zip(items, records)]

    async def _grade_llm(self, items: list[GradeItem], i: int, j: int, count: bool = True) -> CriterionVerdict:
        """One criterion, one request; `count`: it is a verdict of the batch (not a re-grade check)."""
        example, response = items[i]
        prompt = self._template.render(example.messages, response, example.rubric[j])
        result = await self._client.complete(prompt, parse_verdict)
        if not count:
            return CriterionVerdict(j, result.value.met if result.value else None, result.value is None, "", "llm",
                                    result.attempts, result.latency_s, result.error)
        self._latencies.append(result.latency_s)
        if result.value is None:
            self._counts["ungraded"] += 1
            return CriterionVerdict(j, None, True, "", "llm", result.attempts, result.latency_s, result.error)
        self._counts["llm_verdicts"] += 1
        return CriterionVerdict(j, result.value.met, False, result.value.explanation, "llm", result.attempts,
                                result.latency_s, result.error)

    async def _grade_batched(self, items: list[GradeItem], i: int, js: list[int]) -> list[CriterionVerdict]:
        """All of `js` in one request; those the reply does not validly return, one request each."""
        example, response = items[i]
        prompt = batched_prompt(example.messages, response, [(j, example.rubric[j]) for j in js],
                                self.settings.show_points)
        self._counts["batch_requests"] += 1
        result = await self._client.complete(prompt, lambda text: parse_batched(text, js))
        found = result.value or {}
        self._latencies.extend([result.latency_s] * len(found))
        self._counts["llm_verdicts"] += len(found)
        out = [CriterionVerdict(j, v.met, False, v.explanation, "llm", result.attempts, result.latency_s, result.error)
               for j, v in found.items()]
        missing = [j for j in js if j not in found]
        self._counts["batch_fallbacks"] += len(missing)
        out += await asyncio.gather(*(self._grade_llm(items, i, j) for j in missing))
        return out

    async def _regrade(self, items: list[GradeItem], jobs: list[tuple[int, int]],
                       records: list[list[CriterionVerdict | None]]) -> None:
        """Ask a hash-chosen `regrade_fraction` of these fresh verdicts again (one request each); count agreement.
        The first verdict is the one kept."""
        chosen = [(i, j) for i, j in jobs if _regrade_pick(items[i], j, self.settings.regrade_fraction)]
        again = await asyncio.gather(*(self._grade_llm(items, i, j, count=False) for i, j in chosen))
        for (i, j), second in zip(chosen, again):
            if not second.ungraded:
                self._counts["regraded"] += 1
                self._counts["regrade_agree"] += int(second.met == records[i][j].met)

    async def _async_snapshot(self) -> dict[str, float]:
        return self._snapshot()

    def _snapshot(self) -> dict[str, float]:
        active = self._active_s + (time.monotonic() - self._active_since if self._active_batches else 0.0)
        out: dict[str, float] = {
            "llm_verdicts": self._counts["llm_verdicts"], "rule_verdicts": self._counts["rule_verdicts"],
            "cache_hits": self._counts["cache_hits"], "ungraded": self._counts["ungraded"],
            "batch_requests": self._counts["batch_requests"], "batch_fallbacks": self._counts["batch_fallbacks"],
            "regraded": self._counts["regraded"], "regrade_agree": self._counts["regrade_agree"],
            "active_seconds": active,
            "verdicts_per_second": self._counts["llm_verdicts"] / active if active > 0 else 0.0,
        }
        lat = np.asarray(self._latencies, dtype=np.float64)
        for q in (50, 90, 99):
            out[f"latency_p{q}_s"] = float(np.percentile(lat, q)) if lat.size else float("nan")
        client = self._client
        if client is not None:
            out.update(requests=client.requests, prompt_tokens=client.prompt_tokens,
                       completion_tokens=client.completion_tokens,
                       retries=client.retries, parse_failures=client.errors.get("unparseable", 0))
            out.update({f"errors/{kind}": n for kind, n in sorted(client.errors.items())})
            for k, stats in enumerate(client.endpoint_stats()):
                out.update({f"endpoint{k}/{name}": value for name, value in stats.items()})
        return out

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        await self._loop.shutdown_default_executor()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it comes with orbax-checkpoint): ~15% less CPU per judge request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _regrade_pick(item: GradeItem, j: int, fraction: float) -> bool:
    """Whether criterion j of this (example, response) is in the re-grade sample (stable across runs)."""
    example, response = item
    digest = hashlib.sha256(f"{example.id}\x00{j}\x00{response}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2.0 ** 64


def _run_rules(items: list[GradeItem], jobs: list[tuple[int, int]]) -> list[tuple[int, CriterionVerdict]]:
    """Rule verdicts for (item, criterion) jobs (runs on a worker thread)."""
    out = []
    for i, j in jobs:
        example, response = items[i]
        start = time.monotonic()
        met = check_rule(example.rubric[j], response)
        out.append((i, CriterionVerdict(j, met, False, f"rule {example.rubric[j].tag_value('function')}", "rule", 0,
                                        time.monotonic() - start)))
    return out

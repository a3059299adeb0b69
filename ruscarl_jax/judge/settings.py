"""`JudgeSettings`: every knob of the rubric judge in one frozen, validated dataclass.

The trainer's ml_collections config section `judge` maps onto these fields one to one. The API key is
never a field: `api_key_env` names the environment variable that holds it, and the judge reads it only
when it has endpoints to talk to (a run whose criteria are all rule-verified needs no server and no key).
"""
from __future__ import annotations

import dataclasses
import math
import types
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ruscarl_jax.judge.grader import DEFAULT, VERDICT_SCHEMA, GraderTemplate

UNGRADED_POLICIES: tuple[str, ...] = ("drop_group", "graded_only")
RESPONSE_FORMATS: tuple[str, ...] = ("none", "json_schema")


def _fail(field: str, message: str) -> None:
    raise ValueError(f"JudgeSettings.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Endpoints, limits, retries and sampling of the LLM judge.

    base_urls: OpenAI-compatible endpoints ("http://host:8000/v1"); load is spread across them.
    model: the judge model name sent with each request (may be empty only when base_urls is).
    api_key_env: the environment variable holding the API key; None for a server without auth.
    max_concurrency / max_concurrency_per_endpoint: requests in flight, overall and per endpoint.
    timeout_s: the deadline of one request (connect + wait + read).
    max_retries: further attempts after the first for 429, 5xx, timeouts, dropped connections and
        unparseable verdicts; then the criterion is recorded as ungraded.
    backoff_base_s / backoff_max_s: retry k waits about base * 2**(k-1) (capped), with jitter.
    temperature / max_tokens: judge sampling (the library default is deterministic: temperature 0).
    top_p / presence_penalty: OpenAI sampling fields, sent only when set (None: the server's default).
    top_k: sent in the request body as `top_k` (a vLLM / SGLang extension), only when set; 0 or None = off.
    extra_body: extra request fields, e.g. {"chat_template_kwargs": {"enable_thinking": False}} (thinking
        off for Qwen3 judges).
    cache_path: SQLite verdict cache file; None (or "") turns the cache off (the training default).
    ungraded_policy: 'drop_group' (a response with an ungraded criterion has no score and its group is
        left out of the update) or 'graded_only' (score over the graded criteria).
    endpoint_failures_to_down: consecutive failures (connection, 5xx, timeout) that mark an endpoint down.
    endpoint_cooldown_s: how long a down endpoint is skipped before one probe request tries it again
        (doubling on each further failed probe, up to backoff_max_s * 4).
    batch_criteria: grade all LLM criteria of a response in one request (`judge.batched`); criteria the
        reply does not validly return fall back to per-criterion requests. Off: one request per criterion
        (what the paper did).
    template_path: a grader template file with <<conversation>> / <<response>>, <<rubric_item>>,
        <<points>> placeholders (`grader.GraderTemplate`), checked here; None: the built-in template.
    show_points: whether the rubric item is shown with its points ("[5] ...").
    regrade_fraction: the fraction of fresh LLM verdicts asked a second time (a hash of the response and
        criterion picks them); the agreement is reported per step.
    max_parse_failure_rate: a step whose unparseable replies exceed this fraction of its judge requests
        stops the run (None: no bound).
    met_rate_tag_prefixes: rubric tags with these prefixes get a per-step met-rate metric.
    response_format: 'none' (free text; the verdict is found in the reply, as the reference's judge does)
        or 'json_schema' (the verdict's JSON schema, `grader.VERDICT_SCHEMA`, is sent as the OpenAI
        `response_format`, so a server with structured outputs, e.g. vLLM, can only reply with a verdict;
        parsing accepts both). Per-criterion grading only (batch_criteria replies are lists).
    """

    base_urls: tuple[str, ...] = ()
    model: str = ""
    api_key_env: str | None = "RUSCARL_JUDGE_API_KEY"
    max_concurrency: int = 256
    max_concurrency_per_endpoint: int = 256
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 2048
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    extra_body: Mapping[str, Any] | None = None
    cache_path: str | None = None
    ungraded_policy: str = "drop_group"
    endpoint_failures_to_down: int = 3
    endpoint_cooldown_s: float = 5.0
    batch_criteria: bool = False
    template_path: str | None = None
    show_points: bool = True
    regrade_fraction: float = 0.0
    max_parse_failure_rate: float | None = None
    met_rate_tag_prefixes: tuple[str, ...] = ("axis:",)
    response_format: str = "none"

    def __post_init__(self) -> None:
        urls = self.base_urls
        if isinstance(urls, str):
            urls = (urls,)
        if not isinstance(urls, (tuple, list)):
            _fail("base_urls", f"must be a list of URLs, got {type(urls).__name__}")
        urls = tuple(str(u).rstrip("/") for u in urls)
        for url in urls:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                _fail("base_urls", f"not an http(s) URL: {url!r}")
        if len(set(urls)) != len(urls):
            _fail("base_urls", "lists the same URL twice")
        object.__setattr__(self, "base_urls", urls)
        if urls and not (isinstance(self.model, str) and self.model):
            _fail("model", "a judge model name is required when base_urls is set")
        if self.api_key_env is not None and not (isinstance(self.api_key_env, str) and self.api_key_env):
            _fail("api_key_env", "must be an environment variable name or None")
        for name in ("max_concurrency", "max_concurrency_per_endpoint", "max_tokens", "endpoint_failures_to_down"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, f"must be an integer >= 1, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            _fail("max_retries", f"must be an integer >= 0, got {self.max_retries!r}")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s", "temperature", "endpoint_cooldown_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                _fail(name, f"must be a finite number >= 0, got {value!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            _fail("top_p", f"must be in (0, 1] or None, got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            _fail("top_k", f"must be an integer >= 0 or None, got {self.top_k!r}")
        if self.presence_penalty is not None and (
                isinstance(self.presence_penalty, bool) or not isinstance(self.presence_penalty, (int, float))
                or not -2 <= self.presence_penalty <= 2):
            _fail("presence_penalty", f"must be in [-2, 2] (the OpenAI range) or None, got {self.presence_penalty!r}")
        if self.timeout_s <= 0:
            _fail("timeout_s", f"must be > 0, got {self.timeout_s!r}")
        extra = self.extra_body
        if extra is not None:
            if hasattr(extra, "to_dict"):  # an ml_collections ConfigDict
                extra = extra.to_dict()
            if not isinstance(extra, Mapping):
                _fail("extra_body", f"must be a mapping, got {type(extra).__name__}")
            reserved = {"model", "messages", "temperature", "max_tokens", "stream", "top_p", "top_k",
                        "presence_penalty", "response_format"} & set(extra)
            if reserved:
                _fail("extra_body", f"may not set {sorted(reserved)} (they have their own settings)")
            object.__setattr__(self, "extra_body", types.MappingProxyType(dict(extra)))
        if self.cache_path == "":  # a config file's way of saying "off"
            object.__setattr__(self, "cache_path", None)
        if self.cache_path is not None and not isinstance(self.cache_path, str):
            _fail("cache_path", f"must be a file path or None, got {self.cache_path!r}")
        for name in ("batch_criteria", "show_points"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.template_path == "":
            object.__setattr__(self, "template_path", None)
        if self.template_path is not None:
            if self.batch_criteria:
                _fail("batch_criteria", "cannot be combined with template_path (the batched prompt has its own wording)")
            try:
                GraderTemplate.from_file(self.template_path, self.show_points)
            except ValueError as err:
                _fail("template_path", str(err))
        rate = self.regrade_fraction
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            _fail("regrade_fraction", f"must be a number in [0, 1], got {rate!r}")
        bound = self.max_parse_failure_rate
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0.0 <= bound < 1.0):
            _fail("max_parse_failure_rate", f"must be a number in [0, 1) or None, got {bound!r}")
        prefixes = self.met_rate_tag_prefixes
        if isinstance(prefixes, str) or not all(isinstance(p, str) and p for p in prefixes):
            _fail("met_rate_tag_prefixes", f"must be a list of non-empty tag prefixes, got {prefixes!r}")
        object.__setattr__(self, "met_rate_tag_prefixes", tuple(prefixes))
        if self.response_format not in RESPONSE_FORMATS:
            _fail("response_format", f"{self.response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}")
        if self.response_format == "json_schema" and self.batch_criteria:
            _fail("response_format", "'json_schema' sends the one-criterion verdict schema; batch_criteria asks for "
                                     "a list of verdicts (use response_format='none' with batch_criteria)")
        if self.ungraded_policy not in UNGRADED_POLICIES:
            _fail("ungraded_policy", f"unknown policy {self.ungraded_policy!r}; valid: {', '.join(UNGRADED_POLICIES)}")

    def grader_template(self) -> GraderTemplate:
        """The grader template these settings use (the file at template_path, or the built-in one)."""
        if self.template_path is None:
            return DEFAULT if self.show_points else GraderTemplate(show_points=False)
        return GraderTemplate.from_file(self.template_path, self.show_points)

    def sampling_body(self) -> dict[str, Any]:
        """The sampling fields of one chat-completions request (unset optional fields are left out)."""
        body: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.presence_penalty is not None:
            body["presence_penalty"] = self.presence_penalty
        if self.top_k:
            body["top_k"] = self.top_k
        if self.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA}}
        return {**body, **dict(self.extra_body or {})}

"""The rubric judge: grades every criterion of a response with an LLM judge behind OpenAI-compatible
endpoints or with a rule verifier, and turns the verdicts into rewards.

- `judge.Judge`: the facade (`grade`, background `submit`, `metrics`, `close`).
- `settings.JudgeSettings`: endpoints, limits, retries, sampling, cache, ungraded policy.
- `grader`: the grading prompt (HealthBench structure, rubric item last), user templates, verdict parsing.
- `batched`: one request grading every criterion of a response (opt-in), with per-criterion fallback.
- `telemetry`: per-step reliability metrics and the parse-failure bound.
- `verifiers`: rule verifiers (`verifier:rule` criteria): math_verify, exact, contains, not_contains, regex.
- `client`: the async OpenAI client with endpoint health, bounded concurrency and retries.
- `rewards`: verdict records, scores, the ungraded policies and group dropping.
- `cache`: the SQLite verdict cache.
- `fake_server`: a local OpenAI-compatible server with deterministic verdicts and fault injection.
"""

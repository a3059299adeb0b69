"""Read rubric datasets into validated `Example`s: HealthBench JSONL, verl/RuscaRL parquet, plain JSONL.

Formats (`fmt`):
- "healthbench": one JSON object a line, `{"prompt_id", "prompt": [messages], "rubrics": [items]}`.
- "verl": parquet with a `prompt` column (messages) and `reward_model` (a struct, or its JSON text,
  holding `rubrics`). The id comes from an `id` / `prompt_id` column or `extra_info.{id, prompt_id,
  index}`; when there is none it is `content_id(...)`, a hash of the conversation and rubric.
- "jsonl": the field names of `Example`: `{"id", "messages": [messages], "rubric": [items]}`.
- "auto": parquet by suffix, otherwise the keys of the first JSON object in the file decide.
A missing id in the JSONL formats also falls back to `content_id`.

Every row is validated; a problem raises `DataError` naming the file, the line (1-based, JSONL) or row
(0-based, parquet) and the field. With `on_bad_row="skip"` bad rows are left out instead and counted
in the `LoadReport` that `load_examples` returns and logs at the end.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Iterator

from etils import epath

from ruscarl_jax.data.types import RULE_FUNCTIONS, ROLES, Example, Message, RubricItem

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("auto", "healthbench", "verl", "jsonl")
BAD_ROW_POLICIES: tuple[str, ...] = ("fail", "skip")

# Field names of each format: (id keys, messages key, rubric key).
_HEALTHBENCH = (("prompt_id", "id"), "prompt", "rubrics")
_PLAIN = (("id",), "messages", "rubric")


class DataError(ValueError):
    """A bad input row. `reason` is a short code the load report counts skipped rows by."""

    def __init__(self, source: str, location: str | None, field: str | None, problem: str, reason: str):
        self.source, self.location, self.field, self.problem, self.reason = source, location, field, problem, reason
        where = ", ".join(p for p in (source, location, f"field '{field}'" if field else None) if p)
        super().__init__(f"{where}: {problem}")


class _RowError(Exception):
    """Raised inside row parsing; the caller adds the file and line/row."""

    def __init__(self, field: str | None, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason


@dataclasses.dataclass
class LoadReport:
    """What one load read, kept and skipped (by reason), with the messages of the skipped rows."""

    source: str
    fmt: str
    rows_read: int = 0
    loaded: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source} ({self.fmt}): read {self.rows_read} rows, loaded {self.loaded}"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f", skipped {self.num_skipped} ({reasons})"
        return text


def content_id(messages: tuple[Message, ...], rubric: tuple[RubricItem, ...]) -> str:
    """A stable id from an example's content, for data without ids (same content -> same id)."""
    payload = json.dumps(
        [[m.to_dict() for m in messages], [[r.criterion, float(r.points), list(r.tags)] for r in rubric]],
        ensure_ascii=True, sort_keys=True, separators=(",", ":"),
    )
    return "c-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _parse_messages(raw: Any, key: str) -> tuple[Message, ...]:
    if raw is None:
        raise _RowError(key, "missing conversation", "empty_conversation")
    if not isinstance(raw, (list, tuple)):
        raise _RowError(key, f"conversation must be a list of messages, got {type(raw).__name__}", "bad_conversation")
    if not raw:
        raise _RowError(key, "empty conversation", "empty_conversation")
    messages = []
    for i, msg in enumerate(raw):
        field = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(field, f"message must be an object, got {type(msg).__name__}", "bad_conversation")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _RowError(f"{field}.role", f"unknown role {role!r} (valid: {', '.join(ROLES)})", "unknown_role")
        if not isinstance(content, str):
            raise _RowError(f"{field}.content", f"content must be a string, got {type(content).__name__}",
                            "bad_conversation")
        if role == "system" and i != 0:
            raise _RowError(f"{field}.role", "a system message may only be the first message", "misplaced_system")
        messages.append(Message(role=role, content=content))
    if messages[-1].role != "user":
        raise _RowError(f"{key}[{len(messages) - 1}].role",
                        f"the last message must be from the user, not {messages[-1].role!r}", "last_not_user")
    return tuple(messages)


def _parse_item(raw: Any, field: str) -> RubricItem:
    if not isinstance(raw, dict):
        raise _RowError(field, f"rubric item must be an object, got {type(raw).__name__}", "bad_rubric")
    criterion = raw.get("criterion")
    if criterion is None:
        raise _RowError(f"{field}.criterion", "missing criterion", "missing_criterion")
    if not isinstance(criterion, str):
        raise _RowError(f"{field}.criterion", f"criterion must be a string, got {type(criterion).__name__}",
                        "bad_rubric")
    if not criterion.strip():
        raise _RowError(f"{field}.criterion", "empty criterion", "missing_criterion")
    points = raw.get("points")
    if isinstance(points, bool) or not isinstance(points, (int, float)):
        raise _RowError(f"{field}.points", f"non-numeric points {points!r}", "bad_points")
    if not math.isfinite(points):
        raise _RowError(f"{field}.points", f"non-finite points {points!r}", "bad_points")
    tags = raw.get("tags", ())
    if tags is None:
        tags = ()
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise _RowError(f"{field}.tags", "tags must be a list of strings", "bad_rubric")
    item = RubricItem(criterion=criterion, points=float(points), tags=tuple(tags))
    if item.is_rule:
        function = item.tag_value("function")
        if function not in RULE_FUNCTIONS:
            problem = ("a 'verifier:rule' item needs a 'function:NAME' tag" if function is None
                       else f"unknown rule function {function!r}")
            raise _RowError(f"{field}.tags", f"{problem} (valid: {', '.join(sorted(RULE_FUNCTIONS))})",
                            "bad_rule_function")
    return item


def _parse_rubric(raw: Any, key: str) -> tuple[RubricItem, ...]:
    if raw is None:
        raise _RowError(key, "missing rubric", "bad_rubric")
    if not isinstance(raw, (list, tuple)):
        raise _RowError(key, f"rubric must be a list of items, got {type(raw).__name__}", "bad_rubric")
    rubric = tuple(_parse_item(item, f"{key}[{i}]") for i, item in enumerate(raw))
    if not any(item.points > 0 for item in rubric):
        raise _RowError(key, "no criterion with positive points (the score would divide by zero)",
                        "no_positive_points")
    return rubric


def _parse_id(row: dict, keys: tuple[str, ...]) -> tuple[str | None, str]:
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _RowError(key, f"id must be a string or integer, got {type(value).__name__}", "bad_id")
        if str(value).strip() == "":
            raise _RowError(key, "empty id", "bad_id")
        return str(value), key
    return None, keys[0]


def _example(row: Any, id_keys: tuple[str, ...], messages_key: str, rubric_key: str,
             rubric_raw: Any = None, rubric_field: str | None = None, id_override: Any = None
             ) -> tuple[Example, str]:
    if not isinstance(row, dict):
        raise _RowError(None, f"expected a JSON object, got {type(row).__name__}", "bad_row")
    example_id, id_field = _parse_id(id_override if id_override is not None else row, id_keys)
    messages = _parse_messages(row.get(messages_key), messages_key)
    rubric_field = rubric_field or rubric_key
    rubric = _parse_rubric(row.get(rubric_key) if rubric_raw is None else rubric_raw, rubric_field)
    if example_id is None:
        example_id = content_id(messages, rubric)
    return Example(id=example_id, messages=messages, rubric=rubric), id_field


def _jsonl_rows(path: epath.Path) -> Iterator[tuple[str, Any]]:
    """Yield ("line N", parsed object or _RowError) for each non-blank line."""
    with epath.Path(path).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {number}", _RowError(None, f"invalid UTF-8 at byte {e.start} of the line", "bad_utf8")
                continue
            if not text.strip():
                continue
            try:
                yield f"line {number}", json.loads(text)
            except json.JSONDecodeError as e:
                yield f"line {number}", _RowError(
                    None, f"invalid or truncated JSON ({e.msg} at column {e.colno})", "bad_json")


def _verl_rows(path: epath.Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only needed for this format

    try:
        with epath.Path(path).open("rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(str(path), None, None, f"cannot read parquet: {e}", "bad_file") from e
    for column in ("prompt", "reward_model"):
        if column not in table.column_names:
            raise DataError(str(path), None, column, f"missing column (columns: {', '.join(table.column_names)})",
                            "bad_file")
    for number, row in enumerate(table.to_pylist()):
        yield f"row {number}", row


def _verl_example(row: dict) -> tuple[Example, str]:
    reward_model = row.get("reward_model")
    if isinstance(reward_model, str):
        try:
            reward_model = json.loads(reward_model)
        except json.JSONDecodeError as e:
            raise _RowError("reward_model", f"invalid JSON ({e.msg})", "bad_json") from e
    if not isinstance(reward_model, dict):
        raise _RowError("reward_model", "must be an object with 'rubrics'", "bad_rubric")
    ids: dict[str, Any] = {}
    extra = row.get("extra_info")
    for key in ("index", "prompt_id", "id"):  # later keys win: explicit ids over row positions
        if isinstance(extra, dict) and extra.get(key) is not None:
            ids = {f"extra_info.{key}": extra[key]}
    for key in ("prompt_id", "id"):
        if row.get(key) is not None:
            ids = {key: row[key]}
    return _example(row, tuple(ids) or ("id",), "prompt", "rubrics", rubric_raw=reward_model.get("rubrics"),
                    rubric_field="reward_model.rubrics", id_override=ids)


def detect_format(path: str | os.PathLike) -> str:
    """The format of `path`: "verl" for parquet, else from the keys of the first JSON object."""
    path = epath.Path(path)
    if path.suffix == ".parquet":
        return "verl"
    for _, row in _jsonl_rows(path):
        if isinstance(row, dict):
            if "messages" in row or "rubric" in row:
                return "jsonl"
            return "healthbench"
    return "healthbench"  # nothing parseable: let the loader report the per-line problems


def load_examples(path: str | os.PathLike, fmt: str = "auto", on_bad_row: str = "fail"
                  ) -> tuple[list[Example], LoadReport]:
    """Load and validate all examples of `path`; returns them in file order and the load report.

    on_bad_row: "fail" (default) raises `DataError` at the first bad row; "skip" leaves bad rows out,
    counts them by reason in the report and logs the summary. Duplicate ids are a bad row (the later
    one). A file with no valid example raises `DataError` either way.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    report = LoadReport(source=str(path), fmt=fmt)
    rows = _verl_rows(path) if fmt == "verl" else _jsonl_rows(path)
    keys = _HEALTHBENCH if fmt == "healthbench" else _PLAIN
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for location, row in rows:
        report.rows_read += 1
        try:
            if isinstance(row, _RowError):
                raise row
            example, id_field = _verl_example(row) if fmt == "verl" else _example(row, *keys)
            if example.id in first_seen:
                raise _RowError(id_field, f"duplicate id {example.id!r} (first at {first_seen[example.id]})",
                                "duplicate_id")
        except _RowError as e:
            error = DataError(str(path), location, e.field, e.problem, e.reason)
            if on_bad_row == "fail":
                raise error from None
            report.skipped[e.reason] += 1
            report.problems.append(str(error))
            continue
        first_seen[example.id] = location
        examples.append(example)
    report.loaded = len(examples)
    if report.skipped:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
    if not examples:
        raise DataError(str(path), None, None, f"no valid examples ({report.summary()})", "empty_file")
    return examples, report


def save_jsonl(examples: list[Example], path: str | os.PathLike) -> None:
    """Write examples in the plain "jsonl" format (the fields of `Example`), UTF-8, one a line."""
    with epath.Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            row = {
                "id": ex.id,
                "messages": [m.to_dict() for m in ex.messages],
                "rubric": [{"criterion": r.criterion, "points": r.points, "tags": list(r.tags)} for r in ex.rubric],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

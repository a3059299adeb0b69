"""A SQLite verdict cache, so evaluation reruns do not pay for the same verdict twice.

The key is a SHA-256 over (conversation, response, criterion text and points, judge model, grader
template version): change any of them and the verdict is asked again. Only LLM verdicts are stored,
never ungraded outcomes (those are retried on the next run). Off in training by default
(`JudgeSettings.cache_path=None`): a policy rarely produces the same response twice.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence

from ruscarl_jax.data.types import Message, RubricItem

_SCHEMA = """CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY, met INTEGER NOT NULL, explanation TEXT NOT NULL,
    model TEXT NOT NULL, template_version TEXT NOT NULL, created REAL NOT NULL)"""
_CHUNK = 500  # keys per SELECT (well under SQLite's bound-parameter limit)


def verdict_key(messages: Sequence[Message], response: str, item: RubricItem, model: str, template_version: str) -> str:
    payload = json.dumps({
        "conversation": [[m.role, m.content] for m in messages], "response": response,
        "criterion": item.criterion, "points": float(item.points), "model": model, "template": template_version,
    }, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """key -> (met, explanation) in one SQLite file; safe to call from several threads."""

    def __init__(self, path: str | pathlib.Path, model: str, template_version: str):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._model, self._template = model, template_version
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.Error as err:
            raise ValueError(f"verdict cache {self.path}: cannot open ({err})") from None

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[bool, str]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, tuple[bool, str]] = {}
        with self._lock:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                rows = self._db.execute(
                    f"SELECT key, met, explanation FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((k, (bool(met), text)) for k, met, text in rows)
        return found

    def put_many(self, entries: Iterable[tuple[str, bool, str]]) -> None:
        now = time.time()
        rows = [(k, int(bool(met)), text, self._model, self._template, now) for k, met, text in entries]
        if not rows:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

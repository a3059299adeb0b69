"""The verdict cache: the key covers every input of a verdict; entries survive reopening."""
import sqlite3

import pytest

from ruscarl_jax.data.types import Message, RubricItem
from ruscarl_jax.judge.cache import VerdictCache, verdict_key

MESSAGES = (Message("user", "hi"),)
ITEM = RubricItem('Says "hello"', 2)
BASE = dict(messages=MESSAGES, response="hello", item=ITEM, model="judge", template_version="v1")


@pytest.mark.parametrize("change", [
    {"messages": (Message("user", "hi!"),)},
    {"messages": (Message("system", "x"), Message("user", "hi"))},
    {"response": "hello."},
    {"item": RubricItem('Says "hello"', 3)},
    {"item": RubricItem('Says "hi"', 2)},
    {"model": "judge-2"},
    {"template_version": "v2"},
])
def test_key_changes_with_every_input(change):
    assert verdict_key(**{**BASE, **change}) != verdict_key(**BASE)


def test_key_ignores_tags():  # tags do not reach the grader prompt
    assert verdict_key(**{**BASE, "item": RubricItem('Says "hello"', 2, ("axis:x",))}) == verdict_key(**BASE)


def test_round_trip_and_reopen(tmp_path):
    path = tmp_path / "sub" / "verdicts.sqlite"
    cache = VerdictCache(path, "judge", "v1")
    keys = [f"k{i}" for i in range(1200)]  # more than one SELECT chunk
    cache.put_many((k, i % 3 == 0, f"because {i}") for i, k in enumerate(keys))
    cache.close()
    cache = VerdictCache(path, "judge", "v1")
    found = cache.get_many(keys + ["missing"])
    assert len(cache) == 1200 and "missing" not in found
    assert all(found[k] == (i % 3 == 0, f"because {i}") for i, k in enumerate(keys))
    cache.close()
    with sqlite3.connect(path) as db:  # a plain SQLite file other tools can read
        assert db.execute("SELECT COUNT(*) FROM verdicts WHERE model='judge'").fetchone()[0] == 1200


def test_unopenable_path_names_the_file(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ValueError, match="dir.sqlite"):
        VerdictCache(tmp_path / "dir.sqlite", "judge", "v1")

"""Loaders: the real HealthBench files in both layouts, plain JSONL, and one test per kind of bad input."""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ruscarl_jax.data.loaders import DataError, content_id, detect_format, load_examples, save_jsonl
from ruscarl_jax.data.types import Message, RubricItem


def _row(i: int = 0, **overrides) -> dict:
    row = {
        "prompt_id": f"p{i}",
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "rubrics": [{"criterion": "Answers it.", "points": 5, "tags": ["axis:accuracy"]},
                    {"criterion": "Is rude.", "points": -2, "tags": []}],
    }
    row.update(overrides)
    return row


def _write(tmp_path, lines: list, name: str = "data.jsonl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode("utf-8"))
    return path


def _error(tmp_path, bad, line_no: int = 2) -> DataError:
    """Load a file whose `line_no`-th line is `bad` (the others are good) and return the error."""
    lines = [_row(i) for i in range(3)]
    lines[line_no - 1] = bad
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(path) in str(err.value) and f"line {line_no}" in str(err.value)
    return err.value


# ---------------------------------------------------------------- real data
def test_healthbench_both_formats_load_the_same_examples(healthbench_dir):
    raw = [json.loads(line) for line in open(healthbench_dir / "healthbench_val400.jsonl", encoding="utf-8")]
    jsonl, report = load_examples(healthbench_dir / "healthbench_val400.jsonl")
    parquet, preport = load_examples(healthbench_dir / "healthbench_val400.verl.parquet")
    assert report.fmt == "healthbench" and preport.fmt == "verl"
    assert report.loaded == preport.loaded == report.rows_read == 400 and report.num_skipped == 0
    assert [ex.id for ex in jsonl] == [r["prompt_id"] for r in raw]
    for ex, p, r in zip(jsonl, parquet, raw):
        assert ex.messages == p.messages and ex.rubric == p.rubric
        assert [m.to_dict() for m in ex.messages] == r["prompt"]
        assert [(it.criterion, it.points, list(it.tags)) for it in ex.rubric] == \
            [(x["criterion"], float(x["points"]), x["tags"]) for x in r["rubrics"]]
        # the parquet layout carries no id: its ids are the content hash, the same for both files
        assert p.id == content_id(ex.messages, ex.rubric)
    assert len({p.id for p in parquet}) == 400


def test_plain_jsonl_round_trip(tmp_path, healthbench_dir):
    examples, _ = load_examples(healthbench_dir / "healthbench_val400.jsonl")
    path = tmp_path / "plain.jsonl"
    save_jsonl(examples[:50], path)
    assert detect_format(path) == "jsonl"
    again, report = load_examples(path)
    assert again == examples[:50] and report.fmt == "jsonl"
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "messages", "rubric"}


def test_system_message_and_missing_id(tmp_path):
    row = _row(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    del row["prompt_id"]
    examples, _ = load_examples(_write(tmp_path, [row, b"\n", _row(1)]))  # blank lines are ignored
    assert examples[0].messages[0] == Message("system", "Be brief.")
    assert examples[0].id == content_id(examples[0].messages, examples[0].rubric)
    assert examples[1].id == "p1"


def test_rule_items_load(tmp_path):
    rubric = [{"criterion": "Final answer is 42", "points": 3, "tags": ["verifier:rule", "function:math_verify",
                                                                        "parameters:42"]}]
    (ex,), _ = load_examples(_write(tmp_path, [_row(rubrics=rubric)]))
    assert ex.rubric[0].is_rule and ex.rubric[0].tag_value("function") == "math_verify"


def _parquet(tmp_path, rows):
    table = pa.Table.from_pylist(rows)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    return path


def _verl_row(i, rubrics=None, **extra):
    return {"prompt": [{"role": "user", "content": f"Q{i}"}], "data_source": "x",
            "reward_model": {"style": "rubric", "ground_truth": "",
                             "rubrics": rubrics or [{"criterion": "c", "points": 1, "tags": ["a"]}]}, **extra}


def test_verl_ids_from_extra_info(tmp_path):
    rows = [_verl_row(i, extra_info={"index": i, "split": "train"}) for i in range(3)]
    examples, _ = load_examples(_parquet(tmp_path, rows))
    assert [ex.id for ex in examples] == ["0", "1", "2"]


def test_verl_bad_row_names_row_and_field(tmp_path):
    rows = [_verl_row(0), _verl_row(1, rubrics=[{"criterion": "c", "points": -1, "tags": ["a"]}])]
    with pytest.raises(DataError, match=r"data\.parquet, row 1, field 'reward_model\.rubrics': no criterion with "
                                        r"positive points"):
        load_examples(_parquet(tmp_path, rows))


def test_verl_missing_column(tmp_path):
    path = _parquet(tmp_path, [{"prompt": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="field 'reward_model': missing column"):
        load_examples(path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet.*cannot read parquet"):
        load_examples(path)


# ---------------------------------------------------------------- malformed input, one case a test
def test_missing_criterion(tmp_path):
    err = _error(tmp_path, _row(rubrics=[{"points": 5}]))
    assert err.field == "rubrics[0].criterion" and "missing criterion" in str(err)


def test_empty_criterion(tmp_path):
    err = _error(tmp_path, _row(rubrics=[{"criterion": "  ", "points": 5}]))
    assert err.field == "rubrics[0].criterion" and "empty criterion" in str(err)


def test_non_numeric_points(tmp_path):
    err = _error(tmp_path, _row(rubrics=[{"criterion": "a", "points": 5}, {"criterion": "b", "points": "3"}]))
    assert err.field == "rubrics[1].points" and "non-numeric points '3'" in str(err)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_points(tmp_path, literal):
    line = json.dumps(_row(rubrics=[{"criterion": "a", "points": 999}])).replace("999", literal).encode() + b"\n"
    err = _error(tmp_path, line)
    assert err.field == "rubrics[0].points" and "non-finite points" in str(err)


def test_no_positive_points(tmp_path):
    err = _error(tmp_path, _row(rubrics=[{"criterion": "a", "points": -1}, {"criterion": "b", "points": 0}]))
    assert err.field == "rubrics" and "no criterion with positive points" in str(err)


def test_empty_conversation(tmp_path):
    err = _error(tmp_path, _row(prompt=[]))
    assert err.field == "prompt" and "empty conversation" in str(err)


def test_last_message_not_from_user(tmp_path):
    err = _error(tmp_path, _row(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]))
    assert err.field == "prompt[1].role" and "last message must be from the user" in str(err)


def test_unknown_role(tmp_path):
    err = _error(tmp_path, _row(prompt=[{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}]))
    assert err.field == "prompt[0].role" and "unknown role 'tool'" in str(err)


def test_system_message_not_first(tmp_path):
    err = _error(tmp_path, _row(prompt=[{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                        {"role": "user", "content": "q"}]))
    assert err.field == "prompt[1].role" and "only be the first" in str(err)


def test_invalid_utf8(tmp_path):
    line = json.dumps(_row(), ensure_ascii=False).replace("Question", "Qu\udcffestion", 1)
    raw = line.encode("utf-8", errors="surrogateescape") + b"\n"
    err = _error(tmp_path, raw, line_no=3)
    assert "invalid UTF-8 at byte" in str(err)


def test_truncated_json_line(tmp_path):
    cut = (json.dumps(_row()) + "\n")[:40].encode()  # the file ends mid-object
    path = _write(tmp_path, [_row(0), _row(1), cut])
    with pytest.raises(DataError, match=r"line 3: invalid or truncated JSON"):
        load_examples(path)


def test_duplicate_ids(tmp_path):
    err = _error(tmp_path, _row(0), line_no=3)
    assert err.field == "prompt_id" and "duplicate id 'p0' (first at line 1)" in str(err)


def test_unknown_rule_function(tmp_path):
    rubric = [{"criterion": "a", "points": 1, "tags": ["verifier:rule", "function:eval_python"]}]
    err = _error(tmp_path, _row(rubrics=rubric))
    assert err.field == "rubrics[0].tags" and "unknown rule function 'eval_python'" in str(err)
    assert "math_verify" in str(err)


def test_rule_item_without_function(tmp_path):
    err = _error(tmp_path, _row(rubrics=[{"criterion": "a", "points": 1, "tags": ["verifier:rule"]}]))
    assert err.field == "rubrics[0].tags" and "needs a 'function:NAME' tag" in str(err)


def test_row_not_an_object(tmp_path):
    err = _error(tmp_path, [1, 2, 3])
    assert "expected a JSON object, got list" in str(err)


def test_plain_jsonl_field_names_in_errors(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "q"}], "rubric": [{"criterion": "c", "points": 1}]},
            {"id": "b", "messages": [{"role": "user", "content": "q"}], "rubric": [{"criterion": "", "points": 1}]}]
    with pytest.raises(DataError, match=r"line 2, field 'rubric\[0\]\.criterion': empty criterion"):
        load_examples(_write(tmp_path, rows))


# ---------------------------------------------------------------- policy and report
def test_skip_policy_counts_and_reports(tmp_path, caplog):
    lines = [_row(0), _row(1, prompt=[]), b'{"prompt_id": "p2", "prompt": [\n', _row(3),
             _row(0), _row(5, rubrics=[{"criterion": "x", "points": "many"}])]
    path = _write(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="ruscarl_jax.data.loaders"):
        examples, report = load_examples(path, on_bad_row="skip")
    assert [ex.id for ex in examples] == ["p0", "p3"]
    assert report.rows_read == 6 and report.loaded == 2 and report.num_skipped == 4
    assert dict(report.skipped) == {"empty_conversation": 1, "bad_json": 1, "duplicate_id": 1, "bad_points": 1}
    assert len(report.problems) == 4 and "line 2" in report.problems[0] and "line 6" in report.problems[3]
    assert "skipped 4" in report.summary() and "skipped 4" in caplog.text


def test_fail_is_the_default(tmp_path):
    with pytest.raises(DataError, match="line 2"):
        load_examples(_write(tmp_path, [_row(0), _row(1, prompt=[])]))


def test_all_rows_bad_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no valid examples"):
        load_examples(_write(tmp_path, [_row(1, prompt=[])]), on_bad_row="skip")


def test_bad_arguments(tmp_path):
    path = _write(tmp_path, [_row(0)])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_examples(path, on_bad_row="ignore")
    with pytest.raises(ValueError, match="fmt"):
        load_examples(path, fmt="csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(tmp_path / "missing.jsonl")


def test_content_id_is_stable_and_content_sensitive():
    msgs = (Message("user", "q"),)
    rubric = (RubricItem("c", 1.0, ("t",)),)
    a = content_id(msgs, rubric)
    assert a == content_id(msgs, (RubricItem("c", 1, ("t",)),)) and a.startswith("c-")
    assert a != content_id(msgs, (RubricItem("c", 2.0, ("t",)),))
    assert a != content_id((Message("user", "q2"),), rubric)

"""scripts/evaluate.py end to end: a tiny random Qwen2 checkpoint and tokenizer built here, LLM-graded
criteria judged by the local fake OpenAI-compatible server, rule-only data without a server, and bad
input. Scores, tag breakdowns and Best-of-k are recomputed in NumPy from the responses the run wrote,
with the verdicts decided independently (a quoted letter occurs in the response, ignoring case)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from openai_server import FakeJudgeServer

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.data.types import Example, Message, RubricItem
from ruscarl_jax.evaluation import scoring
from ruscarl_jax.models import hf_io, qwen

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "scripts" / "evaluate.py"
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate  # noqa: E402

SECRET = "sk-evaluate-test-secret-0123"
# Criteria met when the quoted letter occurs in the response: common, rarer and negative ones.
RUBRIC = (
    RubricItem('Uses the letter "e"', 5, ("axis:accuracy",)),
    RubricItem('Uses the letter "a"', 3, ("axis:completeness",)),
    RubricItem('Uses the letter "q"', 2, ("axis:completeness",)),
    RubricItem('Uses the letter "z"', -4, ("axis:accuracy",)),
)
PROMPTS = ["Describe the river.", "Tell me about the quiet zoo.", "What is a castle?", "Say something nice."]


def _met(response: str, criterion: str) -> bool:
    letter = criterion.split('"')[1]
    return letter.casefold() in response.casefold()


def _score(rubric, response: str) -> float:
    met = [_met(response, item.criterion) for item in rubric]
    return sum(item.points for item, m in zip(rubric, met) if m) / sum(item.points for item in rubric if item.points > 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Qwen2 model and a tiny BPE tokenizer with a ChatML template, saved as HF files."""
    tok = build_tiny_tokenizer(PROMPTS * 20 + ["the quick brown fox jumps over a lazy dog"] * 20, vocab_size=300)
    cfg = qwen.QwenConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)
    params = qwen.init_params(cfg, jax.random.key(0))
    directory = tmp_path_factory.mktemp("ckpt")
    hf_io.save_checkpoint(directory, params, cfg, tokenizer=tok)
    return directory


def _write(path: pathlib.Path, examples: list[Example]) -> pathlib.Path:
    synthetic.write_jsonl(examples, path)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device in the subprocess
    env["JAX_PLATFORMS"] = "cpu"
    env["RUSCARL_EVAL_TEST_KEY"] = SECRET
    return env


def test_llm_judged_end_to_end(checkpoint, tmp_path):
    examples = [Example(f"ex{i}", (Message("user", p),), RUBRIC) for i, p in enumerate(PROMPTS)]
    data = _write(tmp_path / "data.jsonl", examples)
    out = tmp_path / "eval"
    with FakeJudgeServer(api_key=SECRET, echo_auth_in_errors=True) as server:
        proc = subprocess.run(
            [sys.executable, str(EVALUATE), "--checkpoint", str(checkpoint), "--data", str(data),
             "--judge-base-url", server.base_url, "--judge-model", "fake-judge",
             "--judge-api-key-env", "RUSCARL_EVAL_TEST_KEY", "--num-samples", "4", "--best-of", "1,2,4",
             "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "1.0", "--top-k", "0",
             "--output", str(out), "--num-bootstrap", "200"],
            capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
        requests = server.stats()["requests"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert requests == len(PROMPTS) * 4 * len(RUBRIC)  # one judge call per criterion per response

    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * 4
    texts = {(r["example_id"], r["sample_index"]): r["response"] for r in rows}
    assert len(set(texts.values())) > 1  # sampled, not one repeated answer
    table = np.asarray([[_score(RUBRIC, texts[(f"ex{i}", k)]) for k in range(4)] for i in range(len(PROMPTS))])
    for r in rows:
        assert r["met"] == [_met(r["response"], item.criterion) for item in RUBRIC]

    report = json.loads((out / "report.json").read_text())
    per_example = table.mean(axis=1)
    assert report["overall"]["score"] == pytest.approx(np.clip(per_example.mean(), 0, 1))
    assert report["overall"]["bootstrap_std"] == pytest.approx(scoring.bootstrap_std(per_example, 200, 0))
    assert report["overall"]["n"] == len(PROMPTS)
    for k in (1, 2, 4):
        assert report["best_of"][str(k)]["score"] == pytest.approx(np.clip(table[:, :k].max(axis=1).mean(), 0, 1))
    scores = [report["best_of"][str(k)]["score"] for k in (1, 2, 4)]
    assert scores == sorted(scores)
    # axis:accuracy holds "e" (+5) and "z" (-4); axis:completeness "a" (+3) and "q" (+2)
    acc = [[(5 * _met(texts[(f"ex{i}", k)], '"e"') - 4 * _met(texts[(f"ex{i}", k)], '"z"')) / 5
            for k in range(4)] for i in range(len(PROMPTS))]
    comp = [[(3 * _met(texts[(f"ex{i}", k)], '"a"') + 2 * _met(texts[(f"ex{i}", k)], '"q"')) / 5
             for k in range(4)] for i in range(len(PROMPTS))]
    assert report["tags"]["axis:accuracy"]["score"] == pytest.approx(np.clip(np.mean(acc), 0, 1))
    assert report["tags"]["axis:completeness"]["score"] == pytest.approx(np.clip(np.mean(comp), 0, 1))

    assert (out / "best_of.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall" in proc.stdout and "best-of-k" in proc.stdout
    for text in (proc.stdout, proc.stderr, (out / "report.json").read_text(), (out / "responses.jsonl").read_text()):
        assert SECRET not in text


def test_rule_only_without_judge_server(checkpoint, tmp_path, capsys):
    examples = synthetic.make_examples(3, seed=0)
    data = _write(tmp_path / "rules.jsonl", examples)
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--num-samples", "2", "--greedy",
                        "--max-new-tokens", "8", "--output", str(out), "--num-bootstrap", "50"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    by_example = {}
    for r in rows:
        by_example.setdefault(r["example_id"], []).append(r["response"])
    assert all(len(set(v)) == 1 for v in by_example.values())  # greedy: both samples are the same answer
    expected = []
    for ex in examples:
        text = " ".join(by_example[ex.id][0].casefold().split())
        met = [item.tag_value("parameters") in text for item in ex.rubric]
        expected.append(sum(i.points for i, m in zip(ex.rubric, met) if m) / ex.positive_points)
    report = json.loads((out / "report.json").read_text())
    assert report["overall"]["score"] == pytest.approx(np.clip(np.mean(expected), 0, 1))
    assert report["best_of"]["1"]["score"] == report["best_of"]["2"]["score"]
    assert set(report["best_of"]) == {"1", "2"}  # the default k list stops at N


def test_bad_input_is_named(checkpoint, tmp_path, capsys):
    llm = _write(tmp_path / "llm.jsonl", [Example("needs-judge", (Message("user", "Hi"),), RUBRIC)])
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(llm), "--output", str(tmp_path / "o")]) == 2
    assert "'needs-judge'" in capsys.readouterr().err

    rules = _write(tmp_path / "rules.jsonl", synthetic.make_examples(2, seed=0))
    assert evaluate.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", str(rules)]) == 2
    assert "nowhere" in capsys.readouterr().err

    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(rules), "--max-prompt-length", "3",
                          "--output", str(tmp_path / "o")]) == 2
    assert f"example '{synthetic.make_examples(1, seed=0)[0].id}': prompt of" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text(llm.read_text() + '{"prompt_id": "x", "prompt": [], "rubrics": []}\n')
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.jsonl" in err and "line 2" in err

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "c", "--data", "d", "--num-samples", "4", "--best-of", "1,8"])
    assert "--best-of 8 exceeds --num-samples 4" in capsys.readouterr().err


def _grade(example_id, rubric, met):
    """A ResponseGrade as the judge builds it (met None = ungraded)."""
    from ruscarl_jax.judge.rewards import CriterionVerdict, make_grade

    verdicts = [CriterionVerdict(j, m, m is None, "", "llm", 1, 0.0) for j, m in enumerate(met)]
    return make_grade(example_id, rubric, verdicts)


def test_build_report_by_hand():
    from ruscarl_jax.evaluation.report import build_report, format_report

    a = Example("a", (Message("user", "x"),), RUBRIC)
    b = Example("b", (Message("user", "y"),), RUBRIC[:2])
    grades = [
        # a: e+a = 8/10, e+z = 1/10, nothing = 0
        [_grade("a", RUBRIC, [True, True, False, False]), _grade("a", RUBRIC, [True, False, False, True]),
         _grade("a", RUBRIC, [False, False, False, False])],
        # b (items e 5, a 3): 5/8, ungraded (no score under drop_group), 3/8
        [_grade("b", RUBRIC[:2], [True, False]), _grade("b", RUBRIC[:2], [None, True]),
         _grade("b", RUBRIC[:2], [False, True])],
    ]
    report = build_report([a, b], grades, [1, 2, 3], num_bootstrap=100)
    mean_a, mean_b = (0.8 + 0.1 + 0.0) / 3, (5 / 8 + 3 / 8) / 2
    assert report.overall["score"] == pytest.approx((mean_a + mean_b) / 2)
    assert report.overall["n"] == 2 and report.unscored_responses == 1
    # accuracy (e 5, z -4): a -> 1, (5-4)/5, 0 ; b -> 1, 0 (the ungraded response is left out)
    assert report.tags["axis:accuracy"]["score"] == pytest.approx(((1 + 0.2 + 0) / 3 + (1 + 0) / 2) / 2)
    # completeness (a 3, q 2): a -> 3/5, 0, 0 ; b has only a (3): 0, 1
    assert report.tags["axis:completeness"]["score"] == pytest.approx(((0.6 + 0 + 0) / 3 + 0.5) / 2)
    # Best-of-k over the examples whose samples all have a score: only a
    assert {k: v["score"] for k, v in report.best_of.items()} == pytest.approx({1: 0.8, 2: 0.8, 3: 0.8})
    assert all(v["n"] == 1 for v in report.best_of.values())
    assert "1 responses without a score" in format_report(report)
    with pytest.raises(ValueError, match="best-of k=4 needs 1 <= k <= 3"):
        build_report([a, b], grades, [4])
    with pytest.raises(ValueError, match="example 'b': 2 graded samples, expected 3"):
        build_report([a, b], [grades[0], grades[1][:2]], [1])

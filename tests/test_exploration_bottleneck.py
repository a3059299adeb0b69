"""The kind-rubric task (synthetic.py) and its bottleneck structure, the shipped data/tiny files, the
trainer's SFT warm start (demonstrations, batch layout, cache), the experiment's curve aggregation, its
bootstrap intervals (against SciPy's), rare-word counts, job order, the results JSON and the doc block
rendered from it, and the run summary. None of it runs the experiment."""
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.loaders import load_examples
from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.evaluation.run_summary import sparkline, summarize
from ruscarl_jax.judge.verifiers import check_rule
from ruscarl_jax.trainer.warm_start import demonstration_pairs, load_demonstrations, sft_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "experiments"))
import bottleneck_eval  # noqa: E402
import bottleneck_report  # noqa: E402
import curves  # noqa: E402
import exploration_bottleneck  # noqa: E402


def _words(text):
    assert text.startswith(synthetic.ANSWER_PREFIX + " ")
    return text[len(synthetic.ANSWER_PREFIX) + 1:].split(" ")


def test_rubric_is_set_by_the_kind_and_held_out_prompts_are_new():
    train = synthetic.make_examples(128, 0)
    val = synthetic.make_examples(32, 0, held_out=True)
    rubrics = {}
    for ex in train + val:
        kind = next(k for k in synthetic.KINDS if f" {k} " in ex.messages[0].content)
        rubrics.setdefault(kind, set()).add(ex.rubric)
        assert [synthetic.item_type(i) for i in ex.rubric] == ["rare_word", "rare_word", "avoid_word", "format"]
        assert [i.points for i in ex.rubric] == [3.0, 2.0, -2.0, 2.0]
        assert {i.tag_value("parameters") for i in ex.rubric[:2]} <= set(synthetic.RARE_WORDS)
        assert ex.rubric[2].tag_value("parameters") in synthetic.COMMON_WORDS
    assert all(len(r) == 1 for r in rubrics.values()) and len(rubrics) == len(synthetic.KINDS)
    rare = [w.tag_value("parameters") for r in rubrics.values() for w in next(iter(r))[:2]]
    assert len(set(rare)) == 2 * len(synthetic.KINDS)  # every kind has its own rare words
    text = lambda exs: {ex.messages[0].content for ex in exs}  # noqa: E731
    for prompt in text(val):  # unseen topic and unseen wording
        assert not any(t in prompt for t in synthetic.TOPICS)
        assert not any(prompt.startswith(t.split("{")[0]) for t in synthetic.PROMPT_TEMPLATES)
    assert not text(val) & text(train)
    assert not set(synthetic.RARE_WORDS) & set(synthetic.COMMON_WORDS)
    for a in synthetic.KEYWORDS:  # `contains` is a substring test: no key word may hide in another
        assert not [b for b in synthetic.KEYWORDS if a != b and a in b]


@pytest.mark.parametrize("shown", [(0, 1, 2, 3), (0, 2), (2,), (1, 3), ()])
def test_demonstration_copies_shown_words_and_fills_with_common_words_only(shown):
    ex = synthetic.make_examples(1, seed=0)[0]
    include = {ex.rubric[i].tag_value("parameters") for i in shown if i < 2}
    avoid = {ex.rubric[i].tag_value("parameters") for i in shown if i == 2}
    rng = np.random.default_rng(0)
    for _ in range(50):
        answer = synthetic.demonstration(ex, shown, rng)
        words = _words(answer)
        assert len(words) == synthetic.ANSWER_WORDS == len(set(words))
        assert include <= set(words) and not avoid & set(words)
        assert set(words) - include <= set(synthetic.COMMON_WORDS)  # never a rare word unless shown
        assert check_rule(synthetic.format_item(), answer)
    full = synthetic.demonstration(ex, (0, 1, 2, 3), rng)
    assert sum(i.points for i in ex.rubric if check_rule(i, full)) == ex.positive_points


def test_shipped_tiny_data_is_the_generator_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for name in ("train.jsonl", "val.jsonl", "warm_start.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "tiny" / name).read_bytes(), name
    for name, held_out, count in (("train", False, 128), ("val", True, 32)):
        shipped, _ = load_examples(ROOT / "data" / "tiny" / f"{name}.jsonl")
        assert shipped == synthetic.make_examples(count, 0, held_out=held_out)
    rows = load_demonstrations(ROOT / "data" / "tiny" / "warm_start.jsonl")
    unscaffolded = [r for m, r in rows if m[0].role != "system"]
    assert len(rows) == 2048 and len(unscaffolded) == 256  # one of each group of 8 shows nothing
    assert not any(set(_words(r)) & set(synthetic.RARE_WORDS) for r in unscaffolded)
    assert any(set(_words(r)) & set(synthetic.RARE_WORDS) for m, r in rows if m[0].role == "system")


def test_load_demonstrations_names_file_and_line(tmp_path):
    path = tmp_path / "demos.jsonl"
    good = json.dumps({"prompt": [{"role": "user", "content": "hi"}], "response": "Notes: oak"})
    for bad, message in (("{nope", "invalid JSON"), (json.dumps({"prompt": [], "response": "x"}), "'prompt'"),
                         (json.dumps({"prompt": [{"role": "user", "content": "hi"}]}), "'response'")):
        path.write_text(good + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"demos.jsonl, line 3: .*{message}"):
            load_demonstrations(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no demonstrations"):
        load_demonstrations(path)


def test_demonstration_pairs_and_sft_batch():
    rows = load_demonstrations(ROOT / "data" / "tiny" / "warm_start.jsonl")[:8]
    tok = build_tiny_tokenizer(synthetic.corpus() + [m.content for ms, _ in rows for m in ms], vocab_size=700)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pairs = demonstration_pairs(rows, tok, end)
    for (messages, response), (prompt, answer) in zip(rows, pairs):
        prompt_text = tok.decode(prompt)
        assert answer[-1] == end and tok.decode(answer[:-1]) == response
        assert prompt_text.endswith(messages[-1].content + "<|im_end|>\n<|im_start|>assistant\n")
        assert ("<|im_start|>system" in prompt_text) == (messages[0].role == "system")
    width = max(p.size for p, _ in pairs[:3]) + 3
    batch = sft_batch(pairs[:3], width, 12, pad_id=tok.pad_token_id)
    for row, (prompt, response) in enumerate(pairs[:3]):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        np.testing.assert_array_equal(ids[width - prompt.size:width], prompt)
        np.testing.assert_array_equal(ids[width + response.size:], tok.pad_token_id)
        np.testing.assert_array_equal(ids[width:width + response.size], response)
        assert mask.tolist() == [0] * (width - prompt.size) + [1] * (prompt.size + response.size) + [0] * (12 - response.size)
        assert batch["response_mask"][row].tolist() == [1] * response.size + [0] * (12 - response.size)
    with pytest.raises(ValueError, match="pair 0: prompt"):
        sft_batch(pairs[:1], 8, 12, pad_id=0)


def test_warm_start_is_built_once_then_loaded_from_its_cache(tmp_path, caplog):
    from configs.tiny import get_config
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    c = get_config()
    c.model.tiny.num_layers = 1
    c.warm_start.steps, c.warm_start.batch_size, c.warm_start.micro_batch_size = 30, 32, 32
    c.warm_start.learning_rate = 1e-2
    c.warm_start.cache_dir = str(tmp_path / "cache")
    settings = config_lib.validate(c, num_devices=jax.device_count())
    mesh, rules = mesh_from_config(c), rules_from_config(c)
    examples = load_data(c, "train_path") + load_data(c, "val_path")
    cfg, params, _ = load_policy(c, mesh, rules, examples, settings.scaffold)
    (directory,) = (tmp_path / "cache").iterdir()
    info = json.loads((directory / "warm_start.json").read_text())
    assert info["steps"] == 30 and info["final_loss"] < 0.6 * info["first_loss"]  # it learned
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    c.seed = 3  # the run seed does not change the warm start
    cfg2, params2, tok2 = load_policy(c, mesh, rules, examples, settings.scaffold)
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").iterdir())) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c.warm_start.steps = 31  # another setting: another cache entry
    load_policy(c, mesh, rules, examples, settings.scaffold)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # no warm start: the random model of the run seed
    c.warm_start.path = ""
    _, random_params, _ = load_policy(c, mesh, rules, examples, settings.scaffold)
    assert not np.allclose(np.asarray(jax.tree.leaves(random_params)[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_warm_start_config_errors_name_the_key():
    from configs.tiny import get_config
    from ruscarl_jax.trainer import config as config_lib

    for key, value, message in (("path", "data/tiny/missing.jsonl", "file not found"), ("steps", 0, "must be"),
                                ("micro_batch_size", 7, "must divide"), ("bogus", 1, "unknown key")):
        c = get_config()
        c.warm_start.unlock()
        c.warm_start[key] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.warm_start.{key}: .*{message}"):
            config_lib.validate(c, num_devices=jax.device_count())


def test_curves_over_seeds_and_csv(tmp_path):
    metrics = {0: [(1, 0.1, None), (2, 0.3, 0.5), (3, 0.2, None), (4, 0.6, 0.7)],
               1: [(1, 0.2, None), (2, 0.1, 0.3), (3, 0.4, None), (4, 0.2, 0.9)]}
    rows = []
    for seed, records in metrics.items():
        path = tmp_path / f"m{seed}.jsonl"
        lines = [{"step": s, "reward_mean": r, "reward_unscaffolded_mean": "nan", **({"val/score": v} if v is not None else {})}
                 for s, r, v in records]
        path.write_text("\n".join(__import__("json").dumps(x) for x in lines) + "\n")
        rows += curves.read_run(path, "arm", seed, "a")
    c = curves.over_seeds(rows, "arm", "heldout_score")
    assert c["steps"].tolist() == [2, 4] and c["num_seeds"] == 2
    np.testing.assert_allclose(c["mean"], [0.4, 0.8])
    np.testing.assert_allclose(c["min"], [0.3, 0.7])
    np.testing.assert_allclose(c["max"], [0.5, 0.9])
    # two seeds: a resample's mean is one of min, mean, max; the 95% band spans min..max
    np.testing.assert_allclose(c["lo"], [0.3, 0.7])
    np.testing.assert_allclose(c["hi"], [0.5, 0.9])
    assert {r["numerics"] for r in rows} == {"a"}
    assert curves.final_values(rows, "arm", "heldout_score") == {0: 0.7, 1: 0.9}
    assert curves.last_window_mean(rows, "arm", "train_reward", 2) == pytest.approx({0: 0.4, 1: 0.3})
    assert curves.over_seeds(rows, "arm", "train_reward_unscaffolded")["num_seeds"] == 0  # "nan" strings
    np.testing.assert_allclose(curves.smooth(np.array([1.0, 3.0, np.nan, 5.0]), 2), [1.0, 2.0, 3.0, 5.0])

    curves.write_csv(rows, tmp_path / "c.csv")
    back = curves.read_csv(tmp_path / "c.csv")
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for key, value in a.items():
            assert (math.isnan(value) and math.isnan(b[key])) if isinstance(value, float) and math.isnan(value) else b[key] == value

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"reward_mean": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        curves.read_run(bad, "arm", 0)


def test_bootstrap_interval_matches_scipy():
    from scipy import stats

    x = np.random.default_rng(3).normal(0.2, 0.15, size=20)
    ours = curves.bootstrap_ci(x, 10_000, seed=0)
    ref = stats.bootstrap((x,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(1)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.01)  # two Monte Carlo estimates of one interval
    assert ours[0] < x.mean() < ours[1]
    assert curves.bootstrap_ci([0.25] * 20) == (0.25, 0.25)


@pytest.mark.parametrize("shift, verdict", [(0.3, "beats"), (-0.3, "loses"), (0.0, "inconclusive")])
def test_contrast_is_paired_by_seed(shift, verdict):
    base = np.random.default_rng(0).uniform(0.2, 0.6, size=20)
    noise = np.random.default_rng(1).normal(0, 0.05, size=20)
    c = bottleneck_report.contrast(base + shift + noise, base)
    assert c["verdict"] == verdict and c["mean"] == pytest.approx(shift + noise.mean())
    np.testing.assert_allclose(c["differences"], shift + noise)
    assert c["ci95"][0] < c["mean"] < c["ci95"][1]


def test_rare_words_per_kind():
    val = synthetic.make_examples(32, 0, held_out=True)
    words = {bottleneck_eval.kind_of(ex): [i.tag_value("parameters") for i in ex.rubric[:2]] for ex in val}
    poem, story = words["poem"], words["story"]
    answers = []
    for ex in val:
        kind = bottleneck_eval.kind_of(ex)
        answers.append({"poem": f"Notes: {poem[0]} {poem[1]}", "story": f"Notes: {story[0]} {poem[0]}",
                        "letter": "Notes: pebble", "riddle": "Notes: pebble"}[kind])
    out = bottleneck_eval.rare_words(val, answers)
    assert out["poem"] == {"both": 1.0, "any": 1.0, "other_kind": 0.0, "prompts": 8}
    assert out["story"] == {"both": 0.0, "any": 1.0, "other_kind": 1.0, "prompts": 8}
    assert out["letter"] == out["riddle"] == {"both": 0.0, "any": 0.0, "other_kind": 0.0, "prompts": 8}


def test_workers_build_both_warm_starts_then_share_the_first_numerics():
    args = exploration_bottleneck.parse_args(["--seeds", "0-1"])
    assert args.seeds == [0, 1] and args.numerics == ["a", "b"]
    for worker, first in ((0, "a"), (1, "b")):
        order = exploration_bottleneck.jobs(args, first)
        assert order[0] == (first, None, 0)
        assert order[1 if first == "a" else 2][0] == "a"
        runs = [j for j in order if j[1]]
        assert runs[:6] == [("a", arm, s) for s in (0, 1) for arm in exploration_bottleneck.ARMS]
        assert sorted(set(order), key=order.index) == sorted(set(exploration_bottleneck.jobs(args)), key=order.index)
    c = exploration_bottleneck.run_config("b", "plain_grpo", 3, args)
    assert c.warm_start.micro_batch_size == 32 and c.rollout.engine.schedule == "static" and c.seed == 3
    assert c.scaffold.rule == "binary" and c.scaffold.full_reveal_count == 0
    a = exploration_bottleneck.run_config("a", "ruscarl", 3, args)
    assert a.warm_start.micro_batch_size == 64 and a.rollout.engine.schedule == "continuous"


def test_run_summary(tmp_path):
    lines = []
    for step in range(1, 21):
        record = {"step": step, "reward_scaffolded_mean": 0.5 + step / 100, "reward_unscaffolded_mean": step / 40,
                  "kl": 0.001 * step}
        if step == 1:
            record["val/score_initial"] = 0.25
        if step % 10 == 0:
            record["val/score"] = 0.25 + step / 40
        lines.append(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = summarize(tmp_path)
    row = next(line for line in text.splitlines() if "unscaffolded" in line).split()
    assert row[3:5] == [f"{np.mean(np.arange(1, 11) / 40):.3f}", f"{np.mean(np.arange(11, 21) / 40):.3f}"]
    held = next(line for line in text.splitlines() if "held-out" in line).split()
    assert held[4:6] == ["0.250", "0.750"]
    assert str(tmp_path / "metrics.jsonl") in text
    assert sparkline([0.0, 0.5, 1.0], lo=0.0, hi=1.0) == " ▄█"
    assert len(sparkline(list(range(100)), width=10)) == 10
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        summarize(tmp_path)


def test_results_json_matches_the_doc():
    data = json.loads((ROOT / "docs" / "exploration_bottleneck.json").read_text())
    assert "a" in data["numerics"] and set(data["numerics"]) <= {"a", "b"} and data["primary_measure"] and data["criterion"]
    for numerics in data["numerics"].values():
        arms = numerics["arms"]
        assert set(arms) == ({"plain_grpo", "ruscarl", "ruscarl_no_step_decay"} if numerics["seeds"] else set())
        assert bool(numerics["contrasts"]) == bool(numerics["seeds"])  # no runs in: the warm start only
        for values in arms.values():
            finals = values["heldout_final"]
            assert values["seeds"] == numerics["seeds"] and len(finals) == len(numerics["seeds"])
            assert all(isinstance(v, float) and -1 <= v <= 1 for v in finals)
        for key, c in numerics["contrasts"].items():  # recomputed from the per-seed values
            a, b = key.split(" - ")
            assert c == bottleneck_report.contrast(arms[a]["heldout_final"], arms[b]["heldout_final"])
        assert set(numerics["base_rates"]) == {"rare_word", "avoid_word", "format"}
        assert numerics["complete"] == (numerics["seeds"] == data["seeds"])
    block = bottleneck_report.block_of(ROOT / "docs" / "exploration_bottleneck.md", "exploration_bottleneck")
    assert block == bottleneck_report.render(data)  # the doc's results are generated from the JSON alone


def _fake_result(score, seed):
    kinds = {k: {"both": score, "any": min(1.0, 2 * score), "other_kind": 0.0, "prompts": 8} for k in synthetic.KINDS}
    return {"greedy": score, "greedy_answers": ["Notes: a", f"Notes: {seed}"], "rare_words": kinds, "greedy_train": score,
            "greedy_full_scaffold": 0.6, "best_of": {"1": score, "2": score + 0.01}, "seconds": 10.0}


def test_collect_and_render_from_run_directories(tmp_path):
    """The results JSON from fake finished runs (one run missing: its seed is left out everywhere, and the
    verdict waits), its contrasts from the per-seed finals, and the block and the plot drawn from it."""
    args = exploration_bottleneck.parse_args(["--seeds", "0-3", "--workdir", str(tmp_path)])
    arms = exploration_bottleneck.ARMS
    finals = {"plain_grpo": [0.3, 0.29, 0.35, 0.3], "ruscarl": [0.6, 0.5, 0.7, 0.55], "ruscarl_no_step_decay": [0.4, 0.3, 0.5, 0.45]}
    for job in exploration_bottleneck.jobs(args):
        numerics, arm, seed = job
        d = exploration_bottleneck.job_dir(args, job)
        d.mkdir(parents=True)
        if arm is None:
            warm = {"steps": 600, "demonstrations": 2048, "first_loss": 6.6, "final_loss": 1.5, "build_seconds": 50.0,
                    "seconds": 20.0, "scores": _fake_result(0.286, 0), "base_rates": {
                        k: {"unscaffolded": 0.01, "scaffolded": 0.3} for k in ("rare_word", "avoid_word", "format")}}
            warm["base_rates"]["_samples"] = {"unscaffolded": 2048, "scaffolded": 2048}
            (d / "result.json").write_text(json.dumps(warm))
            continue
        if (numerics, arm, seed) == ("b", "ruscarl", 3):
            continue  # not finished
        final = finals[arm][seed] + (0.01 if numerics == "b" else 0.0)
        (d / "result.json").write_text(json.dumps(_fake_result(final, seed)))
        lines = [{"step": s, "reward_mean": 0.3, "reward_unscaffolded_mean": 0.2 + s / 100,
                  "reward_scaffolded_mean": 0.5 if s < 3 else "nan", "kl": 0.1 * s, "scaffolded_fraction": 0.5,
                  **({"val/score": final} if s == 4 else {})} for s in range(1, 5)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    wall = {"seconds": 600.0, "invocations": [{"seconds": 600.0, "workers": 2, "load_before": [5.0], "load_after": [6.0],
                                                "cpu_count": 2}]}
    result, rows = bottleneck_report.collect(args, arms, exploration_bottleneck.NUMERICS, exploration_bottleneck.jobs(args),
                                             exploration_bottleneck.job_dir, wall)
    a, b = result["numerics"]["a"], result["numerics"]["b"]
    assert a["seeds"] == [0, 1, 2, 3] and a["complete"] and b["seeds"] == [0, 1, 2] and not b["complete"]
    assert a["arms"]["ruscarl"]["heldout_final"] == finals["ruscarl"]
    assert a["arms"]["ruscarl"]["kl_final"] == pytest.approx([0.4] * 4)
    d = np.subtract(finals["ruscarl"], finals["plain_grpo"])
    assert a["contrasts"]["ruscarl - plain_grpo"]["mean"] == pytest.approx(d.mean())
    assert a["contrasts"]["ruscarl - plain_grpo"]["verdict"] == "beats"
    assert result["verdict"] == {"primary": "beats", "numerics": "a", "others": ["incomplete"], "robust_to_numerics": False}
    assert result["runs"] == 12 + 9
    block = bottleneck_report.render(json.loads(json.dumps(result)))  # from the JSON as written
    assert "Pre-registered verdict: RuscaRL beats plain GRPO" in block and "is incomplete" in block
    assert f"{d.mean():+.3f}" in block and "numerics B (3 seeds)" in block
    curves.plot(rows, list(arms), arms, tmp_path / "c.png", numerics={"a": "A", "b": "B"})
    assert (tmp_path / "c.png").stat().st_size > 10_000
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- results:n:begin -->\nold\n<!-- results:n:end -->\ny\n")
    assert bottleneck_report.write_block(block, doc, "n") and bottleneck_report.block_of(doc, "n") == block

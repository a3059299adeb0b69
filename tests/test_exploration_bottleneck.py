"""Pieces of the exploration-bottleneck experiment: the warm-start demonstrations and their SFT batch
layout, the synthetic task's warm-start examples, and the learning-curve aggregation."""
import math

import numpy as np
import pytest

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.evaluation import curves
from ruscarl_jax.evaluation.warm_start import demonstration_pairs, sft_batch
from ruscarl_jax.scaffold.settings import ScaffoldSettings


def _words(text):
    assert text.startswith(synthetic.ANSWER_PREFIX + " ")
    return text[len(synthetic.ANSWER_PREFIX) + 1:].split(" ")


def test_warm_start_examples_do_not_share_topics_with_the_task():
    examples = synthetic.make_warm_start_examples(64, seed=0)
    assert not set(synthetic.WARM_START_TOPICS) & set(synthetic.TOPICS)
    for ex in examples:
        assert ex.id.rsplit("-", 1)[1] in synthetic.WARM_START_TOPICS
        assert [item.points for item in ex.rubric] == [3.0, 2.0, 2.0, -2.0]
        words = [item.tag_value("parameters") for item in ex.rubric]
        assert len(set(words)) == 4 and set(words) <= set(synthetic.KEYWORDS)
    # rubrics are drawn per example, not per topic: the same topic gets different words
    same_topic = [ex for ex in examples if ex.id.endswith("-" + synthetic.WARM_START_TOPICS[0])]
    assert len({ex.rubric for ex in same_topic}) == len(same_topic) > 1
    assert synthetic.make_warm_start_examples(64, seed=0) == examples


@pytest.mark.parametrize("shown", [(0, 1, 2, 3), (0, 2), (3,), (1, 3), ()])
def test_demonstration_follows_the_shown_items_only(shown):
    ex = synthetic.make_examples(1, seed=0)[0]
    include = {ex.rubric[i].tag_value("parameters") for i in shown if ex.rubric[i].points > 0}
    avoid = {ex.rubric[i].tag_value("parameters") for i in shown if ex.rubric[i].points < 0}
    rng = np.random.default_rng(0)
    fills = set()
    for _ in range(50):
        words = _words(synthetic.demonstration(ex, shown, rng))
        assert len(words) == synthetic.ANSWER_WORDS == len(set(words))
        assert include <= set(words) and not avoid & set(words)
        assert set(words) <= set(synthetic.KEYWORDS)
        fills |= set(words) - include
    if len(include) < synthetic.ANSWER_WORDS:  # the rest is random, not the hidden words
        assert len(fills) > 10


def test_demonstration_pairs_and_sft_batch():
    examples = synthetic.make_warm_start_examples(3, seed=1)
    tok = build_tiny_tokenizer(synthetic.corpus() + [m.content for ex in examples for m in ex.messages], vocab_size=600)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pairs = demonstration_pairs(examples, tok, ScaffoldSettings(include_evaluation_warning=False), 4, end, seed=0)
    assert len(pairs) == 12
    for i, (prompt, response) in enumerate(pairs):
        ex = examples[i // 4]
        prompt_text = tok.decode(prompt)
        answer = _words(tok.decode(response[:-1]))
        assert response[-1] == end and prompt_text.endswith("<|im_start|>assistant\n")
        listed = [item for item in ex.rubric if item.criterion in prompt_text]
        if i % 4 == 0:  # linear in-group decay: sample 0 sees every criterion, the last one none
            assert len(listed) == 4
        if i % 4 == 3:
            assert listed == [] and "<|im_start|>system" not in prompt_text
        assert {it.tag_value("parameters") for it in listed if it.points > 0} <= set(answer)

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


def test_curves_over_seeds_and_csv(tmp_path):
    metrics = {0: [(1, 0.1, None), (2, 0.3, 0.5), (3, 0.2, None), (4, 0.6, 0.7)],
               1: [(1, 0.2, None), (2, 0.1, 0.3), (3, 0.4, None), (4, 0.2, 0.9)]}
    rows = []
    for seed, records in metrics.items():
        path = tmp_path / f"m{seed}.jsonl"
        lines = [{"step": s, "reward_mean": r, "reward_unscaffolded_mean": "nan", **({"val/score": v} if v is not None else {})}
                 for s, r, v in records]
        path.write_text("\n".join(__import__("json").dumps(x) for x in lines) + "\n")
        rows += curves.read_run(path, "arm", seed)
    c = curves.over_seeds(rows, "arm", "heldout_score")
    assert c["steps"].tolist() == [2, 4] and c["num_seeds"] == 2
    np.testing.assert_allclose(c["mean"], [0.4, 0.8])
    np.testing.assert_allclose(c["min"], [0.3, 0.7])
    np.testing.assert_allclose(c["max"], [0.5, 0.9])
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


def test_format_item_and_the_shipped_tiny_data():
    import pathlib

    from ruscarl_jax.data.loaders import load_examples
    from ruscarl_jax.judge.verifiers import check_rule

    root = pathlib.Path(__file__).resolve().parents[1]
    for name, held_out, count in (("train", False, 128), ("val", True, 32)):  # data/tiny = the generator, no format item
        shipped, _ = load_examples(root / "data" / "tiny" / f"{name}.jsonl")
        assert shipped == synthetic.make_examples(count, 0, held_out=held_out)
    item = synthetic.format_item()
    for ex in synthetic.make_examples(4, 0, with_format=True) + synthetic.make_warm_start_examples(4, 0, with_format=True):
        assert ex.rubric[-1] == item and len(ex.rubric) == 5
        answer = synthetic.demonstration(ex, tuple(range(5)), np.random.default_rng(0))
        assert check_rule(item, answer)
        assert sum(i.points for i, m in zip(ex.rubric, [check_rule(i, answer) for i in ex.rubric]) if m) == ex.positive_points
    assert not check_rule(item, "Notes: amber kettle lantern willow")  # the many-words loophole
    assert not check_rule(item, "amber kettle lantern")

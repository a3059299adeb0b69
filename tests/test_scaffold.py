"""Scaffolding: reveal ratios, criterion selection, the system message and the rendered prompts."""
from __future__ import annotations

import collections
import dataclasses
import math

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ruscarl_jax.data.loaders import load_examples
from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.data.types import Example, Message, RubricItem
from ruscarl_jax.scaffold.message import ScaffoldWording, scaffold_text, with_system_message
from ruscarl_jax.scaffold.plan import plan_example
from ruscarl_jax.scaffold.prompts import build_prompts, render_prompt
from ruscarl_jax.scaffold.ratio import group_reveal_ratios, ratio_schedule, reveal_ratio, step_factor
from ruscarl_jax.scaffold.selection import choose_shown, selection_rng, shown_indices
from ruscarl_jax.scaffold.settings import RULES, STEP_RULES, ScaffoldSettings

# ---------------------------------------------------------------- reveal ratios against hand values
# T = 5 steps: first t=1 (x=0), middle t=3 (x=0.5), last t=5 (x=1).
T = 5
IN_GROUP = {  # hand-written in-group factors g for n = 1, 2, 8
    "linear": {1: [1.0], 2: [1.0, 0.0], 8: [7 / 7, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0]},
    "binary3": {1: [1.0], 2: [1.0, 1.0], 8: [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]},
}
STEP = {  # hand-computed step factors s at t = 1, 3, 5
    "linear": {1: 1.0, 3: 1.0, 5: 1.0},
    "binary": {1: 1.0, 3: 1.0, 5: 1.0},
    "math_linear": {1: 1.0, 3: 1.0, 5: 1.0},
    "step_linear": {1: 1.0, 3: 0.5, 5: 0.0},                          # (T - t) / (T - 1)
    "step_power": {1: 1.0, 3: 0.25, 5: 0.0},                          # (1 - x)^2
    "step_sigmoid": {1: 1 / (1 + math.exp(-5.0)), 3: 0.5, 5: 1 / (1 + math.exp(5.0))},  # start .5, k 10
}
PARAMS = dict(power=2.0, start_point=0.5, steepness=10.0, full_reveal_count=3)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("step", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 8])
def test_rule_matches_hand_values(rule, step, n):
    decay = "binary3" if rule == "binary" else "linear"
    expected = [1.0] if n == 1 else [g * STEP[rule][step] for g in IN_GROUP[decay][n]]
    s = ScaffoldSettings(rule=rule, **PARAMS)
    np.testing.assert_allclose(group_reveal_ratios(n, step, T, s), expected, rtol=0, atol=1e-15)
    assert [reveal_ratio(k, n, step, T, s) for k in range(n)] == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("rule", STEP_RULES)
def test_step_rules_with_binary_group_decay(rule):
    s = ScaffoldSettings(rule=rule, group_decay="binary", **PARAMS)
    expected = [g * STEP[rule][3] for g in IN_GROUP["binary3"][8]]
    np.testing.assert_allclose(group_reveal_ratios(8, 3, T, s), expected, atol=1e-15)


def test_paper_sigmoid_value():
    s = ScaffoldSettings.paper_healthbench()
    x = 70 / 349  # step 71 of 350
    expected_s = 1 / (1 + math.exp((x - 0.2) * 125))
    assert step_factor(71, 350, s) == pytest.approx(expected_s, rel=1e-14)
    assert reveal_ratio(2, 8, 71, 350, s) == pytest.approx(5 / 7 * expected_s, rel=1e-14)
    assert s.add_base_when_zero is False and s.rule == "step_sigmoid"


@pytest.mark.parametrize("rule", STEP_RULES)
def test_unknown_steps_mean_no_step_decay(rule):
    s = ScaffoldSettings(rule=rule)
    for step, total in [(None, 350), (10, None), (None, None), (1, 1)]:
        np.testing.assert_allclose(group_reveal_ratios(8, step, total, s), np.arange(7, -1, -1) / 7)


def test_steepness_extreme_does_not_overflow():
    s = ScaffoldSettings(rule="step_sigmoid", start_point=0.0, steepness=1e6)
    assert step_factor(350, 350, s) == 0.0


def test_ratio_schedule_rows_are_steps():
    s = ScaffoldSettings(rule="step_linear")
    sched = ratio_schedule(3, 5, s)
    assert sched.shape == (5, 3)
    np.testing.assert_allclose(sched[:, 0], [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(sched[:, 1], [0.5, 0.375, 0.25, 0.125, 0.0])


@pytest.mark.parametrize("field,value", [("rule", "cosine"), ("group_decay", "exp"), ("full_reveal_count", -1),
                                         ("steepness", float("nan")), ("power", -1.0)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field) as err:
        ScaffoldSettings(**{field: value})
    if field == "rule":
        for rule in RULES:
            assert rule in str(err.value)


def test_bad_ratio_arguments():
    s = ScaffoldSettings()
    with pytest.raises(ValueError, match="sample_index"):
        reveal_ratio(8, 8, 1, 10, s)
    with pytest.raises(ValueError, match="1-based"):
        reveal_ratio(0, 8, 0, 10, s)
    with pytest.raises(ValueError, match="num_generations"):
        group_reveal_ratios(0, 1, 10, s)


# ---------------------------------------------------------------- properties
settings_strategy = st.builds(
    ScaffoldSettings,
    rule=st.sampled_from(RULES),
    group_decay=st.sampled_from(["linear", "binary"]),
    full_reveal_count=st.integers(0, 10),
    power=st.floats(0.0, 5.0),
    start_point=st.floats(-0.5, 1.5),
    steepness=st.floats(0.0, 300.0),
)


@hsettings(max_examples=200, deadline=None)
@given(s=settings_strategy, n=st.integers(1, 16), total=st.integers(1, 1000), data=st.data())
def test_ratio_properties(s, n, total, data):
    step = data.draw(st.integers(1, total + 5))
    r = group_reveal_ratios(n, step, total, s)
    assert np.all(r >= 0.0) and np.all(r <= 1.0)
    assert np.all(np.diff(r) <= 0.0), "ratios must not increase with the sample index"
    if s.rule in STEP_RULES:
        later = group_reveal_ratios(n, step + 1, total, s)
        assert np.all(later <= r + 1e-15), "step rules must not increase with the step"


@hsettings(max_examples=200, deadline=None)
@given(num=st.integers(1, 40), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**31),
       step=st.integers(1, 500), ex_id=st.text(min_size=1, max_size=12), k=st.integers(0, 15))
def test_selection_properties(num, ratio, seed, step, ex_id, k):
    shown = shown_indices(num, ratio, seed=seed, step=step, example_id=ex_id, sample_index=k)
    assert len(shown) == (num if ratio >= 1 else round(num * ratio))
    assert len(set(shown)) == len(shown) and list(shown) == sorted(shown)
    assert all(0 <= i < num for i in shown)
    assert shown == shown_indices(num, ratio, seed=seed, step=step, example_id=ex_id, sample_index=k)


@hsettings(max_examples=100, deadline=None)
@given(num=st.integers(4, 40), seed=st.integers(0, 2**31), ex_id=st.text(min_size=1, max_size=12),
       k=st.integers(0, 15), frac=st.floats(0.3, 0.7))
def test_different_step_gives_different_selection(num, seed, ex_id, k, frac):
    selections = {shown_indices(num, frac, seed=seed, step=t, example_id=ex_id, sample_index=k) for t in range(1, 11)}
    # 0 < m < N here, so ten steps drawing the same subset has probability below (1/4)^9.
    assert len(selections) > 1
    same_step = {shown_indices(num, frac, seed=seed, step=3, example_id=ex_id, sample_index=k) for _ in range(3)}
    assert len(same_step) == 1


def test_selection_depends_on_each_key_part():
    base = dict(seed=0, step=5, example_id="a", sample_index=1)
    ref = selection_rng(**base).integers(0, 2**62, size=4)
    for key, other in [("seed", 1), ("step", 6), ("example_id", "b"), ("sample_index", 2)]:
        assert not np.array_equal(ref, selection_rng(**{**base, key: other}).integers(0, 2**62, size=4))


def test_selection_is_uniform():
    counts = collections.Counter()
    draws = 2000
    for i in range(draws):
        counts.update(shown_indices(10, 0.5, seed=7, step=1, example_id=f"ex{i}", sample_index=0))
    freq = np.array([counts[j] / draws for j in range(10)])
    # each index is shown with probability 1/2; 5 sigma of a binomial(2000, 1/2) is 0.056
    assert np.all(np.abs(freq - 0.5) < 0.056), freq


@pytest.mark.parametrize("num,ratio,expected", [
    (6, 1.0, (0, 1, 2, 3, 4, 5)),     # everything, the final answer (last) included
    (6, 0.5, (0, 1, 4)),              # round(4 * .5) = 2 others in order + the format item
    (6, 0.0, (4,)),                   # format item only
    (2, 0.7, (0,)),                   # no other items
    (7, 0.6, (0, 1, 2, 5)),           # round(5 * .6) = 3
])
def test_math_linear_selection(num, ratio, expected):
    assert choose_shown(num, ratio, rng=None, math_linear=True) == expected


def test_math_linear_needs_two_items():
    with pytest.raises(ValueError, match="at least 2"):
        choose_shown(1, 1.0, rng=None, math_linear=True)


# ---------------------------------------------------------------- the message
ITEMS = (
    RubricItem("Mentions the dosage.", 5.0, ("axis:accuracy",)),
    RubricItem("Recommends an unsafe remedy.", -7.0),
    RubricItem("Asks about symptoms.", 2.5),
    RubricItem("Is rude.", -1.0),
)


def test_scaffold_text_sections_and_numbering():
    text = scaffold_text(ITEMS, ScaffoldWording(), include_evaluation_warning=True)
    w = ScaffoldWording()
    expected = "\n\n".join([
        w.opening.format(base_message=w.base_message),
        f"{w.include_header}\nCriterion 1: Mentions the dosage. (worth 5 points)\n"
        "Criterion 2: Asks about symptoms. (worth 2.5 points)",
        f"{w.avoid_header}\nCriterion 1: Recommends an unsafe remedy. (penalty: 7 points)\n"
        "Criterion 2: Is rude. (penalty: 1 points)",
        w.closing,
        w.evaluation_warning,
    ])
    assert text == expected
    assert w.evaluation_warning not in scaffold_text(ITEMS, w, include_evaluation_warning=False)


def test_scaffold_text_omits_empty_section_and_uses_custom_wording():
    w = ScaffoldWording(base_message="You are a careful legal assistant.", opening="{base_message}",
                        include_header="Cover:", include_item="- {criterion} [{points}]", closing="Answer.")
    text = scaffold_text(ITEMS[:1], w, include_evaluation_warning=False)
    assert text == "You are a careful legal assistant.\n\nCover:\n- Mentions the dosage. [5]\n\nAnswer."
    assert "avoid" not in text.lower()


def test_wording_from_a_mapping():
    s = ScaffoldSettings(wording={"base_message": "You are a maths tutor."})
    assert s.wording == ScaffoldWording(base_message="You are a maths tutor.")
    config = ml_collections.ConfigDict({"rule": "step_sigmoid", "wording": {"closing": "Answer briefly."}})
    from_config = ScaffoldSettings(**config)
    assert from_config.rule == "step_sigmoid" and from_config.wording.closing == "Answer briefly."
    with pytest.raises(TypeError, match="tone"):
        ScaffoldSettings(wording={"tone": "formal"})


def test_wording_rejects_unknown_placeholder():
    with pytest.raises(ValueError, match="include_item"):
        ScaffoldWording(include_item="{criterion} {weight}")


def test_default_wording_is_domain_neutral():
    text = " ".join(str(v) for v in dataclasses.asdict(ScaffoldWording()).values()).lower()
    for word in ("medical", "health", "patient", "doctor", "clinical"):
        assert word not in text


def test_existing_system_message_is_extended():
    conv = (Message("system", "Answer in French."), Message("user", "Hi"))
    merged, text = with_system_message(conv, "SCAFFOLD")
    assert merged == (Message("system", "Answer in French.\n\nSCAFFOLD"), Message("user", "Hi"))
    assert text == "Answer in French.\n\nSCAFFOLD"
    inserted, text = with_system_message(conv[1:], "SCAFFOLD")
    assert inserted == (Message("system", "SCAFFOLD"), Message("user", "Hi")) and text == "SCAFFOLD"


def _example(system: str | None = None) -> Example:
    msgs = ((Message("system", system),) if system else ()) + (Message("user", "What should I take?"),)
    return Example(id="ex-1", messages=msgs, rubric=ITEMS)


@pytest.mark.parametrize("add_base", [True, False])
def test_plan_base_message_when_nothing_shown(add_base):
    s = ScaffoldSettings(add_base_when_zero=add_base)
    plans = plan_example(_example(), 4, None, None, s, seed=0)
    assert [p.ratio for p in plans] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert [len(p.shown_indices) for p in plans] == [4, 3, 1, 0]  # round(4 * 2/3) = 3, round(4/3) = 1
    last = plans[-1]
    if add_base:
        assert last.system_message == "You are a helpful assistant."
        assert last.messages[0] == Message("system", "You are a helpful assistant.")
    else:
        assert last.system_message is None and last.messages == _example().messages
    assert plans[0].shown_indices == (0, 1, 2, 3)


def test_plan_keeps_own_system_message_when_nothing_shown():
    plans = plan_example(_example("Be brief."), 2, None, None, ScaffoldSettings(), seed=0)
    assert plans[1].system_message is None and plans[1].messages == _example("Be brief.").messages
    assert plans[0].system_message.startswith("Be brief.\n\n")
    assert len([m for m in plans[0].messages if m.role == "system"]) == 1


# ---------------------------------------------------------------- rendered prompts
def _chatml(messages) -> str:
    """An independent rendering of ChatML, written out by hand."""
    return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [it.criterion for it in ITEMS] * 20 + [ScaffoldWording().opening, ScaffoldWording().closing] * 20
    return build_tiny_tokenizer(corpus, vocab_size=400)


@pytest.mark.parametrize("participate", [False, True])
def test_build_prompts_ids_and_training_prompt(tokenizer, participate):
    s = ScaffoldSettings(participate_training=participate)
    ex = _example()
    batch = build_prompts([ex], 3, 1, 10, s, 0, tokenizer)
    assert [r.sample_index for r in batch.records] == [0, 1, 2] and batch.dropped_ids == ()
    for r in batch.records:
        assert r.example_id == "ex-1"
        expected_sampling = tokenizer(_chatml(r.sampling_messages), add_special_tokens=False)["input_ids"]
        assert r.sampling_ids.tolist() == expected_sampling
        assert r.sampling_messages[0].role == "system"
        assert r.sampling_messages[0].content == r.system_message
        train = r.sampling_messages if participate else ex.messages
        assert r.training_messages == train
        assert r.training_ids.tolist() == tokenizer(_chatml(train), add_special_tokens=False)["input_ids"]
    first = batch.records[0]
    assert (first.training_ids.tolist() == first.sampling_ids.tolist()) == participate


def test_length_policies(tokenizer):
    short = Example("short", (Message("user", "Hi"),), ITEMS[:1])
    long = Example("long", (Message("user", "word " * 400),), ITEMS[:1])
    s = ScaffoldSettings(add_base_when_zero=False)
    full = build_prompts([short, long], 2, None, None, s, 0, tokenizer)
    long_max = max(len(r.sampling_ids) for r in full.records if r.example_id == "long")
    short_max = max(len(r.sampling_ids) for r in full.records if r.example_id == "short")
    limit = (long_max + short_max) // 2
    assert short_max < limit < long_max

    dropped = build_prompts([short, long], 2, None, None, s, 0, tokenizer, limit, "drop")
    assert dropped.dropped_ids == ("long",) and dropped.num_dropped == 1
    assert [r.example_id for r in dropped.records] == ["short", "short"] and dropped.examples == [short]

    with pytest.raises(ValueError, match="'long'.*max_prompt_length"):
        build_prompts([short, long], 2, None, None, s, 0, tokenizer, limit, "error")

    cut = build_prompts([short, long], 2, None, None, s, 0, tokenizer, limit, "truncate_left")
    for r, ref in zip(cut.records, full.records):
        assert len(r.sampling_ids) <= limit and len(r.training_ids) <= limit
        assert r.sampling_ids.tolist() == ref.sampling_ids.tolist()[-limit:]
        assert r.training_ids.tolist() == ref.training_ids.tolist()[-limit:]
        assert r.truncated == (r.example_id == "long")
    assert cut.num_truncated == 2


def test_bad_length_policy(tokenizer):
    with pytest.raises(ValueError, match="length_policy"):
        build_prompts([_example()], 2, None, None, ScaffoldSettings(), 0, tokenizer, 100, "shorten")


# ---------------------------------------------------------------- the real HealthBench data
def test_healthbench_prompts_render_with_shown_criteria(healthbench_dir):
    examples, _ = load_examples(healthbench_dir / "healthbench_val400.jsonl")
    assert len(examples) == 400
    corpus = [m.content for ex in examples[:60] for m in ex.messages]
    tok = build_tiny_tokenizer(corpus, vocab_size=2048)
    s = ScaffoldSettings.paper_healthbench()
    w = s.wording
    seen_none = seen_some = 0
    # Every example's 8 scaffolded prompts through the chat template (tokenizing all of them takes ~10 s
    # on 2 cores, so token ids are checked on a slice below).
    for ex in examples:
        for plan in plan_example(ex, 8, 40, 350, s, seed=3):
            rubric = ex.rubric
            assert len(plan.shown_indices) == (len(rubric) if plan.ratio >= 1 else round(len(rubric) * plan.ratio))
            text = render_prompt(tok, plan.messages)
            assert text == _chatml(plan.messages)
            if not plan.shown_indices:
                seen_none += 1
                assert plan.system_message is None and plan.messages == ex.messages
                continue
            seen_some += 1
            assert text.startswith(f"<|im_start|>system\n{plan.system_message}<|im_end|>\n")
            assert text.endswith(_chatml(ex.messages))
            shown = [rubric[i] for i in plan.shown_indices]
            positives = [it for it in shown if it.points >= 0]
            negatives = [it for it in shown if it.points < 0]
            for j, it in enumerate(positives, start=1):
                assert f"Criterion {j}: {it.criterion} (worth {it.points:g} points)" in plan.system_message
            for j, it in enumerate(negatives, start=1):
                assert f"Criterion {j}: {it.criterion} (penalty: {-it.points:g} points)" in plan.system_message
            shown_texts = {it.criterion for it in shown}
            for i, it in enumerate(rubric):
                if i not in plan.shown_indices and it.criterion not in shown_texts:
                    assert f": {it.criterion} (worth" not in plan.system_message
                    assert f": {it.criterion} (penalty" not in plan.system_message
            assert (w.include_header in plan.system_message) == bool(positives)
            assert (w.avoid_header in plan.system_message) == bool(negatives)
            assert plan.system_message.endswith(w.evaluation_warning)
    assert seen_none > 0 and seen_some > 0

    batch = build_prompts(examples[:40], 8, 40, 350, s, seed=3, tokenizer=tok)
    assert len(batch.records) == 8 * 40 and batch.num_dropped == 0
    for r in batch.records:
        assert tok.decode(r.sampling_ids.tolist()) == _chatml(r.sampling_messages)
        assert tok.decode(r.training_ids.tolist()) == _chatml(r.example.messages)

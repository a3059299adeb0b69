""""Scaffolded" means at least one criterion was shown (issue 23, item 2): round(N * ratio) shows nothing
for a small ratio > 0, and such a row is unscaffolded in the training batch (the rollout-correction scope
and the scaffold-gap rows), in the reward metrics and in the run summary. References are worked by hand
from the selection rule (Python's round) and NumPy means."""
import json

import jax
import numpy as np
import pytest

from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.data.types import Example, Message, RubricItem
from ruscarl_jax.evaluation.run_summary import summarize
from ruscarl_jax.sampler.generate import SampleOutput
from ruscarl_jax.scaffold.plan import plan_example
from ruscarl_jax.scaffold.prompts import build_prompts
from ruscarl_jax.scaffold.settings import ScaffoldSettings
from ruscarl_jax.trainer.loop import _rollout_metrics
from ruscarl_jax.trainer.rollout import Rollout, assemble

G = 8
# rule 'linear', G = 8: ratios (7 - k) / 7; with N = 2 criteria round(2 * ratio) = 2, 2, 1, 1, 1, 1, 0, 0
SHOWN = [2, 2, 1, 1, 1, 1, 0, 0]
EXAMPLE = Example("ex-1", (Message("user", "Write a short note about the river."),),
                  (RubricItem("Mentions the water level", 3.0), RubricItem("Names a fish", 2.0)))


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [EXAMPLE.messages[0].content, *(i.criterion for i in EXAMPLE.rubric)] * 20
    return build_tiny_tokenizer(corpus, vocab_size=300)


def test_plan_counts_shown_criteria_not_ratios():
    plans = plan_example(EXAMPLE, G, None, None, ScaffoldSettings(rule="linear", add_base_when_zero=False), 0)
    assert [p.num_shown for p in plans] == SHOWN
    assert plans[6].ratio == pytest.approx(1 / 7) and plans[6].system_message is None  # ratio > 0, nothing shown


def _rollout(tokenizer, settings, step=None, total=None):
    prompts = build_prompts([EXAMPLE], G, step, total, settings, 0, tokenizer)
    n, r = len(prompts.records), 3
    samples = SampleOutput(
        prompt_tokens=np.zeros((n, 0), np.int32), prompt_mask=np.zeros((n, 0), np.int32),
        tokens=np.ones((n, r), np.int32), response_mask=np.ones((n, r), np.int32),
        logprobs=np.full((n, r), -0.5, np.float32), finish_reason=np.asarray(["stop"] * n),
        lengths=np.full(n, r, np.int32), num_steps=r)
    return Rollout(1, prompts, samples, [""] * n, 0.0, {})


def test_small_ratio_that_shows_nothing_is_unscaffolded(tokenizer):
    rollout = _rollout(tokenizer, ScaffoldSettings(rule="linear", add_base_when_zero=False))
    rewards = np.arange(1, G + 1, dtype=np.float64) / 10
    batch = assemble(rollout, rewards, np.ones(G, np.float32), 0, tokenizer.pad_token_id)
    shown = np.asarray(SHOWN) > 0
    np.testing.assert_array_equal(batch["shown"], SHOWN)
    np.testing.assert_array_equal(batch["scaffolded"], shown.astype(np.float32))  # row 6: ratio 1/7, unscaffolded
    assert batch["ratio"][6] > 0
    metrics = jax.device_get(jax.jit(_rollout_metrics)({k: jax.numpy.asarray(v) for k, v in batch.items()}))
    assert float(metrics["reward_scaffolded_mean"]) == pytest.approx(rewards[shown].mean())
    assert float(metrics["reward_unscaffolded_mean"]) == pytest.approx(rewards[~shown].mean())
    assert float(metrics["scaffolded_fraction"]) == pytest.approx(shown.mean())
    assert float(metrics["shown_criteria_mean"]) == pytest.approx(np.mean(SHOWN))
    assert float(metrics["reveal_ratio_mean"]) == pytest.approx(np.mean((7 - np.arange(G)) / 7), rel=1e-6)  # still logged


def test_late_step_of_a_decayed_schedule_is_all_unscaffolded(tokenizer):
    # step_sigmoid (start 0.3, steepness 10) at step 90 of 100: every ratio <= 0.0025, all > 0 but the last
    rollout = _rollout(tokenizer, ScaffoldSettings(rule="step_sigmoid", add_base_when_zero=False), 90, 100)
    assert sum(r.ratio > 0 for r in rollout.prompts.records) == G - 1
    batch = assemble(rollout, np.linspace(0, 1, G), np.ones(G, np.float32), 0, tokenizer.pad_token_id)
    assert not batch["scaffolded"].any()
    metrics = jax.device_get(jax.jit(_rollout_metrics)({k: jax.numpy.asarray(v) for k, v in batch.items()}))
    assert np.isnan(metrics["reward_scaffolded_mean"]) and float(metrics["reward_unscaffolded_mean"]) == pytest.approx(0.5)


def test_run_summary_reports_the_scaffolded_fraction_and_flags_old_logs(tmp_path):
    records = [{"step": s, "reward_scaffolded_mean": 0.6, "reward_unscaffolded_mean": 0.3, "kl": 0.01,
                "scaffolded_fraction": 1.0 - s / 20} for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    text = summarize(tmp_path)
    row = next(line for line in text.splitlines() if line.strip().startswith("rows shown >= 1 criterion")).split()
    assert row[5:7] == [f"{np.mean(1 - np.arange(1, 11) / 20):.3f}", f"{np.mean(1 - np.arange(11, 21) / 20):.3f}"]
    assert "ratio > 0" not in text
    for r in records:
        del r["scaffolded_fraction"]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert "ratio > 0" in summarize(tmp_path)  # logged before the fix: said so

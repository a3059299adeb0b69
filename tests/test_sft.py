"""The SFT step: its loss against a NumPy float64 cross-entropy, accumulation, learning, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_toy import FAST_COMPILE, TOY_POLICY, rollout_batch, toy_params

from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
from ruscarl_jax.rl.sft import SFTSettings, make_sft_step

SMOOTH_ADAM = OptimizerSettings(learning_rate=0.05, eps=1.0, weight_decay=0.0)


def np_toy_logits(params, tokens, mask):
    """The toy policy's logits in float64 NumPy (causal running mean of embeddings, tanh, unembed)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = mask.astype(np.float64)[..., None]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    x = (p["embed"][tokens] + p["pos"][positions]) * m
    mean = np.cumsum(x, axis=1) / np.maximum(np.cumsum(m, axis=1), 1.0)
    return np.tanh(mean @ p["mix"]) @ p["out"]


def np_sft_loss(params, batch):
    ids, resp = batch["input_ids"], batch["response_mask"] * batch["row_valid"][:, None]
    z = np_toy_logits(params, ids, batch["attention_mask"])
    prompt = ids.shape[1] - resp.shape[1]
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(resp.shape[1]):
            if resp[i, t]:
                row = z[i, prompt + t - 1]
                lse = row.max() + np.log(np.exp(row - row.max()).sum())
                total += lse - row[ids[i, prompt + t]]
                count += 1
    return total / count


def make_step(settings, opt_settings=SMOOTH_ADAM):
    opt = make_optimizer(opt_settings)
    return make_sft_step(TOY_POLICY, settings, opt, donate=False, compiler_options=FAST_COMPILE), opt


def test_sft_loss_and_accumulation():
    params = toy_params(jax.random.key(0))
    batch = rollout_batch(1)
    batch["row_valid"][[2, 9]] = 0  # dropped rows take no part
    results = []
    for micro in (16, 4):
        step, opt = make_step(SFTSettings(micro_batch_size=micro, logprob_chunk_size=2))
        results.append(step(params, opt.init(params), batch))
    (p1, _, m1), (p2, _, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), np_sft_loss(params, batch), rtol=1e-5)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert float(m1["response_tokens"]) == float((batch["response_mask"] * batch["row_valid"][:, None]).sum())
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params))) > 1e-3


def test_sft_fits_a_batch():
    params = toy_params(jax.random.key(1))
    batch = rollout_batch(2)
    step, opt = make_step(SFTSettings(micro_batch_size=8, logprob_chunk_size=5),
                          OptimizerSettings(learning_rate=0.03, weight_decay=0.0))
    state = opt.init(params)
    losses = []
    for _ in range(60):
        params, state, m = step(params, state, batch)
        losses.append(float(m["loss"]))
        assert float(m["skipped_updates"]) == 0
    np.testing.assert_allclose(losses[0], np.log(32), rtol=0.05)  # near-uniform start over 32 tokens
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    np.testing.assert_allclose(np_sft_loss(params, batch), losses[-1], rtol=0.1)


def test_sft_rejects_bad_input():
    params = toy_params(jax.random.key(2))
    step, opt = make_step(SFTSettings(micro_batch_size=8))
    batch = rollout_batch(3)
    with pytest.raises(ValueError, match="missing key 'response_mask'"):
        step(params, opt.init(params), {k: v for k, v in batch.items() if k != "response_mask"})
    with pytest.raises(ValueError, match="micro_batch_size=8 must divide"):
        step(params, opt.init(params), {k: v[:12] for k, v in batch.items()})
    with pytest.raises(ValueError, match="'attention_mask' has shape"):
        step(params, opt.init(params), dict(batch, attention_mask=batch["attention_mask"][:, 1:]))
    with pytest.raises(ValueError, match="SFTSettings.micro_batch_size"):
        dataclasses.replace(SFTSettings(), micro_batch_size=0)

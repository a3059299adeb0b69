"""LoRA / QLoRA (ruscarl_jax/models/lora.py): against the base model, finite differences, transformers and peft."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from model_fixtures import make_hf_model, save_hf_model
from rl_toy import FAST_COMPILE, rollout_batch
from ruscarl_jax.models import hf_io, lora, peft_io, qwen
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.rl.train_step import grpo_loss, make_grpo_step, make_reference
from ruscarl_jax.rl.losses import normalizers
from ruscarl_jax.sampler.generate import generate
from ruscarl_jax.sampler.settings import SamplingSettings
from ruscarl_jax.trainer.config import ConfigError, validate

VOCAB = 101


def _tokens(seed=0, rows=3, length=9):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded row
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = make_hf_model("qwen2_gqa2_untied", vocab_size=VOCAB)
    save_hf_model(model, directory)
    cfg, params = hf_io.load_checkpoint(directory)
    return model, directory, cfg, params


def _perturbed(state, seed=1, size=0.05):
    """A state whose adapters are non-zero (a fresh one has b = 0)."""
    leaves, tree = jax.tree.flatten(state["lora"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + size * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return {**state, "lora": jax.tree.unflatten(tree, new)}


def test_zero_initialised_adapters_leave_the_logits_of_the_base(hf_model):
    _, _, cfg, params = hf_model
    tokens, mask = _tokens()
    base = qwen.compute_logits(params, cfg, tokens, mask)
    state = lora.make_state(params, lora.LoraSettings(rank=4))
    assert float(jnp.abs(state["lora"]["layers"]["q_proj"]["a"]).max()) > 0  # a is random, b is zero
    np.testing.assert_array_equal(np.asarray(qwen.compute_logits(lora.effective_params(state), cfg, tokens, mask)),
                                  np.asarray(base))
    # and non-zero adapters do change them (the check above can fail)
    moved = qwen.compute_logits(lora.effective_params(_perturbed(state)), cfg, tokens, mask)
    assert float(jnp.abs(moved - base).max()) > 1e-2


def test_adapter_shapes_and_targets(hf_model):
    _, _, cfg, params = hf_model
    state = lora.make_state(params, lora.LoraSettings(rank=3, targets=("q", "o", "down")))
    ad = state["lora"]["layers"]
    assert set(ad) == {"q_proj", "o_proj", "down_proj"}
    e, h, d, f, L = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_layers
    assert ad["q_proj"]["a"].shape == (L, e, 3) and ad["q_proj"]["b"].shape == (L, 3, h, d)
    assert ad["o_proj"]["a"].shape == (L, h, d, 3) and ad["o_proj"]["b"].shape == (L, 3, e)
    assert ad["down_proj"]["a"].shape == (L, f, 3) and ad["down_proj"]["b"].shape == (L, 3, e)
    with pytest.raises(ValueError, match="targets"):
        lora.LoraSettings(rank=3, targets=("qkv",))


def test_merge_equals_the_adapted_forward_and_transformers_and_peft_load_the_export(hf_model, tmp_path):
    import peft

    model, directory, cfg, params = hf_model
    settings = lora.LoraSettings(rank=4, alpha=8.0)
    state = _perturbed(lora.make_state(params, settings))
    tokens, mask = _tokens()
    adapted = np.asarray(qwen.compute_logits(lora.effective_params(state), cfg, tokens, mask))
    merged = lora.merge(state)
    assert "lora_a" not in merged["layers"]["q_proj"]
    np.testing.assert_allclose(np.asarray(qwen.compute_logits(merged, cfg, tokens, mask)), adapted, atol=2e-5, rtol=1e-5)

    # the merged Hugging Face directory, read by transformers
    hf_io.save_checkpoint(tmp_path / "merged", merged, cfg)
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    t = torch.tensor(np.asarray(tokens), dtype=torch.long)
    m = torch.tensor(np.asarray(mask), dtype=torch.long)
    pos = torch.tensor(np.asarray(qwen.default_positions(mask)), dtype=torch.long)
    with torch.no_grad():
        theirs = reloaded(input_ids=t, attention_mask=m, position_ids=pos).logits.numpy()
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(theirs[real], adapted[real], atol=2e-4, rtol=1e-4)

    # the PEFT adapter on top of the base checkpoint, read by peft
    peft_io.save_adapter(tmp_path / "adapter", state, cfg, settings, base_model=str(directory))
    base_model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    peft_model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=t, attention_mask=m, position_ids=pos).logits.numpy()
    np.testing.assert_allclose(theirs[real], adapted[real], atol=2e-4, rtol=1e-4)
    with torch.no_grad():  # with the adapter disabled peft gives the base model, as our reference does
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            off = peft_model(input_ids=t, attention_mask=m, position_ids=pos).logits.numpy()
    del plain
    np.testing.assert_allclose(off[real], np.asarray(qwen.compute_logits(params, cfg, tokens, mask))[real], atol=2e-4, rtol=1e-4)


def _settings(**kw):
    return GRPOSettings(**{**dict(ppo_mini_batch_size=8, ppo_micro_batch_size=4, use_kl_loss=True, kl_coef=0.1,
                                  kl_estimator="low_var_kl", temperature=1.0, logprob_chunk_size=16), **kw})


def _batch(seed=0):
    return rollout_batch(seed, groups=2, group_size=4, prompt=4, response=5, vocab=VOCAB)


def test_gradients_reach_only_the_adapters_and_match_finite_differences(hf_model):
    _, _, cfg, params = hf_model
    policy = qwen_policy(cfg)
    state = _perturbed(lora.make_state(params, lora.LoraSettings(rank=2, targets=("q", "v", "up"))), size=0.2)
    trainable, frozen = policy.split(state)
    assert set(trainable) == {"layers"} and "base" in frozen and "lora" not in frozen
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    mask = batch["response_mask"].astype(jnp.float32)
    rng = np.random.default_rng(0)
    micro = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "loss_mask": mask,
             "advantages": jnp.asarray(rng.normal(size=8), jnp.float32),
             "old_log_probs": jnp.asarray(rng.normal(size=mask.shape) * 0.1 - 4.6, jnp.float32),
             "ref_log_probs": jnp.asarray(rng.normal(size=mask.shape) * 0.1 - 4.6, jnp.float32)}
    s = _settings(ppo_micro_batch_size=8)
    norm = normalizers(mask)

    def loss(t):
        return grpo_loss(policy.join(t, frozen), micro, norm, policy=policy, settings=s)[0]

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)  # nothing for the base
    flat, unravel = jax.flatten_util.ravel_pytree(trainable)
    gflat = jax.flatten_util.ravel_pytree(grads)[0]
    assert float(jnp.abs(gflat).max()) > 0
    for k in range(3):  # central differences along random directions (float32 model: eps 1e-2, 2% tolerance)
        d = jnp.asarray(np.random.default_rng(10 + k).normal(size=flat.shape), jnp.float32)
        d = d / jnp.linalg.norm(d)
        eps = 1e-2
        fd = (loss(unravel(flat + eps * d)) - loss(unravel(flat - eps * d))) / (2 * eps)
        np.testing.assert_allclose(float(fd), float(gflat @ d), rtol=2e-2, atol=2e-4)

    # one update: the base is bit-identical, the adapters moved, the optimizer state covers the adapters
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-2, weight_decay=0.0))
    opt_state = optimizer.init(trainable)
    assert jax.tree.structure(opt_state[1].inner_state[0].mu) == jax.tree.structure(trainable)
    step = make_grpo_step(policy, s, optimizer, donate=False, compiler_options=FAST_COMPILE)
    new, _, metrics = step(state, opt_state, _batch(), jax.random.key(0))
    assert float(metrics["applied" if "applied" in metrics else "num_updates"]) >= 1
    for a, b in zip(jax.tree.leaves(new["base"]), jax.tree.leaves(state["base"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new["lora"]), jax.tree.leaves(state["lora"]))]
    assert min(moved) > 0


def test_kl_with_adapters_off_equals_kl_against_a_separate_reference_copy(hf_model):
    _, _, cfg, params = hf_model
    policy = qwen_policy(cfg)
    state = _perturbed(lora.make_state(params, lora.LoraSettings(rank=4)), size=0.2)
    s = _settings()
    assert make_reference(state, s) is None  # no copy is made for a LoRA state
    optimizer = optax.sgd(1e-2)
    opt_state = optimizer.init(state["lora"])
    step = make_grpo_step(policy, s, optimizer, donate=False, compiler_options=FAST_COMPILE)
    batch = _batch(3)
    ours = step(state, opt_state, batch, jax.random.key(0))
    copy = jax.tree.map(jnp.copy, params)  # the full-fine-tuning way: a separate frozen copy of the model
    theirs = step(state, opt_state, batch, jax.random.key(0), copy)
    assert float(ours[2]["kl_loss"]) > 1e-6  # the adapters moved the policy away from the base
    np.testing.assert_allclose(float(ours[2]["kl_loss"]), float(theirs[2]["kl_loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ours[0]["lora"]), jax.tree.leaves(theirs[0]["lora"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_qlora_forward_is_within_tolerance_of_the_float_one(hf_model):
    """int8 (absmax per output feature) base: logits within 2% of the float model's logit range, and the
    int8 kernels are exact to half a quantization step."""
    _, _, cfg, params = hf_model
    tokens, mask = _tokens()
    settings = lora.LoraSettings(rank=4, quantize="int8")
    state = _perturbed(lora.make_state(params, settings))
    q = state["base"]["layers"]["q_proj"]
    assert q["kernel_q"].dtype == jnp.int8 and "kernel" not in q
    kernel = np.asarray(params["layers"]["q_proj"]["kernel"])
    err = np.abs(np.asarray(q["kernel_q"], np.float32) * np.asarray(q["kernel_scale"]) - kernel)
    assert np.all(err <= np.asarray(q["kernel_scale"]) / 2 + 1e-7)
    float_state = {**state, "base": params}
    f = np.asarray(qwen.compute_logits(lora.effective_params(float_state), cfg, tokens, mask))
    g = np.asarray(qwen.compute_logits(lora.effective_params(state), cfg, tokens, mask))
    assert np.abs(g - f).max() <= 0.02 * np.abs(f).max()
    assert np.abs(g - f).max() > 0  # it is quantized
    # the merged export of a QLoRA state is the adapted forward of the int8 base
    np.testing.assert_allclose(np.asarray(qwen.compute_logits(lora.merge(state), cfg, tokens, mask)), g, atol=2e-5, rtol=1e-5)


def test_the_engine_samples_from_the_quantized_base_plus_adapters(hf_model):
    _, _, cfg, params = hf_model
    state = _perturbed(lora.make_state(params, lora.LoraSettings(rank=4, quantize="int8")), size=0.3)
    settings = SamplingSettings(max_new_tokens=6, greedy=True, stop_token_ids=(), pad_token_id=0)
    prompts = [np.arange(1, 6, dtype=np.int32), np.arange(7, 10, dtype=np.int32)]
    ours = generate(state, cfg, prompts, jax.random.key(0), settings)
    merged = generate(lora.merge(state), cfg, prompts, jax.random.key(0), settings)
    plain = generate(params, cfg, prompts, jax.random.key(0), settings)
    np.testing.assert_array_equal(ours.tokens, merged.tokens)
    np.testing.assert_allclose(ours.logprobs, merged.logprobs, atol=1e-4)
    assert not np.array_equal(ours.tokens, plain.tokens)  # the adapters are used


def test_bad_lora_config_is_named():
    from configs import colab_lora, tiny_lora

    colab = validate(colab_lora.get_config(), num_devices=1, check_paths=False)  # one chip
    assert (colab.lora.rank, colab.lora.scale, colab.grpo.compute_dtype) == (16, 2.0, "bfloat16")

    config = tiny_lora.get_config()
    config.warm_start.path = ""
    settings = validate(config, num_devices=8, check_paths=False)
    assert settings.lora.rank == 8 and settings.lora.scale == 2.0
    config.model.lora.quantize = "nf3"
    with pytest.raises(ConfigError, match=r"config\.model\.lora\.quantize"):
        validate(config, num_devices=8, check_paths=False)
    config.model.lora.quantize = "none"
    config.model.lora.dropout = 0.1
    with pytest.raises(ConfigError, match=r"config\.model\.lora\.dropout: unknown key"):
        validate(config, num_devices=8, check_paths=False)


def test_memory_plan_keeps_no_reference_copy_with_lora():
    """The planner's state terms: full fine-tuning holds a reference copy and Adam over every parameter;
    LoRA none, and Adam over the adapters only (2 float32 moments per adapter element)."""
    from configs import tiny_lora
    from ruscarl_jax.plan.memory_plan import parse_slice
    from ruscarl_jax.plan.step_memory import plan_config

    config = tiny_lora.get_config()
    config.warm_start.path = ""
    config.update_from_flattened_dict({"data.batch_size": 4, "rollout.num_generations": 2, "grpo.ppo_mini_batch_size": 8,
                                       "grpo.ppo_micro_batch_size": 8, "rollout.max_new_tokens": 8})
    config.model.tiny.vocab_size = 128
    lora_plan = plan_config(config, parse_slice("v5e-1"))
    config.model.lora.rank = 0
    full_plan = plan_config(config, parse_slice("v5e-1"))
    assert full_plan.analytic_terms["reference policy"] == full_plan.analytic_terms["params"]
    assert "reference policy" not in lora_plan.analytic_terms
    cfg = qwen.QwenConfig(**dict(config.model.tiny))
    adapters = lora.adapter_shapes(qwen.param_shapes(cfg), lora.LoraSettings(rank=8))
    assert abs(lora_plan.analytic_terms["optimizer state"] - 8 * lora.count(adapters)) < 64  # + counts / hyperparameters
    # what stays on the chip all step is smaller (a tiny model's compiled update peak is not: its adapters'
    # extra matmuls outweigh the state they save)
    resident = lambda plan: sum(plan.analytic_terms.get(k, 0) for k in ("params", "optimizer state", "reference policy"))  # noqa: E731
    assert resident(lora_plan) < resident(full_plan)

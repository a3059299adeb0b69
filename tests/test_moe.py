"""Qwen3-MoE in Flax against transformers + PyTorch: logits, generation, round trip, expert sharding,
routing statistics, routing replay and bad checkpoints."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from model_fixtures import MOE_SHAPES, hf_logits, left_padded_batch, make_hf_model, save_hf_model

from ruscarl_jax.models import hf_io, moe, qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, rows_over_expert
from ruscarl_jax.sampler.generate import generate
from ruscarl_jax.sampler.settings import SamplingSettings

LENGTHS = [9, 4, 1, 7]


def _masked_max_diff(a, b, mask) -> float:
    return float(np.abs((np.asarray(a) - np.asarray(b)) * mask[..., None]).max())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    built = {}

    def get(name, seed=0):
        if (name, seed) not in built:
            model = make_hf_model(name, seed=seed)
            directory = save_hf_model(model, tmp_path_factory.mktemp(name))
            built[name, seed] = (model, directory, *hf_io.load_checkpoint(directory))
        return built[name, seed]

    return get


@pytest.mark.parametrize("name", sorted(MOE_SHAPES))
def test_logits_match_transformers(name, loaded):
    model, _, cfg, params = loaded(name)
    assert cfg.is_moe and cfg.num_experts == model.config.num_experts
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS)
    ours = np.asarray(qwen.compute_logits(params, cfg, tokens, mask))
    assert _masked_max_diff(ours, hf_logits(model, tokens, mask), mask) < 1e-4


def test_mixed_layers_are_separate_stacks(loaded):
    _, _, cfg, params = loaded("moe_dense_layer_untied")  # layer 1 dense (mlp_only_layers=[1])
    assert cfg.sparse_layers == (True, False, True)
    assert [s[0] for s in cfg.layer_segments] == ["layers_0", "layers_1", "layers_2"]
    assert "mlp" in params["layers_0"] and "gate_proj" in params["layers_1"] and "mlp" in params["layers_2"]
    assert sum(p.size for p in jax.tree.leaves(params)) == cfg.num_params
    axes = qwen.param_logical_axes(cfg)
    jax.tree.map(lambda p, names: (len(names) == p.ndim) or pytest.fail(f"{names} vs {p.shape}"), params, axes,
                 is_leaf=lambda x: isinstance(x, tuple))
    _, _, cfg2, params2 = loaded("moe_top2of6_norm_untied")
    assert set(params2) == {"embed", "final_norm", "layers", "lm_head"}
    assert params2["layers"]["mlp"]["gate_proj"].shape == (2, 6, 32, 16)


def test_routing_stats_match_transformers_aux_loss(loaded):
    model, _, cfg, params = loaded("moe_dense_layer_untied")
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS, seed=4)
    _, routing = qwen.forward_routed(params, cfg, tokens, mask)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0), dtype=torch.long),
                    output_router_logits=True)
    np.testing.assert_allclose(float(routing["load_balancing_loss"]), float(out.aux_loss), rtol=1e-5)
    # the router's top-k per sparse layer, against transformers' router logits (real tokens only)
    logits = [g.numpy().reshape(len(LENGTHS), -1, cfg.num_experts) for g in out.router_logits]
    experts = np.asarray(routing["experts"])  # [B, L, T, K]
    assert (experts[:, 1] == -1).all()  # the dense layer
    for sparse_index, layer in enumerate([0, 2]):
        ref = np.sort(np.argsort(-logits[sparse_index], axis=-1)[..., : cfg.num_experts_per_tok], axis=-1)
        np.testing.assert_array_equal(np.sort(experts[:, layer], axis=-1)[mask == 1], ref[mask == 1])
    # entropy of the router distribution, in float64
    probs = [np.exp(g - g.max(-1, keepdims=True)) for g in map(np.float64, logits)]
    ent = [-(p / p.sum(-1, keepdims=True) * np.log(p / p.sum(-1, keepdims=True))).sum(-1) for p in probs]
    np.testing.assert_allclose(float(routing["router_entropy"]), np.mean([e[mask == 1].mean() for e in ent]), rtol=1e-5)
    assert float(routing["expert_load_max_over_mean"]) >= 1.0


def _reference_moe_layer(p, y, ids, norm_topk_prob):
    """float64 NumPy sparse MLP of one layer with the given expert ids [N, K]."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    logits = y @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    w = np.take_along_axis(probs, ids, -1)
    if norm_topk_prob:
        w /= w.sum(-1, keepdims=True)
    out = np.zeros_like(y)
    for n in range(y.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[n, k]
            g, u = y[n] @ p["gate_proj"][e], y[n] @ p["up_proj"][e]
            out[n] += w[n, k] * ((g / (1 + np.exp(-g)) * u) @ p["down_proj"][e])
    return out


def test_sparse_mlp_with_forced_experts_against_numpy(loaded):
    _, _, cfg, params = loaded("moe_top2of6_norm_untied")
    p = jax.tree.map(lambda x: x[0], params["layers"]["mlp"])
    y = np.random.default_rng(0).normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)
    forced = np.random.default_rng(1).integers(0, cfg.num_experts, (2, 5, cfg.num_experts_per_tok)).astype(np.int32)
    forced[..., 1] = (forced[..., 0] + 1) % cfg.num_experts  # distinct experts per token
    forced[1, 2] = -1  # this token routes freely
    out, top_ids, _ = moe.sparse_mlp(p, y, cfg, forced=forced)
    used = np.where(forced[..., :1] >= 0, forced, np.asarray(top_ids)).reshape(-1, cfg.num_experts_per_tok)
    ref = _reference_moe_layer(p, y.reshape(-1, cfg.hidden_size).astype(np.float64), used, cfg.norm_topk_prob)
    np.testing.assert_allclose(np.asarray(out).reshape(ref.shape), ref, atol=1e-5)


def test_routing_replay(loaded):
    _, _, cfg, params = loaded("moe_top3of8_tied")
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS, seed=5)
    free, routing = qwen.forward_routed(params, cfg, tokens, mask)
    # replaying the model's own routing changes nothing
    same, again = qwen.forward_routed(params, cfg, tokens, mask, forced_experts=routing["experts"])
    np.testing.assert_array_equal(np.asarray(same), np.asarray(free))
    np.testing.assert_array_equal(np.asarray(again["experts"]), np.asarray(routing["experts"]))
    # other experts are used when forced: the output changes, the reported (router's own) choice does not
    other = (np.asarray(routing["experts"]) + 1) % cfg.num_experts
    forced_out, forced_routing = qwen.forward_routed(params, cfg, tokens, mask, forced_experts=other)
    assert _masked_max_diff(forced_out, free, mask) > 1e-3
    np.testing.assert_array_equal(np.asarray(forced_routing["experts"])[:, 0], np.asarray(routing["experts"])[:, 0])
    # forcing only the last layer leaves the earlier layers' states untouched
    last_only = np.full_like(other, -1)
    last_only[:, -1] = other[:, -1]
    h_last, r_last = qwen.forward_routed(params, cfg, tokens, mask, forced_experts=last_only)
    np.testing.assert_array_equal(np.asarray(r_last["experts"]), np.asarray(routing["experts"]))
    assert _masked_max_diff(h_last, free, mask) > 1e-3


def test_greedy_generation_matches_transformers(tmp_path):
    model = make_hf_model("moe_dense_layer_untied", seed=2)
    torch.manual_seed(1)
    with torch.no_grad():  # wider weights than HF's 0.02 init so greedy outputs are diverse
        for pname, param in model.named_parameters():
            if param.ndim >= 2 and "gate.weight" not in pname:
                param.normal_(0.0, 0.2)
    cfg, params = hf_io.load_checkpoint(save_hf_model(model, tmp_path))
    tokens, mask = left_padded_batch(cfg.vocab_size, [9, 4, 1, 7, 12, 3], seed=2)
    steps = 12
    model.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                  attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=steps)
    expected = expected[:, tokens.shape[1]:].numpy()
    assert len(np.unique(expected)) > 3
    settings = SamplingSettings(max_new_tokens=steps, greedy=True, stop_token_ids=(), pad_token_id=0, prompt_bucket_min=8)
    out = generate(params, cfg, (tokens, mask), jax.random.key(0), settings)
    np.testing.assert_array_equal(out.tokens, expected)


def test_round_trip_through_transformers(loaded, tmp_path):
    model, _, cfg, params = loaded("moe_dense_layer_untied", seed=3)
    hf_io.save_checkpoint(tmp_path / "out", params, cfg, max_shard_bytes=20_000)  # several shards + index
    keys = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in keys and "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.gate_proj.weight" in keys
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS, seed=1)
    assert _masked_max_diff(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask), mask) < 1e-5
    cfg2, params2 = hf_io.load_checkpoint(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


# the third layout also splits the batch over the expert axis outside the MoE blocks
BATCH_OVER_EXPERT = rows_over_expert(DEFAULT_RULES)


@pytest.mark.parametrize("axes,rules", [(dict(expert=4, fsdp=2), DEFAULT_RULES),
                                        (dict(expert=2, tensor=2, fsdp=2), DEFAULT_RULES),
                                        (dict(expert=4, fsdp=2), BATCH_OVER_EXPERT)])
def test_expert_sharded_logits_equal_one_device(axes, rules, loaded):
    assert len(jax.devices()) == 8
    _, directory, cfg, params = loaded("moe_top3of8_tied")
    mesh = make_mesh(axes)
    _, sharded = hf_io.load_checkpoint(directory, mesh=mesh, rules=rules)
    tokens, mask = left_padded_batch(cfg.vocab_size, [9, 4, 1, 7, 3, 8, 2, 5])
    ref = np.asarray(jax.jit(lambda p: qwen.compute_logits(p, cfg, tokens, mask))(params))
    out = jax.jit(lambda p: qwen.compute_logits(p, cfg, tokens, mask, mesh=mesh, rules=rules))(sharded)
    assert _masked_max_diff(out, ref, mask) < 1e-5
    # the expert weights really are split over the expert axis (and their hidden dim over tensor)
    gate = sharded["layers"]["mlp"]["gate_proj"]  # [L, X, E, F] = layers, expert, embed, expert_mlp
    assert gate.sharding.spec == logical_to_spec(("layers",) + moe.GATE_UP_AXES, gate.shape, mesh, rules)
    tensor = axes.get("tensor", 1)
    assert gate.addressable_shards[0].data.shape == (2, 8 // axes["expert"], 32 // 2, 16 // tensor)
    # gradients through the expert-parallel block equal one device's
    loss = lambda p, m: qwen.compute_logits(p, cfg, tokens, mask, mesh=m, rules=rules).std()  # noqa: E731
    g1 = jax.jit(jax.grad(lambda p: loss(p, None)))(params)
    g8 = jax.jit(jax.grad(lambda p: loss(p, mesh)))(sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6), g1, g8)


def test_expert_axis_must_divide_experts(loaded):
    _, directory, cfg, _ = loaded("moe_top2of6_norm_untied")  # 6 experts
    with pytest.raises(hf_io.CheckpointError, match=r"expert axis \(4\) does not divide num_experts \(6\)"):
        hf_io.load_checkpoint(directory, mesh=make_mesh(dict(expert=4, fsdp=2)))
    with pytest.raises(ValueError, match=r"expert axis \(4\) does not divide num_experts \(6\)"):
        qwen.init_params_sharded(cfg, jax.random.key(0), make_mesh(dict(expert=4, fsdp=2)))


# --------------------------------------------------------------------------------------- bad input

def _rewrite(directory, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_expert_weight_names_expert_layer_and_shape(tmp_path):
    directory = save_hf_model(make_hf_model("moe_top2of6_norm_untied"), tmp_path)
    _rewrite(directory, lambda t: t.pop("model.layers.1.mlp.experts.4.up_proj.weight"))
    with pytest.raises(hf_io.CheckpointError,
                       match=r"missing weight 'model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight' \(layer 1, expert 4\), "
                             r"expected shape \(16, 32\)"):
        hf_io.load_checkpoint(directory)


def test_wrong_shape_expert_weight_names_both_shapes(tmp_path):
    directory = save_hf_model(make_hf_model("moe_top2of6_norm_untied"), tmp_path)

    def edit(t):
        t["model.layers.0.mlp.experts.2.down_proj.weight"] = np.zeros((32, 12), np.float32)
    _rewrite(directory, edit)
    with pytest.raises(hf_io.CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.2\.down_proj\.weight' "
                                                    r"\(layer 0, expert 2\) has shape \(32, 12\), expected \(32, 16\)"):
        hf_io.load_checkpoint(directory)


@pytest.mark.parametrize("key,value", [("shared_expert_intermediate_size", 64), ("scoring_func", "sigmoid")])
def test_unsupported_moe_feature_names_the_key(key, value, tmp_path):
    directory = save_hf_model(make_hf_model("moe_top2of6_norm_untied"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_io.CheckpointError, match=rf"config\.json: {key}={value!r} is not supported"):
        hf_io.load_checkpoint(directory)


@pytest.mark.parametrize("impl", ["blocked", "megablox_interpret"])
def test_grouped_matmul_impls_equal_ragged_dot(impl):
    """The CPU block path and the TPU Pallas kernel (interpreted on CPU) against jax.lax.ragged_dot, with
    empty groups and rows past the groups; values and gradients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5)).astype(np.float32)
    w = rng.normal(size=(4, 5, 3)).astype(np.float32)
    sizes = jax.numpy.asarray([10, 0, 7, 15], jax.numpy.int32)  # 32 of 37 rows in groups
    if impl == "megablox_interpret":
        if moe._megablox_gmm() is None:
            pytest.skip("this JAX has no megablox kernel")
        fn = lambda x, w: moe._gmm_megablox(x, w, sizes, interpret=True)  # noqa: E731
    else:
        fn = lambda x, w: moe._gmm_blocked(x, w, sizes, block=4)  # noqa: E731
    ref = lambda x, w: jax.lax.ragged_dot(x, w, sizes)  # noqa: E731
    np.testing.assert_allclose(np.asarray(fn(x, w)), np.asarray(ref(x, w)), atol=1e-5)
    grads = jax.grad(lambda x, w: (fn(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    expected = jax.grad(lambda x, w: (ref(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_remat_keeps_routing_and_gradients():
    """Rematerialised layers (configs/qwen3_30b_a3b.py uses remat='full') sow the same routing and give the
    same gradients, the load-balancing loss included."""
    import dataclasses

    cfg = qwen.QwenConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1,
                          head_dim=8, qkv_bias=False, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=8, mlp_only_layers=(1,))
    params = qwen.init_params(cfg, jax.random.key(0))
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(1, 50, (2, 5)), jax.numpy.int32)
    mask = jax.numpy.ones((2, 5), jax.numpy.int32)

    def grads(c):
        def loss(p):
            hidden, routing = qwen.forward_routed(p, c, tokens, mask)
            return (hidden ** 2).mean() + routing["load_balancing_loss"], routing
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g0, r0 = grads(cfg)
    g1, r1 = grads(dataclasses.replace(cfg, remat="full"))
    np.testing.assert_array_equal(np.asarray(r0["experts"]), np.asarray(r1["experts"]))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)

"""Qwen2 / Qwen3 in Flax against transformers + PyTorch: logits, round trip, sharding, bad checkpoints."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from model_fixtures import SHAPES, hf_logits, left_padded_batch, make_hf_model, save_hf_model

from ruscarl_jax.models import hf_io, qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, logical_to_spec, make_mesh

LENGTHS = [9, 4, 1, 7]


def _masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs((a - b) * mask[..., None]).max())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_transformers(name, tmp_path):
    model = make_hf_model(name)
    cfg, params = hf_io.load_checkpoint(save_hf_model(model, tmp_path))
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS)
    ours = np.asarray(qwen.compute_logits(params, cfg, tokens, mask))
    assert _masked_max_diff(ours, hf_logits(model, tokens, mask), mask) < 1e-4


def test_bfloat16_close_to_float32(tmp_path):
    model = make_hf_model("qwen3_odd_head_dim")
    directory = save_hf_model(model, tmp_path)
    cfg32, p32 = hf_io.load_checkpoint(directory)
    cfg16, p16 = hf_io.load_checkpoint(directory, dtype="bfloat16")
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    tokens, mask = left_padded_batch(cfg32.vocab_size, LENGTHS)
    l32 = np.asarray(qwen.compute_logits(p32, cfg32, tokens, mask))
    l16 = np.asarray(qwen.compute_logits(p16, cfg16, tokens, mask))
    assert np.isfinite(l16).all()
    assert _masked_max_diff(l16, l32, mask) < 0.1 * np.abs(l32).max() + 0.05


def test_paged_prefill_and_decode_equal_full_forward(tmp_path):
    """The same layer code, three ways: prefill 4 tokens into pages, decode the rest one by one, against
    one full forward. Pages are scattered (not in order) and two rows share one page pool."""
    model = make_hf_model("qwen2_gqa2_untied")
    cfg, params = hf_io.load_checkpoint(save_hf_model(model, tmp_path))
    lengths = [6, 3]
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths)
    full = np.asarray(qwen.forward(params, cfg, tokens, mask))
    page = 2
    cache = qwen.init_paged_cache(cfg, groups=1, pages_per_group=8, page_size=page)
    table = np.array([[5, 0, 3], [7, 2, 6]], np.int32)  # row r's token j -> page table[r, j // 2], offset j % 2
    positions = np.asarray(qwen.default_positions(mask))
    # prefill the first 4 columns (left padded: row 1 has one real token there); pads write nothing
    pre = slice(0, 4)
    pages = np.where(mask[:, pre] == 1, np.take_along_axis(table, positions[:, pre] // page, 1), 8)
    ctx = dict(kv_mask=mask[:, pre], write_page=pages, write_offset=positions[:, pre] % page)
    h, cache = qwen.forward_paged(params, cfg, tokens[:, pre], positions[:, pre], cache, ctx)
    hidden = [np.asarray(h)]
    for col in range(4, 6):
        pos = positions[:, col:col + 1]
        ctx = dict(write_page=np.take_along_axis(table, pos // page, 1), write_offset=pos % page, page_table=table,
                   lengths=pos[:, 0] + 1)
        h, cache = qwen.forward_paged(params, cfg, tokens[:, col:col + 1], pos, cache, ctx, paged_attention="jax")
        hidden.append(np.asarray(h))
    assert _masked_max_diff(np.concatenate(hidden, axis=1), full, mask) < 1e-5


@pytest.mark.parametrize("name", ["qwen2_gqa2_untied", "qwen3_tied_gqa4"])
def test_round_trip_through_transformers(name, tmp_path):
    model = make_hf_model(name, seed=3)
    cfg, params = hf_io.load_checkpoint(save_hf_model(model, tmp_path / "in"))
    hf_io.save_checkpoint(tmp_path / "out", params, cfg, max_shard_bytes=20_000)  # forces several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    tokens, mask = left_padded_batch(cfg.vocab_size, LENGTHS, seed=1)
    assert _masked_max_diff(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask), mask) < 1e-5
    cfg2, params2 = hf_io.load_checkpoint(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_sharded_logits_equal_one_device(mesh_shape, tmp_path):
    assert len(jax.devices()) == 8
    model = make_hf_model("qwen2_gqa4_tied")
    directory = save_hf_model(model, tmp_path)
    cfg, params = hf_io.load_checkpoint(directory)
    fsdp, tensor = mesh_shape
    mesh = make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor})
    _, sharded = hf_io.load_checkpoint(directory, mesh=mesh)
    tokens, mask = left_padded_batch(cfg.vocab_size, [9, 4, 1, 7, 3, 8, 2, 5])
    ref = np.asarray(jax.jit(lambda p: qwen.compute_logits(p, cfg, tokens, mask))(params))
    out = jax.jit(lambda p: qwen.compute_logits(p, cfg, tokens, mask, mesh=mesh))(sharded)
    assert _masked_max_diff(np.asarray(out), ref, mask) < 1e-5

    # the parameters really are laid out as the rules say
    q = sharded["layers"]["q_proj"]["kernel"]  # [L, E, H, D] = layers, embed, heads, head_dim
    assert q.sharding.spec == logical_to_spec(("layers", "embed", "heads", "head_dim"), q.shape, mesh, DEFAULT_RULES)
    assert tuple(q.sharding.spec) + (None,) * (4 - len(q.sharding.spec)) == (
        None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None)
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // fsdp, q.shape[2] // tensor, q.shape[3])
    emb = sharded["embed"]["embedding"]  # vocab 101 is prime: the tensor axis cannot split it, so it is dropped
    assert tuple(emb.sharding.spec) + (None,) * (2 - len(emb.sharding.spec)) == (None, "fsdp" if fsdp > 1 else None)
    down = sharded["layers"]["down_proj"]["kernel"]  # [L, F, E] = layers, mlp, embed
    assert down.addressable_shards[0].data.shape == (down.shape[0], down.shape[1] // tensor, down.shape[2] // fsdp)


def test_random_init_shapes_and_logical_axes():
    cfg = qwen.QwenConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=4, qk_norm=True, qkv_bias=False)
    params = qwen.init_params(cfg, jax.random.key(0))
    axes = qwen.param_logical_axes(cfg)
    jax.tree.map(lambda p, names: (len(names) == p.ndim) or pytest.fail(f"{names} vs {p.shape}"), params, axes,
                 is_leaf=lambda x: isinstance(x, tuple))
    assert sum(p.size for p in jax.tree.leaves(params)) == cfg.num_params


# --------------------------------------------------------------------------------------- bad input

def _save(tmp_path, name="qwen2_gqa2_untied"):
    return save_hf_model(make_hf_model(name), tmp_path)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_architecture_is_named(tmp_path):
    directory = _save(tmp_path)
    _edit_config(directory, architectures=["LlamaForCausalLM"])
    with pytest.raises(hf_io.CheckpointError, match=r"LlamaForCausalLM.*supported: \['Qwen2ForCausalLM', 'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM'\]"):
        hf_io.load_checkpoint(directory)


def _rewrite_weights(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_weight_is_named(tmp_path):
    directory = _save(tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf_io.CheckpointError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight'"):
        hf_io.load_checkpoint(directory)


def test_extra_weight_is_named(tmp_path):
    directory = _save(tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(hf_io.CheckpointError, match=r"unexpected weight 'model.layers.0.self_attn.q_norm.weight'"):
        hf_io.load_checkpoint(directory)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    directory = _save(tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": np.zeros((63, 32), np.float32)}))
    with pytest.raises(hf_io.CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(63, 32\), expected \(64, 32\)"):
        hf_io.load_checkpoint(directory)


def test_missing_config_key_is_named(tmp_path):
    directory = _save(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["intermediate_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_io.CheckpointError, match=r"config.json: missing key 'intermediate_size'"):
        hf_io.load_checkpoint(directory)


def test_mesh_that_does_not_divide_devices_names_sizes():
    with pytest.raises(ValueError, match=r"multiply to 6 but there are 8 devices"):
        make_mesh({"data": 1, "fsdp": 3, "tensor": 2})
    with pytest.raises(ValueError, match=r"8 devices cannot be split"):
        make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}

"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors <-> sharded JAX params.

Loading never builds the whole model on one host: each parameter is created with
``jax.make_array_from_callback``, whose callback reads from the safetensors files only the slice a
local device holds (``safe_open(...).get_slice``), layer by layer. Saving gathers one parameter at a
time and writes safetensors shards plus an index that ``transformers`` (and vLLM) load.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, check_expert_axis, make_mesh, tree_shardings

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
# MoE features of neighbouring architectures that this model does not implement: (key, value allowed)
UNSUPPORTED_MOE_KEYS = (("shared_expert_intermediate_size", (None, 0)), ("n_shared_experts", (None, 0)),
                        ("num_shared_experts", (None, 0)), ("scoring_func", (None, "softmax")),
                        ("topk_method", (None, "greedy")), ("n_group", (None, 1)),
                        ("router_jitter_noise", (None, 0, 0.0)),
                        ("hidden_act", (None, "silu")))


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked (names the file and key)."""


# ---------------------------------------------------------------------------------------------- config

def config_from_hf(hf: dict[str, Any], *, source: str = "config.json", dtype: str = "float32",
                   param_dtype: str = "float32", remat: str = "none") -> qwen.QwenConfig:
    """A QwenConfig from a Hugging Face config dict; unsupported features are errors naming the key."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: architectures={archs!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[archs[0]]

    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{source}: missing key '{key}'")
        return hf[key]

    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} (rope_parameters / rope_scaling) is not supported; only 'default'")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    moe_fields: dict[str, Any] = {}
    if family == "qwen3_moe":
        for key, allowed in UNSUPPORTED_MOE_KEYS:
            if hf.get(key) not in allowed:
                raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported by the Qwen3-MoE model "
                                      f"(allowed: {[a for a in allowed if a is not None]})")
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if experts is None:
            raise CheckpointError(f"{source}: missing key 'num_experts'")
        moe_fields = dict(num_experts=int(experts), num_experts_per_tok=int(need("num_experts_per_tok")),
                          moe_intermediate_size=int(need("moe_intermediate_size")),
                          norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                          decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
                          mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
    return qwen.QwenConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=family != "qwen2", dtype=dtype, param_dtype=param_dtype, remat=remat, **moe_fields)


def config_to_hf(cfg: qwen.QwenConfig) -> dict[str, Any]:
    """The transformers config dict for a QwenConfig (Qwen2 layout when there is no q/k norm)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta)
    if cfg.num_experts:
        hf = transformers.Qwen3MoeConfig(
            head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers), **common)
        hf.architectures = ["Qwen3MoeForCausalLM"]
    elif cfg.qk_norm:
        hf = transformers.Qwen3Config(head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, **common)
        hf.architectures = ["Qwen3ForCausalLM"]
    else:
        if not cfg.qkv_bias or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise CheckpointError("a Qwen2 checkpoint needs q/k/v bias and head_dim = hidden_size / num_heads")
        hf = transformers.Qwen2Config(**common)
        hf.architectures = ["Qwen2ForCausalLM"]
    hf.dtype = cfg.param_dtype
    return hf.to_dict()


# ------------------------------------------------------------------------------------ weight mapping
# Each of our leaves maps to one HF tensor (per layer, and per expert, for stacked leaves) through a
# layout `kind`: copy: same layout; T: transposed matrix; in_heads: ours [E, N, D] = hf [N*D, E]^T;
# out_heads: ours [N, D, E] = hf [E, N*D]^T; heads_bias: ours [N, D] = hf [N*D].
# A leaf of a layer stack [L, ...] names HF tensors by "{layer}" (first_layer + its index); a MoE
# expert leaf [L, X, ...] also by "{expert}": the hub's per-expert layout, stacked on load.


class WeightSpec(NamedTuple):
    """Where one of our leaves lives in the HF checkpoint (see the comment above)."""

    template: str
    kind: str
    first_layer: int = 0

    @property
    def stacked(self) -> int:
        """How many leading axes of our leaf index HF tensors (0, 1 = layers, 2 = layers x experts)."""
        return ("{layer}" in self.template) + ("{expert}" in self.template)

    def names(self, shape: tuple[int, ...]) -> dict[tuple[int, ...], str]:
        """Our leading index -> HF tensor name, for a leaf of `shape`."""
        if self.stacked == 0:
            return {(): self.template}
        if self.stacked == 1:
            return {(i,): self.template.format(layer=self.first_layer + i) for i in range(shape[0])}
        return {(i, x): self.template.format(layer=self.first_layer + i, expert=x)
                for i in range(shape[0]) for x in range(shape[1])}


def _weight_map(cfg: qwen.QwenConfig) -> dict[tuple[str, ...], WeightSpec]:
    layer = "model.layers.{layer}."
    table = {
        ("embed", "embedding"): WeightSpec("model.embed_tokens.weight", "copy"),
        ("final_norm", "scale"): WeightSpec("model.norm.weight", "copy"),
    }
    for stack, first, _, sparse in cfg.layer_segments:
        per_layer = {
            ("input_norm", "scale"): ("input_layernorm.weight", "copy"),
            ("post_attention_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
            ("o_proj", "kernel"): ("self_attn.o_proj.weight", "out_heads"),
        }
        if sparse:
            per_layer.update({
                ("mlp", "router"): ("mlp.gate.weight", "T"),
                ("mlp", "gate_proj"): ("mlp.experts.{expert}.gate_proj.weight", "T"),
                ("mlp", "up_proj"): ("mlp.experts.{expert}.up_proj.weight", "T"),
                ("mlp", "down_proj"): ("mlp.experts.{expert}.down_proj.weight", "T"),
            })
        else:
            for p in ("gate", "up", "down"):
                per_layer[(f"{p}_proj", "kernel")] = (f"mlp.{p}_proj.weight", "T")
        for p in ("q", "k", "v"):
            per_layer[(f"{p}_proj", "kernel")] = (f"self_attn.{p}_proj.weight", "in_heads")
            if cfg.qkv_bias:
                per_layer[(f"{p}_proj", "bias")] = (f"self_attn.{p}_proj.bias", "heads_bias")
        if cfg.qk_norm:
            per_layer[("q_norm", "scale")] = ("self_attn.q_norm.weight", "copy")
            per_layer[("k_norm", "scale")] = ("self_attn.k_norm.weight", "copy")
        table.update({(stack,) + path: WeightSpec(layer + name, kind, first)
                      for path, (name, kind) in per_layer.items()})
    if not cfg.tie_word_embeddings:
        table[("lm_head",)] = WeightSpec("lm_head.weight", "T")
    return table


def _where(name: str) -> str:
    """' (layer 3, expert 5)' for a per-expert HF tensor name, '' otherwise."""
    parts = name.split(".")
    if "experts" not in parts:
        return ""
    found = [f"{word} {parts[i + 1]}" for i, word in enumerate(parts[:-1])
             if word in ("layers", "experts") and parts[i + 1].isdigit()]
    return f" ({', '.join(found).replace('layers', 'layer').replace('experts', 'expert')})" if found else ""


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return ours
    if kind == "T":
        return ours[::-1]
    if kind == "in_heads":
        e, n, d = ours
        return (n * d, e)
    if kind == "out_heads":
        n, d, e = ours
        return (e, n * d)
    if kind == "heads_bias":
        return (ours[0] * ours[1],)
    raise AssertionError(kind)


def _bounds(sl: slice, size: int) -> tuple[int, int]:
    start, stop, step = sl.indices(size)
    assert step == 1
    return start, stop


def _read_block(get_slice: Callable[[tuple[slice, ...]], np.ndarray], kind: str, index: tuple[slice, ...],
                shape: tuple[int, ...]) -> np.ndarray:
    """Our block `index` of a leaf of `shape`, read from the HF tensor through `get_slice`."""
    b = [_bounds(sl, n) for sl, n in zip(index, shape)]
    s = [slice(lo, hi) for lo, hi in b]
    if kind == "copy":
        return get_slice(tuple(s))
    if kind == "T":
        return get_slice((s[1], s[0])).T
    if kind == "in_heads":
        (e0, e1), (n0, n1), (d0, d1) = b
        d = shape[2]
        block = get_slice((slice(n0 * d, n1 * d), s[0])).T.reshape(e1 - e0, n1 - n0, d)
        return block[:, :, d0:d1]
    if kind == "out_heads":
        (n0, n1), (d0, d1), (e0, e1) = b
        d = shape[1]
        block = get_slice((s[2], slice(n0 * d, n1 * d))).T.reshape(n1 - n0, d, e1 - e0)
        return block[:, d0:d1, :]
    if kind == "heads_bias":
        (n0, n1), (d0, d1) = b
        d = shape[1]
        return get_slice((slice(n0 * d, n1 * d),)).reshape(n1 - n0, d)[:, d0:d1]
    raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "T":
        return np.ascontiguousarray(x.T)
    if kind == "in_heads":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "out_heads":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    if kind == "heads_bias":
        return x.reshape(-1)
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------- loading

class _SafetensorsIndex:
    """Which file holds each tensor, with headers read once and files opened lazily."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
        self._handles: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise CheckpointError(f"{index}: lists '{name}', which does not exist in {directory}")
            handle = self._open(name)
            for key in handle.keys():
                self.file_of[key] = name
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        for key, name in weight_map.items():
            if self.file_of.get(key) != name:
                raise CheckpointError(f"{index}: tensor '{key}' is mapped to '{name}' but that file does not hold it")

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.directory / name), framework="numpy")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{self.directory / name}: cannot read safetensors ({err})") from None
        return self._handles[name]

    def slice_reader(self, key: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
        handle = self._open(self.file_of[key])
        return lambda index: np.asarray(handle.get_slice(key)[index])


def _flatten_paths(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def load_params(directory: str | os.PathLike, cfg: qwen.QwenConfig, mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> qwen.Params:
    """Read safetensors weights straight into (sharded) device arrays of cfg.param_dtype."""
    directory = pathlib.Path(directory)
    index = _SafetensorsIndex(directory)
    shapes = qwen.param_shapes(cfg)
    wmap = _weight_map(cfg)
    ours = _flatten_paths(shapes)
    if set(ours) != set(wmap):  # a bug in this module, not in the checkpoint
        raise AssertionError(f"weight map mismatch: {set(ours) ^ set(wmap)}")

    expected: dict[str, tuple[int, ...]] = {}
    for path, spec in wmap.items():
        shape = ours[path].shape
        for name in spec.names(shape).values():
            expected[name] = _hf_shape(spec.kind, shape[spec.stacked:])
    present = set(index.shapes)
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied head too; it is the embedding
    missing = sorted(set(expected) - present)
    extra = sorted(k for k in present - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{directory}: missing weight '{missing[0]}'{_where(missing[0])}, expected shape "
                              f"{expected[missing[0]]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{directory}: unexpected weight '{extra[0]}' in {index.file_of[extra[0]]}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + " for this architecture")
    for key, shape in expected.items():
        if index.shapes[key] != shape:
            raise CheckpointError(f"{directory}/{index.file_of[key]}: weight '{key}'{_where(key)} has shape "
                                  f"{index.shapes[key]}, expected {shape}")

    if mesh is None:
        mesh = make_mesh({}, jax.devices()[:1])
    try:
        check_expert_axis(cfg.num_experts, mesh.shape.get("expert", 1))
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from None
    shardings = _flatten_paths(tree_shardings(qwen.param_logical_axes(cfg), jax.tree.map(lambda s: s.shape, shapes), mesh, rules))
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(np.float32)

    def load_leaf(path: tuple[str, ...]) -> jax.Array:
        spec = wmap[path]
        shape = ours[path].shape
        names = spec.names(shape)
        n = spec.stacked

        def callback(index_: tuple[slice, ...]) -> np.ndarray:
            ranges = [range(*_bounds(sl, size)) for sl, size in zip(index_[:n], shape[:n])]
            lead = [len(r) for r in ranges]
            blocks = [_read_block(index.slice_reader(names[key]), spec.kind, index_[n:], shape[n:]).astype(dtype)
                      for key in itertools.product(*ranges)]
            return np.stack(blocks).reshape(lead + list(blocks[0].shape)) if n else blocks[0]

        return jax.make_array_from_callback(shape, shardings[path], callback)

    flat = {path: load_leaf(path) for path in ours}
    treedef = jax.tree.structure(shapes)
    return jax.tree.unflatten(treedef, [flat[_p] for _p in _flatten_paths(shapes)])


def load_checkpoint(directory: str | os.PathLike, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, *,
                    dtype: str = "float32", param_dtype: str | None = None, remat: str = "none") -> tuple[qwen.QwenConfig, qwen.Params]:
    """(config, params) from a Hugging Face checkpoint directory (config.json + safetensors)."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: not found (is {directory} a Hugging Face checkpoint directory?)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    cfg = config_from_hf(hf, source=str(config_path), dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
    return cfg, load_params(directory, cfg, mesh, rules)


# -------------------------------------------------------------------------------------------- saving

def _host_array(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_checkpoint(directory: str | os.PathLike, params: qwen.Params, cfg: qwen.QwenConfig, tokenizer: Any = None,
                    *, dtype: str | None = None, max_shard_bytes: int = 4 * 1024**3) -> None:
    """Write params as HF safetensors (sharded with an index past max_shard_bytes) + config.json.

    Every process must call it (gathering is collective on several hosts); only process 0 writes.
    """
    directory = pathlib.Path(directory)
    out_dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or cfg.param_dtype) == "bfloat16" else np.dtype(np.float32)
    write = jax.process_index() == 0
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    flat = _flatten_paths(params)
    for path, spec in _weight_map(cfg).items():
        full = _host_array(flat[path]).astype(out_dtype)
        tensors = {name: _to_hf(spec.kind, full[key]) for key, name in spec.names(full.shape).items()}
        for name, tensor in tensors.items():
            if size and size + tensor.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
    if not write:
        return
    directory.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.nbytes for shard in shards for t in shard.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = config_to_hf(cfg)
    hf["dtype"] = "bfloat16" if out_dtype == np.dtype(ml_dtypes.bfloat16) else "float32"
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer and chat template through transformers.AutoTokenizer."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)


__all__ = ["CheckpointError", "SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "load_params",
           "load_checkpoint", "save_checkpoint", "load_tokenizer"]

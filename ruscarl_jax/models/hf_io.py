"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors <-> sharded JAX params.

Loading never builds the whole model on one host: each parameter is created with
``jax.make_array_from_callback``, whose callback reads from the safetensors files only the slice a
local device holds (``safe_open(...).get_slice``), layer by layer. Saving gathers one parameter at a
time and writes safetensors shards plus an index that ``transformers`` (and vLLM) load.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, tree_shardings

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


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
    return qwen.QwenConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads), rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3", dtype=dtype, param_dtype=param_dtype, remat=remat)


def config_to_hf(cfg: qwen.QwenConfig) -> dict[str, Any]:
    """The transformers config dict for a QwenConfig (Qwen2 layout when there is no q/k norm)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta)
    if cfg.qk_norm:
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
# Each of our leaves maps to one HF tensor (per layer for stacked leaves) through a layout `kind`:
#   copy: same layout; T: transposed matrix; in_heads: ours [E, N, D] = hf [N*D, E]^T;
#   out_heads: ours [N, D, E] = hf [E, N*D]^T; heads_bias: ours [N, D] = hf [N*D].

def _weight_map(cfg: qwen.QwenConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    layer = "model.layers.{}."
    table = {
        ("embed", "embedding"): ("model.embed_tokens.weight", "copy"),
        ("final_norm", "scale"): ("model.norm.weight", "copy"),
        ("layers", "input_norm", "scale"): (layer + "input_layernorm.weight", "copy"),
        ("layers", "post_attention_norm", "scale"): (layer + "post_attention_layernorm.weight", "copy"),
        ("layers", "o_proj", "kernel"): (layer + "self_attn.o_proj.weight", "out_heads"),
        ("layers", "gate_proj", "kernel"): (layer + "mlp.gate_proj.weight", "T"),
        ("layers", "up_proj", "kernel"): (layer + "mlp.up_proj.weight", "T"),
        ("layers", "down_proj", "kernel"): (layer + "mlp.down_proj.weight", "T"),
    }
    for p in ("q", "k", "v"):
        table[("layers", f"{p}_proj", "kernel")] = (layer + f"self_attn.{p}_proj.weight", "in_heads")
        if cfg.qkv_bias:
            table[("layers", f"{p}_proj", "bias")] = (layer + f"self_attn.{p}_proj.bias", "heads_bias")
    if cfg.qk_norm:
        table[("layers", "q_norm", "scale")] = (layer + "self_attn.q_norm.weight", "copy")
        table[("layers", "k_norm", "scale")] = (layer + "self_attn.k_norm.weight", "copy")
    if not cfg.tie_word_embeddings:
        table[("lm_head",)] = ("lm_head.weight", "T")
    return table


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
    for path, (template, kind) in wmap.items():
        shape = ours[path].shape
        if path[0] == "layers":
            for i in range(cfg.num_layers):
                expected[template.format(i)] = _hf_shape(kind, shape[1:])
        else:
            expected[template] = _hf_shape(kind, shape)
    present = set(index.shapes)
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied head too; it is the embedding
    missing = sorted(set(expected) - present)
    extra = sorted(k for k in present - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{directory}: missing weight '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{directory}: unexpected weight '{extra[0]}' in {index.file_of[extra[0]]}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + " for this architecture")
    for key, shape in expected.items():
        if index.shapes[key] != shape:
            raise CheckpointError(f"{directory}/{index.file_of[key]}: weight '{key}' has shape {index.shapes[key]}, expected {shape}")

    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = _flatten_paths(tree_shardings(qwen.param_logical_axes(cfg), jax.tree.map(lambda s: s.shape, shapes), mesh, rules))
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(np.float32)

    def load_leaf(path: tuple[str, ...]) -> jax.Array:
        template, kind = wmap[path]
        shape = ours[path].shape

        def callback(index_: tuple[slice, ...]) -> np.ndarray:
            if path[0] != "layers":
                return _read_block(index.slice_reader(template), kind, index_, shape).astype(dtype)
            lo, hi = _bounds(index_[0], shape[0])
            return np.stack([_read_block(index.slice_reader(template.format(i)), kind, index_[1:], shape[1:]).astype(dtype)
                             for i in range(lo, hi)])

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
    for path, (template, kind) in _weight_map(cfg).items():
        full = _host_array(flat[path]).astype(out_dtype)
        tensors = ({template.format(i): _to_hf(kind, full[i]) for i in range(cfg.num_layers)} if path[0] == "layers"
                   else {template: _to_hf(kind, full)})
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

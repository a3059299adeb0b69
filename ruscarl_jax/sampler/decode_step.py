"""One decode step of a Qwen decoder over the sampler's static KV cache, on the training params.

Why the sampler has its own single-token step instead of calling ``qwen.forward_cached`` per token:
the model's scanned layers take the cache as scan input and return it as scan output, so every step
rebuilds (copies) the whole [L, N, S, KVH, D] cache, and its attention einsum transposes each
layer's keys and values; per token that is several full passes over the cache. Here the cache is
carried through the layer scan and only the new token's key / value are written in place, and the
cache is laid out [L, N, KVH, S, D] (logical axes ``DECODE_CACHE_AXES``: batch over data / fsdp,
KV heads over tensor where divisible) so attention reads it as stored. The arithmetic is the
model's own, layer for layer (RMSNorm in float32, q/k norm for Qwen3, RoPE from ``qwen.rope``,
grouped-query attention, SwiGLU or, in Qwen3-MoE sparse layers, ``moe.sparse_mlp``), in ``cfg.dtype``
with float32 softmax and logits; the tests check it against transformers and against the model's full
forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ruscarl_jax.models import moe, qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, constrain

DECODE_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


def _norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


def _proj(x: jax.Array, p: dict, equation: str, dtype) -> jax.Array:
    y = jnp.einsum(equation, x.astype(dtype), p["kernel"].astype(dtype))
    return y + p["bias"].astype(dtype) if "bias" in p else y


def from_prompt_cache(prompt_cache: qwen.Cache, length: int, mesh: Mesh | None = None,
                      rules: Rules = DEFAULT_RULES) -> qwen.Cache:
    """A decode cache of `length` slots whose first P slots hold a model-layout [L, N, P, KVH, D] cache."""
    def convert(buf: jax.Array) -> jax.Array:
        buf = jnp.swapaxes(buf, 2, 3)
        buf = jnp.pad(buf, ((0, 0), (0, 0), (0, 0), (0, length - buf.shape[3]), (0, 0)))
        return constrain(buf, DECODE_CACHE_AXES, mesh, rules)

    return {name: convert(buf) for name, buf in prompt_cache.items()}


def decode_step(params: qwen.Params, cfg: qwen.QwenConfig, tokens: jax.Array, positions: jax.Array, cache: qwen.Cache,
                kv_mask: jax.Array, slot: jax.Array, *, mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> tuple[jax.Array, qwen.Cache]:
    """Feed tokens [N] at RoPE positions [N] into cache slot `slot`; float32 next-token logits [N, V].

    kv_mask [N, S] marks the valid slots, `slot` included; the token attends to valid slots <= slot.
    """
    dtype = jnp.dtype(cfg.dtype)
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n, s = kv_mask.shape
    allowed = (kv_mask.astype(bool) & (jnp.arange(s) <= slot)[None, :])[:, None, None, :]
    pos = positions[:, None]
    x = params["embed"]["embedding"].astype(dtype)[tokens][:, None, :]  # [N, 1, E]
    x = constrain(x, ("batch", "length", "act_embed"), mesh, rules)

    def layer(carry, lp, sparse):
        x, keys, values, i = carry
        y = _norm(x, lp["input_norm"]["scale"], cfg.rms_norm_eps, dtype)
        q = _proj(y, lp["q_proj"], "nte,ehd->nthd", dtype)
        kk = _proj(y, lp["k_proj"], "nte,ehd->nthd", dtype)
        v = _proj(y, lp["v_proj"], "nte,ehd->nthd", dtype)
        if cfg.qk_norm:
            q = _norm(q, lp["q_norm"]["scale"], cfg.rms_norm_eps, dtype)
            kk = _norm(kk, lp["k_norm"]["scale"], cfg.rms_norm_eps, dtype)
        q = qwen.rope(q, pos, cfg.rope_theta)
        kk = qwen.rope(kk, pos, cfg.rope_theta)
        # write the new key / value at [layer i, :, :, slot], in place in the carried cache
        keys = jax.lax.dynamic_update_slice(keys, jnp.swapaxes(kk, 1, 2)[None].astype(keys.dtype), (i, 0, 0, slot, 0))
        values = jax.lax.dynamic_update_slice(values, jnp.swapaxes(v, 1, 2)[None].astype(values.dtype), (i, 0, 0, slot, 0))
        layer_k = jax.lax.dynamic_index_in_dim(keys, i, keepdims=False).astype(dtype)  # [N, KVH, S, D]
        layer_v = jax.lax.dynamic_index_in_dim(values, i, keepdims=False).astype(dtype)
        qg = q.reshape(n, k, h // k, d)
        scores = jnp.einsum("nkgd,nksd->nkgs", qg, layer_k).astype(jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attn = jnp.einsum("nkgs,nksd->nkgd", probs, layer_v).reshape(n, 1, h * d)
        o_kernel = lp["o_proj"]["kernel"].reshape(h * d, cfg.hidden_size)  # [H, D, E] as one matrix, no transpose
        x = x + jnp.einsum("ntf,fe->nte", attn, o_kernel.astype(dtype))
        x = constrain(x, ("batch", "length", "act_embed"), mesh, rules)
        y = _norm(x, lp["post_attention_norm"]["scale"], cfg.rms_norm_eps, dtype)
        if sparse:  # Qwen3-MoE layer: the model's own sparse MLP
            x = x + moe.sparse_mlp(lp["mlp"], y, cfg, mesh=mesh, rules=rules)[0]
            return (constrain(x, ("batch", "length", "act_embed"), mesh, rules), keys, values, i + 1), None
        gate = _proj(y, lp["gate_proj"], "nte,ef->ntf", dtype)
        up = _proj(y, lp["up_proj"], "nte,ef->ntf", dtype)
        mlp = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"), mesh, rules)
        x = x + _proj(mlp, lp["down_proj"], "ntf,fe->nte", dtype)
        x = constrain(x, ("batch", "length", "act_embed"), mesh, rules)
        return (x, keys, values, i + 1), None

    carry = (x, cache["k"], cache["v"], jnp.int32(0))
    for name, _, _, sparse in cfg.layer_segments:  # one scan per run of same-kind layers (see qwen.py)
        carry, _ = jax.lax.scan(lambda c, lp, sparse=sparse: layer(c, lp, sparse), carry, params[name])
    x, keys, values, _ = carry
    x = _norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, dtype)[:, 0]
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("ne,ve->nv", x, params["embed"]["embedding"].astype(dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("ne,ev->nv", x, params["lm_head"].astype(dtype), preferred_element_type=jnp.float32)
    cache = {"k": constrain(keys, DECODE_CACHE_AXES, mesh, rules), "v": constrain(values, DECODE_CACHE_AXES, mesh, rules)}
    return constrain(logits, ("batch", "vocab"), mesh, rules), cache

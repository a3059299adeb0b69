"""Attention of the decoder layer: dense (training forward, prefill) and over a paged KV cache (decode).

The layer (``qwen.Block``) computes q / k / v once and hands them here; what it attends to depends on
the context it is given:

* dense: the chunk's own keys, causal and key-masked, through ``jax.nn.dot_product_attention``
  (implementation "xla"; "cudnn" flash attention on a GPU where it applies, with "auto").
* prefill: as dense, and the keys / values are also written into the paged cache.
* decode: one new token per slot is written into the paged cache, then the slot attends to its
  pages: a pure-JAX gather + the same dense attention (runs everywhere), or the Pallas
  paged-attention kernel where the target platform has one that fits (TPU: Mosaic; GPU: Triton).
  The engine runs decode inside ``shard_map`` over its data-parallel shards, so each shard sees a
  cache of one page group and the kernel reads only that shard's pages.

Paged cache layout, per key and value: ``[L, G, KVH, pages_per_group, page_size, D]``. G page groups,
one per data-parallel shard of the rollout mesh (sampler/engine.py splits the cache over its devices on
this axis and runs decode under ``shard_map``, so a slot's reads and writes stay on its device). A
slot's page table lists its pages in sequence order; token j of a sequence lives at page
``table[j // page_size]``, offset ``j % page_size``. Writes to page index ``pages_per_group`` (out of
bounds) are dropped: that is how padding and idle slots write nothing.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DENSE_IMPLS = ("auto", "xla", "cudnn")
PAGED_IMPLS = ("auto", "jax", "pallas")

Context = dict[str, Any]


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "auto",
          platform: str | None = None) -> jax.Array:
    """q [B, T, H, D], k / v [B, S, KVH, D], boolean mask [B, T, S] (True = may attend) -> [B, T, H, D].

    Grouped-query attention with a float32 softmax. "auto" takes cuDNN flash attention on a GPU for
    16-bit inputs and falls back to XLA where cuDNN does not apply. `platform` is the target's
    (``sharding.platform``), not the host's."""
    if impl in ("auto", "cudnn") and (platform or jax.default_backend()) == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if impl == "cudnn":
                raise
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def _groups(pool: jax.Array, batch: int) -> jax.Array:
    """The page group of each of `batch` slots, [batch, 1]: slot b belongs to group b // (batch / G)."""
    return (jnp.arange(batch) // (batch // pool.shape[1]))[:, None]


def write_pages(pool: jax.Array, layer: jax.Array, new: jax.Array, pages: jax.Array, offsets: jax.Array) -> jax.Array:
    """Write new [B, T, KVH, D] at (pages, offsets) [B, T] of layer `layer`, in place (one scatter)."""
    return pool.at[layer, _groups(pool, pages.shape[0]), :, pages, offsets].set(new.astype(pool.dtype), mode="drop")


def _gather_pages(pool: jax.Array, layer: jax.Array, table: jax.Array) -> jax.Array:
    """The keys (or values) of each slot's pages: [B, W * page_size, KVH, D] from a table [B, W] (one gather)."""
    b, w = table.shape
    got = pool[layer, _groups(pool, b), :, table]  # [B, W, KVH, PS, D]
    return jnp.swapaxes(got, 2, 3).reshape(b, w * got.shape[3], got.shape[2], got.shape[4])


def pallas_misfit(platform: str, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> str | None:
    """Why the platform's Pallas paged-attention kernel cannot serve this model / page layout, or None if it
    can. TPU (Mosaic): every block's last dimension is the head dimension, which must be a multiple of 128
    (checked against the TPU compiler for v5e, v5p and v6e in tests/test_engine.py); any page size. GPU
    (Triton): power-of-two head dimension and page size, at least 16 keys per block. CPU has none."""
    if num_heads % num_kv_heads:
        return f"{num_heads} query heads do not split over {num_kv_heads} KV heads"
    if platform == "tpu":
        return None if head_dim % 128 == 0 else f"the TPU kernel needs head_dim % 128 == 0, the model has {head_dim}"
    if platform == "gpu":
        pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
        if not (pow2(head_dim) and head_dim >= 16 and pow2(page_size)):
            return f"the GPU kernel needs a power-of-two head_dim >= 16 and page size (have {head_dim}, {page_size})"
        return None
    return f"no Pallas paged-attention kernel for platform {platform!r} (use 'jax' or 'auto')"


def _block(width: int, page_size: int, cap: int = 8) -> int:
    """Pages per compute block: the largest power of two <= cap (and <= 512 tokens) dividing the table width."""
    return max(d for d in (16, 8, 4, 2, 1) if d <= cap and d * page_size <= max(512, page_size) and width % d == 0)


def _pallas_paged(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array, table: jax.Array,
                  lengths: jax.Array, platform: str | None = None, interpret: bool = False) -> jax.Array | None:
    """The backend's Pallas paged-attention kernel, q [B, H, D] -> [B, H, D], or None where there is none
    (CPU; a misfit shape, see `pallas_misfit`; a cache of several page groups, i.e. outside the engine's
    shard_map). The kernels take unscaled logits, so q is scaled here; it is cast to the cache's dtype.
    Idle slots (length 0) attend to one (ignored) token. `interpret` runs the GPU kernel in the Pallas
    interpreter (tests on CPU)."""
    backend = platform or jax.default_backend()
    if k_pool.shape[1] != 1 or pallas_misfit(backend, q.shape[1], k_pool.shape[2], q.shape[-1], k_pool.shape[4]):
        return None
    k_pages, v_pages = k_pool[layer, 0], v_pool[layer, 0]  # [KVH, NP, PS, D]
    q = (q * q.shape[-1] ** -0.5).astype(k_pages.dtype)
    w, page_size = table.shape[1], k_pages.shape[2]
    if backend == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        return paged_attention(q, k_pages, v_pages, jnp.maximum(lengths, 1), table,
                               pages_per_compute_block=_block(w, page_size))
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    splits = max(d for d in (16, 8, 4, 2, 1) if w % d == 0)
    block = max(d for d in (8, 4, 2, 1) if (w // splits) % d == 0 and (d * page_size >= 16 or d == w // splits))
    return paged_attention(q, k_pages, v_pages, table, jnp.maximum(lengths, 1), pages_per_compute_block=block,
                           k_splits=splits, interpret=interpret)


def paged_decode(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array, table: jax.Array,
                 lengths: jax.Array, impl: str = "auto", dense_impl: str = "auto",
                 platform: str | None = None) -> jax.Array:
    """One query per slot, q [B, 1, H, D], over the first lengths[b] tokens of its pages -> [B, 1, H, D].
    "pallas" raises where the kernel cannot run (the engine checks this when it plans, before compiling)."""
    platform = platform or jax.default_backend()
    if impl in ("auto", "pallas"):
        out = _pallas_paged(q[:, 0], k_pool, v_pool, layer, table, lengths, platform)
        if out is not None:
            return out[:, None].astype(q.dtype)
        if impl == "pallas":
            why = (pallas_misfit(platform, q.shape[2], k_pool.shape[2], q.shape[-1], k_pool.shape[4])
                   or f"a cache of {k_pool.shape[1]} page groups (the kernel runs inside the engine's shard_map)")
            raise ValueError(f"rollout.engine.attention='pallas': {why}")
    keys = _gather_pages(k_pool, layer, table).astype(q.dtype)
    values = _gather_pages(v_pool, layer, table).astype(q.dtype)
    mask = (jnp.arange(keys.shape[1])[None, :] < lengths[:, None])[:, None, :]
    return dense(q, keys, values, mask, dense_impl, platform)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context, kv: dict | None, dense_impl: str = "auto",
           paged_impl: str = "auto", platform: str | None = None) -> tuple[jax.Array, dict | None]:
    """The layer's attention for its context (see the module docstring); returns (out, updated cache).
    `platform` picks the kernels (``sharding.platform`` of the layer's mesh)."""
    if kv is not None:  # prefill or decode: store this chunk's keys and values first
        layer = kv["layer"]
        kv = dict(kv, k=write_pages(kv["k"], layer, k, ctx["write_page"], ctx["write_offset"]),
                  v=write_pages(kv["v"], layer, v, ctx["write_page"], ctx["write_offset"]))
    if "page_table" in ctx:
        out = paged_decode(q, kv["k"], kv["v"], kv["layer"], ctx["page_table"], ctx["lengths"], paged_impl, dense_impl,
                           platform)
    else:
        t = q.shape[1]
        mask = ctx["kv_mask"][:, None, :].astype(bool) & (jnp.arange(t)[None, :, None] >= jnp.arange(t)[None, None, :])
        out = dense(q, k, v, mask, dense_impl, platform)
    if kv is not None:
        kv = dict(kv, layer=kv["layer"] + 1)
    return out, kv

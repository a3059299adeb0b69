"""Attention of the decoder layer: dense (training forward, prefill) and over a paged KV cache (decode).

The layer (``qwen.Block``) computes q / k / v once and hands them here; what it attends to depends on
the context it is given:

* full sequence (training forward, log-prob pass, prefill): the chunk's own keys, causal within each
  segment (``segment_causal``). Segment ids say which tokens may see each other: 0 for padding, one id
  per packed sequence; without them the key mask is the segment (0 padding, 1 real). The fused kernel
  of the target platform computes it with no [T, T] buffer: splash attention (Pallas / Mosaic) on TPU,
  cuDNN flash attention on GPU; CPU takes the XLA reference (``dense`` with the explicit mask).
* prefill: as the full sequence, and the keys / values are also written into the paged cache.
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

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, logical_to_spec

PAGED_CACHE_AXES = ("layers", "batch", "kv_heads", None, None, "head_dim")
DENSE_IMPLS = ("auto", "xla", "cudnn", "splash")
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


SPLASH_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the (padded) sequence


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> boolean [B, T, T]: query t may see key s <= t of its own segment."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None]


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, interpret: bool = False) -> jax.Array:
    """Splash attention (JAX's Pallas TPU kernel) on one device's shard: q [B, T, H, D], k / v [B, T, KVH, D],
    segment ids [B, T] -> [B, T, H, D]. The multi-query kernel runs once per KV head over its query group
    (GQA without repeating keys). T is padded to a multiple of 128 with segment -1 (seen by nothing real)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    kvh = k.shape[2]
    pad = -t % 128
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    tp = t + pad
    block = next(s for s in SPLASH_BLOCKS if tp % s == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp))] * (h // kvh))
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    qg = (q * d ** -0.5).reshape(b, tp, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, T, D]
    segment_ids = segment_ids.astype(jnp.int32)

    def one_row(qr, kr, vr, seg):
        ids = sk.SegmentIds(seg, seg)
        return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kg, vg, segment_ids)  # [B, KVH, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t].astype(q.dtype)


def _per_device(fn, q: jax.Array, k: jax.Array, segment_ids: jax.Array, mesh: Mesh | None, rules: Rules):
    """`fn` as a shard_map over the mesh (rows over the batch axes, heads over tensor when the KV heads
    split the same way), so a Pallas kernel sees one device's shard; unchanged without a mesh."""
    if mesh is None or mesh.size == 1:
        return fn
    q_spec = logical_to_spec(("batch", "length", "heads", None), q.shape, mesh, rules)
    k_spec = logical_to_spec(("batch", "length", "kv_heads", None), k.shape, mesh, rules)
    q_spec, k_spec = (tuple(s) + (None,) * (4 - len(s)) for s in (q_spec, k_spec))
    if q_spec[2] != k_spec[2]:  # heads split but not KV heads (or not alike): keep the heads whole
        q_spec, k_spec = q_spec[:2] + (None, None), k_spec[:2] + (None, None)
    rows = q_spec[0]
    return jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(*q_spec), PartitionSpec(*k_spec),
                                                  PartitionSpec(*k_spec), PartitionSpec(rows, None)),
                         out_specs=PartitionSpec(*q_spec), check_vma=False)


def segment_causal(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str = "auto",
                   platform: str | None = None, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                   interpret: bool = False) -> jax.Array:
    """Causal self-attention within segments: q [B, T, H, D], k / v [B, T, KVH, D], segment ids [B, T]
    (int; 0 = padding, which sees only padding) -> [B, T, H, D].

    "auto": splash attention on TPU (Mosaic kernel, per device through shard_map), cuDNN flash attention on a
    GPU for 16-bit inputs, the XLA reference elsewhere; "splash" forces the kernel (on CPU through the Pallas
    interpreter with `interpret`), "xla" the reference. All give the same numbers (float32 softmax)."""
    platform = platform or jax.default_backend()
    if impl == "splash" or (impl == "auto" and platform == "tpu"):
        fn = functools.partial(_splash, interpret=interpret or platform != "tpu")
        return _per_device(fn, q, k, segment_ids, mesh, rules)(q, k, v, segment_ids)
    if impl in ("auto", "cudnn") and platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN's flash attention takes the causal structure itself and the segments as a key mask
            same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            if impl == "cudnn":
                raise
    return dense(q, k, v, segment_mask(segment_ids), "xla", platform)


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
           paged_impl: str = "auto", platform: str | None = None, mesh: Mesh | None = None,
           rules: Rules = DEFAULT_RULES) -> tuple[jax.Array, dict | None]:
    """The layer's attention for its context (see the module docstring); returns (out, updated cache).
    `platform` picks the kernels (``sharding.platform`` of the layer's mesh); with a mesh the fused
    full-sequence kernel runs per device (``shard_map`` over the batch and head shards)."""
    if kv is not None:  # prefill or decode: store this chunk's keys and values first
        layer = kv["layer"]
        kv = dict(kv, k=write_pages(kv["k"], layer, k, ctx["write_page"], ctx["write_offset"]),
                  v=write_pages(kv["v"], layer, v, ctx["write_page"], ctx["write_offset"]))
    if "page_table" in ctx:
        out = paged_decode(q, kv["k"], kv["v"], kv["layer"], ctx["page_table"], ctx["lengths"], paged_impl, dense_impl,
                           platform)
    else:
        segments = ctx.get("segment_ids")
        segments = ctx["kv_mask"] if segments is None else segments
        out = segment_causal(q, k, v, segments, dense_impl, platform, mesh, rules)
    if kv is not None:
        kv = dict(kv, layer=kv["layer"] + 1)
    return out, kv

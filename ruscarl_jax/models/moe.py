"""The Qwen3-MoE sparse MLP: a top-k softmax router and SwiGLU experts as one grouped matmul.

Maths (transformers' ``Qwen3MoeSparseMoeBlock``): router logits ``y @ W_r`` [tokens, X], a float32
softmax over the X experts, the top ``num_experts_per_tok`` probabilities (renormalised to sum to 1
when ``norm_topk_prob``), and out = sum_k w_k * down_k(silu(gate_k(y)) * up_k(y)).

Expert compute: the (token, slot) assignments are sorted by expert and run through one grouped
matmul per projection (the expert weights stacked [X, ...]), ``grouped_matmul``: the maintained
Pallas kernel ``jax.experimental.pallas.ops.tpu.megablox.gmm`` on TPU, ``jax.lax.ragged_dot`` on GPU,
and on CPU (where XLA lowers ragged_dot to a dense masked product over every group) fixed-size row
blocks of one expert each. There is no Python loop over experts and no dense all-experts product.

Expert parallelism: with a mesh, the grouped matmuls run under ``shard_map``. Each device holds
X / |expert| experts (and, where it divides, a slice of moe_intermediate_size over ``tensor``), sees
the tokens of its batch shard, computes the assignments that fall on its experts, and a psum over the
expert (and tensor) axes adds the partial outputs. Tokens are not exchanged (no all-to-all): the
rows of an expert group are all-gathered into the block and the outputs reduce-scattered back when the
rules split the batch over ``expert`` too; otherwise the batch is replicated over the expert axis and
the outputs psum-ed. A dispatch by ragged all-to-all, which
sends each token only to its experts' devices, is the next step for large expert axes.

Routing replay: ``forced`` [B, T, K] expert indices (-1 = route freely) replace the router's choice
for a token; the weights are still the router's probabilities of the forced experts, so the router
keeps its gradient. The block always reports the router's own (unforced) choice.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, logical_to_spec, platform

# Logical axes of the stacked expert weights (per layer; the scan adds "layers" in front).
ROUTER_AXES = ("embed", "router_experts")
GATE_UP_AXES = ("expert", "embed", "expert_mlp")
DOWN_AXES = ("expert", "expert_mlp", "embed")


def _megablox_gmm() -> Any:
    """The maintained Pallas grouped matmul (TPU), or None where this JAX lacks it."""
    try:
        from jax.experimental.pallas.ops.tpu.megablox import gmm
    except ImportError:  # pragma: no cover - depends on the installed JAX
        return None
    return gmm


def _gmm_megablox(x: jax.Array, w: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
    m = x.shape[0]
    pad = -m % 128  # the kernel tiles rows by 128
    covered = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
    x = jnp.where(covered, x, 0)  # the kernel leaves rows past the groups unwritten, forward and backward:
    out = _megablox_gmm()(jnp.pad(x, ((0, pad), (0, 0))), w, group_sizes, preferred_element_type=x.dtype,
                          interpret=interpret)[:m]
    return jnp.where(covered, out, 0)  # these two wheres zero them (and their gradient)


def _gmm_blocked(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int = 64) -> jax.Array:
    """Grouped matmul as fixed-size row blocks, each of one group: every group is padded to a multiple
    of `block` rows, then a lax.map runs one [block, K] x [K, N] product per block (at most M / block + G
    blocks). For backends whose ragged_dot is a dense masked product over all groups (XLA CPU)."""
    m, g = x.shape[0], w.shape[0]
    w = jnp.asarray(w)
    block = max(1, min(block, m))
    num_blocks = -(-m // block) + g
    padded = -(-group_sizes // block) * block
    start, pstart = jnp.cumsum(group_sizes) - group_sizes, jnp.cumsum(padded) - padded
    rows = jnp.arange(m)
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right"), g - 1)
    inside = rows < jnp.sum(group_sizes)
    dest = jnp.where(inside, pstart[group] + rows - start[group], num_blocks * block)  # past the end: dropped
    xb = jnp.zeros((num_blocks * block, x.shape[1]), x.dtype).at[dest].set(x, mode="drop")
    block_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, side="right"), g - 1)
    # rematerialised per block: otherwise autodiff keeps every block's gathered [K, N] weight matrix for the
    # backward pass (num_blocks copies of the expert weights); the gather is cheap to redo
    product = jax.checkpoint(lambda xw, gi: xw @ w[gi], policy=jax.checkpoint_policies.nothing_saveable)
    out = jax.lax.map(lambda args: product(*args), (xb.reshape(num_blocks, block, -1), block_group))
    return jnp.take(out.reshape(num_blocks * block, -1), dest, axis=0, mode="fill", fill_value=0)


GMM_IMPLS = ("ragged_dot", "blocked", "megablox")


def default_gmm_impl(target: str | None = None) -> str:
    """megablox on TPU, ragged_dot on GPU (XLA's grouped GEMM), blocked on CPU (whose ragged_dot
    expands every group to a dense masked product: G times the work). `target` is the platform the
    program is built for (``sharding.platform``), not the host's."""
    backend = target or platform()
    if backend == "tpu" and _megablox_gmm() is not None:
        return "megablox"
    return "blocked" if backend == "cpu" else "ragged_dot"


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str | None = None,
                   target: str | None = None) -> jax.Array:
    """Rows of x [M, K] sorted by group times their group's matrix w [G, K, N]; rows past the groups give 0."""
    impl = impl or default_gmm_impl(target)
    if impl == "megablox":
        return _gmm_megablox(x, w, group_sizes)
    if impl == "blocked":
        return _gmm_blocked(x, w, group_sizes)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)
    raise ValueError(f"grouped matmul impl={impl!r}; valid: {GMM_IMPLS}")


def _local_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   first: jax.Array | int, target: str | None = None) -> jax.Array:
    """out[n] = sum over slots k whose expert is in [first, first + wg.shape[0]) of w * expert(x[n]).

    x [N, E], ids / weights [N, K]; wg / wu [Xl, E, F], wd [Xl, F, E] are the local experts.
    """
    n, k = ids.shape
    num_local = wg.shape[0]
    local = ids.reshape(-1) - first
    valid = (local >= 0) & (local < num_local)
    key = jnp.where(valid, local, num_local)
    order = jnp.argsort(key, stable=True)  # assignments grouped by local expert, foreign ones last
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    token = order // k
    valid_sorted = valid[order][:, None]
    xs = jnp.where(valid_sorted, x[token], 0)
    h = jax.nn.silu(grouped_matmul(xs, wg, group_sizes, target=target)) * grouped_matmul(xs, wu, group_sizes,
                                                                                         target=target)
    out = grouped_matmul(h, wd, group_sizes, target=target)
    w = jnp.where(valid_sorted, weights.reshape(-1)[order][:, None], 0).astype(out.dtype)
    out = jnp.where(valid_sorted, out * w, 0)
    return jnp.zeros(x.shape, out.dtype).at[token].add(out)


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def experts_forward(y: jax.Array, ids: jax.Array, weights: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, *,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """The experts' weighted output [B, T, E] for tokens y [B, T, E] routed to ids [B, T, K] with weights."""
    b, t, e = y.shape
    flat = lambda z: z.reshape(-1, z.shape[-1])  # noqa: E731
    if mesh is None:
        return _local_experts(flat(y), flat(ids), flat(weights), wg, wu, wd, 0).reshape(b, t, e)
    target = platform(mesh)
    g_spec = logical_to_spec(("expert", None, "expert_mlp"), wg.shape, mesh, rules)
    d_spec = logical_to_spec(("expert", "expert_mlp", None), wd.shape, mesh, rules)
    g_spec = tuple(g_spec) + (None,) * (3 - len(g_spec))
    expert_axes, mlp_axes = _axes(g_spec[0]), _axes(g_spec[2])
    reduce_axes = expert_axes + mlp_axes
    batch_spec = logical_to_spec(("batch", None, None), y.shape, mesh, rules)
    batch_axes = _axes(batch_spec[0] if len(batch_spec) else None)
    gathered = tuple(a for a in batch_axes if a in reduce_axes)  # rows split over the expert (tensor) axis
    summed = tuple(a for a in reduce_axes if a not in gathered)
    row = PartitionSpec(batch_axes or None)

    def local(y, ids, weights, wg, wu, wd):
        if gathered:  # every expert shard needs the rows of its whole expert group
            y, ids, weights = (jax.lax.all_gather(z, gathered, axis=0, tiled=True) for z in (y, ids, weights))
        first = jax.lax.axis_index(expert_axes) * wg.shape[0] if expert_axes else 0
        out = _local_experts(flat(y), flat(ids), flat(weights), wg, wu, wd, first, target).reshape(y.shape)
        if gathered:  # add the expert shards' partial outputs and hand each device back its own rows
            out = jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, summed) if summed else out

    specs = (row, row, row, PartitionSpec(*g_spec), PartitionSpec(*g_spec), d_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs,
                         out_specs=row, check_vma=False)(y, ids, weights, wg, wu, wd)


def route(y: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool,
          forced: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(probs [B, T, X] float32, router's top-k ids [B, T, K], used ids [B, T, K], their weights float32)."""
    out_dtype = jnp.promote_types(y.dtype, jnp.float32)  # float32, or float64 under x64
    logits = jnp.einsum("bte,ex->btx", y, router.astype(y.dtype), preferred_element_type=out_dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_ids = jax.lax.top_k(probs, top_k)
    ids, w = top_ids, top_w
    if forced is not None:
        use = forced[..., :1] >= 0
        ids = jnp.where(use, forced, top_ids).astype(jnp.int32)
        w = jnp.take_along_axis(probs, ids, axis=-1)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return probs, top_ids.astype(jnp.int32), ids, w


def routing_stats(probs: jax.Array, ids: jax.Array, token_mask: jax.Array | None) -> dict[str, jax.Array]:
    """Per-layer sums over real tokens: tokens per expert, router probability per expert, entropy."""
    mask = jnp.ones(probs.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    counts = jnp.einsum("btkx,bt->x", jax.nn.one_hot(ids, probs.shape[-1], dtype=jnp.float32), mask)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    return {"load": counts, "prob_sum": jnp.einsum("btx,bt->x", probs, mask),
            "entropy_sum": jnp.sum(entropy * mask), "tokens": jnp.sum(mask)}


def sparse_mlp(p: dict[str, jax.Array], y: jax.Array, cfg: Any, *, forced: jax.Array | None = None,
               token_mask: jax.Array | None = None, mesh: Mesh | None = None,
               rules: Rules = DEFAULT_RULES) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """One layer's sparse MLP on y [B, T, E] from its params p (router, gate_proj, up_proj, down_proj):
    (output [B, T, E] in cfg.dtype, the router's top-k ids [B, T, K], routing_stats)."""
    dtype = jnp.dtype(cfg.dtype)
    y = y.astype(dtype)
    probs, top_ids, ids, w = route(y, p["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob, forced)
    out = experts_forward(y, ids, w.astype(dtype), p["gate_proj"].astype(dtype), p["up_proj"].astype(dtype),
                          p["down_proj"].astype(dtype), mesh=mesh, rules=rules)
    return out, top_ids, routing_stats(probs, ids, token_mask)


class SparseMoe(nn.Module):
    """The sparse MLP of one layer. Params: router [E, X], gate_proj / up_proj [X, E, F], down_proj [X, F, E].

    Reads forced expert ids from the ``routing`` collection ("forced", [B, T, K]) when present; sows
    the router's choice ("experts") and routing_stats ("stats") into ``intermediates``.
    """

    cfg: Any  # qwen.QwenConfig (not imported: qwen imports this module)
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES

    @nn.compact
    def __call__(self, y: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        e, x, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        shapes = {"router": (ROUTER_AXES, (e, x)), "gate_proj": (GATE_UP_AXES, (x, e, f)),
                  "up_proj": (GATE_UP_AXES, (x, e, f)), "down_proj": (DOWN_AXES, (x, f, e))}
        p = {name: self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype)
             for name, (axes, shape) in shapes.items()}
        forced = self.get_variable("routing", "forced") if self.has_variable("routing", "forced") else None
        out, top_ids, stats = sparse_mlp(p, y, cfg, forced=forced, token_mask=token_mask, mesh=self.mesh,
                                         rules=self.rules)
        self.sow("intermediates", "experts", top_ids)
        self.sow("intermediates", "stats", stats)
        return out


def summarize(stats: dict[str, jax.Array], num_experts: int) -> dict[str, jax.Array]:
    """Run metrics from routing_stats stacked over sparse layers [L, ...].

    load_balancing_loss: transformers' load_balancing_loss_func over all sparse layers (f_x = fraction
    of (layer, token) pairs routed to x, summed over the top-k slots; P_x = mean router probability;
    X * sum_x f_x P_x); expert_load_max_over_mean: max / mean tokens per expert, averaged over
    layers (1 = perfectly balanced); router_entropy: mean entropy of the router distribution.
    """
    tokens = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)
    share = jnp.sum(stats["load"], axis=0) / tokens
    mean_prob = jnp.sum(stats["prob_sum"], axis=0) / tokens
    load = stats["load"]
    return {
        "load_balancing_loss": num_experts * jnp.sum(share * mean_prob),
        "expert_load_max_over_mean": jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9)),
        "router_entropy": jnp.sum(stats["entropy_sum"]) / tokens,
    }

"""Qwen2 / Qwen2.5 / Qwen3 dense decoders in Flax, with a functional interface.

The parameters are a plain dict pytree; `forward` and `forward_paged` are pure functions of
(params, tokens, ...). The decoder layers are stacked on a leading ``layers`` axis and run with
``nn.scan`` (one compiled layer, whatever the depth), optionally rematerialised.

Qwen2/2.5: q/k/v projections with bias, no q/k norm, head_dim = hidden / heads.
Qwen3 dense: no q/k/v bias, RMSNorm on each head of q and k before RoPE, head_dim set independently.
Both: grouped-query attention, RoPE (rotate-half form), SwiGLU MLP, RMSNorm, tied or untied embeddings.
Qwen3-MoE: Qwen3 attention; the MLP of the layers that ``QwenConfig.sparse_layers`` marks is
``moe.SparseMoe`` (router + experts as a grouped matmul) instead of the dense SwiGLU.

Mixed dense / sparse layers (``mlp_only_layers``, ``decoder_sparse_step``): the layers are cut into
contiguous runs of one kind (``layer_segments``), each run one ``nn.scan`` stack. A model with one kind
of layer (every dense model; Qwen3-30B-A3B) has one stack named ``layers``; otherwise the stacks are
``layers_0``, ``layers_1``, ... in order. The paged KV cache [L, ...] and its layer counter ride through
the stacks in turn.

Attention takes a key mask and per-token positions, so left-padded batches (the normal case in RL)
work: positions are ``cumsum(mask) - 1`` unless given. The same layer serves the training forward,
the rollout engine's prefill and its decode: only the attention's context differs (models/attention.py),
and the paged KV cache rides in the layer scan's carry so each layer writes its new keys in place.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ruscarl_jax.models import attention, lora, moe, sharding
from ruscarl_jax.models.attention import Context
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]  # {"k": [L, G, KVH, pages, page_size, D], "v": same}: see models/attention.py

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Architecture of a Qwen dense decoder, plus compute dtype and rematerialisation policy."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 / 2.5
    qk_norm: bool = False  # Qwen3
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: str = "none"  # none | full | dots
    attention: str = "auto"  # dense attention implementation: auto | xla | cudnn (models/attention.py)
    # Qwen3-MoE (num_experts = 0: dense MLP everywhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} and decoder_sparse_step="
                                 f"{self.decoder_sparse_step} must be >= 1 with num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; valid: {sorted(REMAT_POLICIES)}")
        if self.attention not in attention.DENSE_IMPLS:
            raise ValueError(f"attention={self.attention!r}; valid: {', '.join(attention.DENSE_IMPLS)}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16"):
                raise ValueError(f"{field}={getattr(self, field)!r}; valid: float32, bfloat16")

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its MLP is the sparse MoE block (transformers' Qwen3MoeDecoderLayer rule)."""
        return tuple(self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_layers))

    @property
    def layer_segments(self) -> tuple[tuple[str, int, int, bool], ...]:
        """(param name, first layer, end layer, sparse) of each contiguous run of same-kind layers."""
        runs: list[list] = []
        for i, sparse in enumerate(self.sparse_layers):
            if runs and runs[-1][2] == sparse:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, sparse])
        names = ["layers"] if len(runs) == 1 else [f"layers_{j}" for j in range(len(runs))]
        return tuple((name, a, b, sparse) for name, (a, b, sparse) in zip(names, runs))

    @property
    def is_moe(self) -> bool:
        return any(self.sparse_layers)

    @property
    def num_params(self) -> int:
        e, f, h, k, d = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = e * (h + 2 * k) * d + h * d * e + (h + 2 * k) * d * self.qkv_bias + 2 * d * self.qk_norm
        sparse = sum(self.sparse_layers)
        mlps = (self.num_layers - sparse) * 3 * e * f + sparse * self.num_experts * (3 * e * self.moe_intermediate_size + e)
        return self.num_layers * (attn + 2 * e) + mlps + self.vocab_size * e * (1 if self.tie_word_embeddings else 2) + e


def _dt(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half form. x: [B, T, N, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _dense(features, axis, names, cfg: QwenConfig, bias: bool, name: str) -> nn.DenseGeneral:
    return lora.Dense(  # nn.DenseGeneral that also reads LoRA adapters / an int8 kernel from its params
        features=features, axis=axis, use_bias=bias, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[len(names) - len(features):]
                                               if isinstance(features, tuple) else names[-1:]),
        name=name)


class Block(nn.Module):
    """One decoder layer, for the training forward, prefill and decode alike. Scanned over layers: the
    carry is (residual stream, paged KV cache or None); `ctx` says what to attend to (models/attention.py)."""

    cfg: QwenConfig
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    paged_attention: str = "auto"
    sparse: bool = False  # the MLP is moe.SparseMoe

    @nn.compact
    def __call__(self, carry, positions, ctx):
        x, kv = carry
        cfg, dtype, pdtype = self.cfg, _dt(self.cfg.dtype), _dt(self.cfg.param_dtype)
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        y = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_norm")(x)
        q = _dense((h, d), -1, ("embed", "heads", "head_dim"), cfg, cfg.qkv_bias, "q_proj")(y)
        kk = _dense((k, d), -1, ("embed", "kv_heads", "head_dim"), cfg, cfg.qkv_bias, "k_proj")(y)
        v = _dense((k, d), -1, ("embed", "kv_heads", "head_dim"), cfg, cfg.qkv_bias, "v_proj")(y)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, axis_name="head_dim", name="q_norm")(q)
            kk = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, axis_name="head_dim", name="k_norm")(kk)
        q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "heads", None), self.mesh, self.rules)
        kk = rope(kk, positions, cfg.rope_theta)

        attn, kv = attention.attend(q, kk, v, ctx, kv, cfg.attention, self.paged_attention,
                                    sharding.platform(self.mesh), self.mesh, self.rules)
        attn = constrain(attn, ("batch", "length", "heads", None), self.mesh, self.rules)
        x = x + _dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"), cfg, False, "o_proj")(attn)
        x = constrain(x, ("batch", "length", "act_embed"), self.mesh, self.rules)

        y = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_norm")(x)
        if self.sparse:  # routing statistics count the real tokens of a full forward
            x = x + moe.SparseMoe(cfg, self.mesh, self.rules, name="mlp")(y, ctx["kv_mask"] if kv is None else None)
            return (constrain(x, ("batch", "length", "act_embed"), self.mesh, self.rules), kv), None
        gate = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), cfg, False, "gate_proj")(y)
        up = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), cfg, False, "up_proj")(y)
        mlp = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"), self.mesh, self.rules)
        x = x + _dense(cfg.hidden_size, -1, ("mlp", "embed"), cfg, False, "down_proj")(mlp)
        x = constrain(x, ("batch", "length", "act_embed"), self.mesh, self.rules)
        return (x, kv), None


class Qwen(nn.Module):
    """The decoder: embedding, scanned layers, final norm. Returns final hidden states (and the cache)."""

    cfg: QwenConfig
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    paged_attention: str = "auto"

    def setup(self) -> None:
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype),
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.stacks = [nn.scan(
            block, variable_axes={"params": 0, "intermediates": 0, "routing": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast), length=end - start,
            metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.mesh, self.rules, self.paged_attention, sparse, name=name)
            for name, start, end, sparse in cfg.layer_segments]
        self.final_norm = RMSNorm(cfg.rms_norm_eps, _dt(cfg.dtype), _dt(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                                      (cfg.hidden_size, cfg.vocab_size), _dt(cfg.param_dtype))

    def __call__(self, tokens, positions, ctx, cache=None):
        x = constrain(self.embed(tokens), ("batch", "length", "act_embed"), self.mesh, self.rules)
        if cache is not None:
            cache = dict(cache, layer=jnp.int32(0))
        for stack in self.stacks:  # the cache's layer counter runs on from one stack to the next
            (x, cache), _ = stack((x, cache), positions, ctx)
        if cache is not None:
            cache = {"k": cache["k"], "v": cache["v"]}
        return self.final_norm(x), cache

    def output_embedding(self) -> jax.Array:
        return self.embed.embedding.T if self.cfg.tie_word_embeddings else self.lm_head


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions of a left-padded batch: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(cfg: QwenConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms) as a plain dict pytree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Qwen(cfg).init(rng, tokens, tokens, {"kv_mask": jnp.ones((1, 1), jnp.int32)})
    return nn.meta.unbox(variables["params"])


def param_logical_axes(cfg: QwenConfig) -> Params:
    """A pytree like the params whose leaves are tuples of logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Qwen(cfg).init(jax.random.key(0), tokens, tokens, {"kv_mask": jnp.ones((1, 1), jnp.int32)}))
    specs = nn.get_partition_spec(boxed["params"])
    return jax.tree.map(lambda spec: tuple(spec), specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shapes(cfg: QwenConfig) -> Params:
    """A pytree like the params of jax.ShapeDtypeStruct (no memory is allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def forward(params: Params, cfg: QwenConfig, tokens: jax.Array, attention_mask: jax.Array,
            positions: jax.Array | None = None, *, segment_ids: jax.Array | None = None, mesh: Mesh | None = None,
            rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Final hidden states [B, T, E] (after the last norm) of a padded batch, no cache.

    Packed rows: segment_ids [B, T] (0 = padding, one id per sequence) keep the sequences apart, and
    positions restart at 0 in each (``rl.packing``)."""
    positions = default_positions(attention_mask) if positions is None else positions
    ctx = {"kv_mask": attention_mask}
    if segment_ids is not None:
        ctx["segment_ids"] = segment_ids
    hidden, _ = Qwen(cfg, mesh, rules).apply({"params": params}, tokens, positions, ctx)
    return hidden


def forward_routed(params: Params, cfg: QwenConfig, tokens: jax.Array, attention_mask: jax.Array,
                   positions: jax.Array | None = None, *, forced_experts: jax.Array | None = None,
                   mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Final hidden states and the MoE routing of a padded batch: (hidden [B, T, E], routing).

    forced_experts [B, L, T, K] (int, -1 = the router chooses) replaces the router's expert choice per
    token and layer (routing replay). routing holds "experts" [B, L, T, K], the router's own top-k
    per layer (-1 in dense layers), and moe.summarize's metrics over the real tokens.
    """
    if not cfg.is_moe:
        raise ValueError("forward_routed: the model has no sparse MoE layer (num_experts=0)")
    positions = default_positions(attention_mask) if positions is None else positions
    variables: dict[str, Any] = {"params": params}
    if forced_experts is not None:
        per_layer = jnp.moveaxis(jnp.asarray(forced_experts, jnp.int32), 1, 0)
        variables["routing"] = {name: {"mlp": {"forced": per_layer[start:end]}}
                                for name, start, end, sparse in cfg.layer_segments if sparse}
    (hidden, _), state = Qwen(cfg, mesh, rules).apply(variables, tokens, positions, {"kv_mask": attention_mask},
                                                      mutable=["intermediates"])
    experts, stats = [], []
    for name, start, end, sparse in cfg.layer_segments:
        if sparse:
            sown = state["intermediates"][name]["mlp"]
            experts.append(sown["experts"][0])
            stats.append(sown["stats"][0])
        else:
            experts.append(jnp.full((end - start,) + tokens.shape + (cfg.num_experts_per_tok,), -1, jnp.int32))
    routing = moe.summarize(jax.tree.map(lambda *s: jnp.concatenate(s), *stats), cfg.num_experts)
    routing["experts"] = jnp.moveaxis(jnp.concatenate(experts), 0, 1)
    return hidden, routing


def forward_paged(params: Params, cfg: QwenConfig, tokens: jax.Array, positions: jax.Array, cache: Cache, ctx: Context,
                  *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                  paged_attention: str = "auto") -> tuple[jax.Array, Cache]:
    """Run `tokens` [B, T] against a paged KV cache (models/attention.py): hidden states [B, T, E] and the cache.

    Prefill: ctx has kv_mask [B, T] and write_page / write_offset [B, T] (the chunk attends to itself
    and is stored). Decode (T = 1): ctx has write_page / write_offset [B, 1], page_table [B, W] and
    lengths [B] (tokens held, this one included)."""
    return Qwen(cfg, mesh, rules, paged_attention).apply({"params": params}, tokens, positions, ctx, cache)


def init_paged_cache(cfg: QwenConfig, groups: int, pages_per_group: int, page_size: int, dtype: str | None = None) -> Cache:
    """A zeroed paged KV cache [L, G, KVH, pages_per_group, page_size, D] for keys and values."""
    shape = (cfg.num_layers, groups, cfg.num_kv_heads, pages_per_group, page_size, cfg.head_dim)
    dt = _dt(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def output_embedding(params: Params, cfg: QwenConfig) -> jax.Array:
    """The [E, V] matrix that maps final hidden states to logits (the embedding's transpose if tied)."""
    return params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


def compute_logits(params: Params, cfg: QwenConfig, tokens: jax.Array, attention_mask: jax.Array,
                   positions: jax.Array | None = None, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Float32 logits [B, T, V] for a padded batch (materialises the whole tensor: use for small batches)."""
    hidden = forward(params, cfg, tokens, attention_mask, positions, mesh=mesh, rules=rules)
    logits = jnp.einsum("bte,ev->btv", hidden, output_embedding(params, cfg).astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"), mesh, rules)


def param_shardings(cfg: QwenConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Params:
    """NamedShardings of every parameter, from its logical axes and the rules."""
    from ruscarl_jax.models.sharding import check_expert_axis, tree_shardings

    check_expert_axis(cfg.num_experts, mesh.shape.get("expert", 1))
    shapes = jax.tree.map(lambda s: s.shape, param_shapes(cfg))
    return tree_shardings(param_logical_axes(cfg), shapes, mesh, rules)


def init_params_sharded(cfg: QwenConfig, rng: jax.Array, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Params:
    """Random parameters created directly in their shards (no host ever holds the whole model)."""
    return jax.jit(lambda key: init_params(cfg, key), out_shardings=param_shardings(cfg, mesh, rules))(rng)

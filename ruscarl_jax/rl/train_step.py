"""The GRPO update over one rollout batch (B prompts x G responses), verl semantics.

Order of work, all on the training prompts (unscaffolded by default; what the trainer puts in
``input_ids``):
1. old log-probs with the current parameters and, when the KL loss is on, reference log-probs with
   the frozen reference parameters, before any update (so the first minibatch has ratio 1);
2. group advantages from the rewards;
3. for each of ppo_epochs: a fresh permutation of the rows, cut into minibatches of
   ppo_mini_batch_size rows; each minibatch is cut into micro-batches whose gradients are
   accumulated (lax.scan), then one optimizer update, skipped if the loss or gradient is not finite.
   The permutation is of the GLOBAL row ids and drawn from (rng, epoch) alone (the trainer's rng is
   fold_in(seed key, step)), so it does not depend on how the rows are spread over processes.

Rollout batch (dict of arrays, N = B * G rows, prompt P left-padded, response R right-padded):
input_ids int [N, P+R], attention_mask [N, P+R], response_mask [N, R] (1 up to and including the
stop token), rewards [N], group_ids int [N]; optional row_valid [N] (alias sample_weight): rows
with 0 leave the group statistics and the loss. Optional, from the rollout: rollout_logprobs [N, R]
(the sampler's log-probs, under the scaffolded prompt), scaffolded [N] (1: the sampling prompt
showed at least one criterion) and truncated [N] (1: finish reason 'length'); with them the update reports the scaffold gap
(`rollout_correction`) and can apply the corrections and filters of `GRPOSettings`.

Mixture-of-experts policies (``Policy.routed``): optional rollout_experts int [N, L, R, K], the
experts the rollout routed each response-scoring position to (the states at P-1 .. P+R-2, which
score response tokens 0 .. R-1). With ``routing_replay`` the forwards are forced onto them; either
way the update reports ``routing_mismatch`` (the fraction of response tokens whose expert set, in any
layer, differs between the rollout and the update forward's own router) next to the router metrics.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ruscarl_jax.models import lora
from ruscarl_jax.rl.accumulate import Batch, accumulate_gradients, apply_if_finite, split_rows
from ruscarl_jax.rl import rollout_correction
from ruscarl_jax.rl.advantages import group_advantages
from ruscarl_jax.rl.group_filters import filter_rows
from ruscarl_jax.models.sharding import data_parallel_size
from ruscarl_jax.rl import packing
from ruscarl_jax.rl.logprobs import response_logprobs, token_logprobs
from ruscarl_jax.rl.losses import Normalizers, aggregate, kl_penalty, masked_mean, normalizers, policy_loss
from ruscarl_jax.rl.optimizer import cast_floating, last_learning_rate
from ruscarl_jax.rl.policy import Params, Policy
from ruscarl_jax.rl.settings import GRPOSettings

REQUIRED_KEYS = ("input_ids", "attention_mask", "response_mask", "rewards", "group_ids")
ROUTING_KEY = "rollout_experts"
VALID_KEYS = ("row_valid", "sample_weight")
ROW_KEYS = ("scaffolded", "truncated")  # optional [N] row flags


def check_rollout_batch(batch: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key when a rollout batch is missing a field or is mis-shaped."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"rollout batch: missing key(s) {missing}; it has {sorted(batch)}")
    if np.ndim(batch["input_ids"]) != 2:
        raise ValueError("rollout batch: 'input_ids' must be [rows, prompt+response], got shape "
                         f"{np.shape(batch['input_ids'])}")
    n, total = np.shape(batch["input_ids"])
    expect = {"attention_mask": (n, total), "rewards": (n,), "group_ids": (n,)}
    expect.update({k: (n,) for k in VALID_KEYS + ROW_KEYS if k in batch})
    for key, shape in expect.items():
        if tuple(np.shape(batch[key])) != shape:
            raise ValueError(f"rollout batch: '{key}' has shape {tuple(np.shape(batch[key]))}, expected {shape}")
    resp = np.shape(batch["response_mask"])
    if len(resp) != 2 or resp[0] != n or not 0 < resp[1] < total:
        raise ValueError(f"rollout batch: 'response_mask' has shape {tuple(resp)}; expected [{n}, R] with "
                         f"0 < R < {total} (the prompt needs at least one token)")
    if "rollout_logprobs" in batch and tuple(np.shape(batch["rollout_logprobs"])) != tuple(resp):
        raise ValueError(f"rollout batch: 'rollout_logprobs' has shape {tuple(np.shape(batch['rollout_logprobs']))}, "
                         f"expected {tuple(resp)} (that of 'response_mask')")
    if ROUTING_KEY in batch:
        shape = tuple(np.shape(batch[ROUTING_KEY]))
        if len(shape) != 4 or shape[0] != n or shape[2] != resp[1]:
            raise ValueError(f"rollout batch: '{ROUTING_KEY}' has shape {shape}, expected [{n}, layers, {resp[1]}, top_k]")
    for key in ("input_ids", "group_ids"):
        dtype = batch[key].dtype if hasattr(batch[key], "dtype") else np.asarray(batch[key]).dtype
        if not np.issubdtype(dtype, np.integer):
            raise ValueError(f"rollout batch: '{key}' must hold integers, got {dtype}")


def _row_valid(batch: Mapping[str, jax.Array]) -> jax.Array:
    for key in VALID_KEYS:
        if key in batch:
            return jnp.asarray(batch[key]) != 0
    return jnp.ones(batch["rewards"].shape, bool)


def _loss_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    return batch["response_mask"].astype(jnp.float32) * _row_valid(batch)[:, None].astype(jnp.float32)


def _compute_params(params: Params, settings: GRPOSettings, policy: Policy) -> Params:
    """The params in the compute dtype; only the trainable part is cast (a LoRA base is stored in it)."""
    if settings.compute_dtype == "float32":
        return params
    trainable, frozen = policy.split(params)
    return policy.join(cast_floating(trainable, settings.compute_dtype), frozen)


def _response_positions(experts: jax.Array, total: int) -> jax.Array:
    """Rollout experts [N, L, R, K] placed at the states that score the response, in a [N, L, total, K] -1 grid."""
    resp = experts.shape[2]
    return jnp.pad(experts, ((0, 0), (0, 0), (total - resp - 1, 1), (0, 0)), constant_values=-1)


def routing_mismatch(experts: jax.Array, rollout_experts: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over response tokens (weighted by mask [N, R]) of 'the expert set differs in some layer'.

    experts [N, L, T, K] from a forward over the whole rows; rollout_experts [N, L, R, K]."""
    resp = rollout_experts.shape[2]
    ours = jax.lax.slice_in_dim(experts, experts.shape[2] - resp - 1, experts.shape[2] - 1, axis=2)
    differ = jnp.any(jnp.sort(ours, axis=-1) != jnp.sort(rollout_experts, axis=-1), axis=(1, 3))
    return jnp.sum(differ.astype(jnp.float32) * mask)


def policy_forward(policy: Policy, params: Params, micro: Batch,
                   settings: GRPOSettings) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Final hidden states of a micro-batch, and the MoE routing (None for a dense policy)."""
    if policy.routed is None:
        return policy.hidden(params, micro["input_ids"], micro["attention_mask"]), None
    forced = None
    if settings.routing_replay and ROUTING_KEY in micro:
        forced = _response_positions(micro[ROUTING_KEY], micro["input_ids"].shape[1])
    return policy.routed(params, micro["input_ids"], micro["attention_mask"], forced)


def rollout_logprobs(params: Params, batch: Batch, *, policy: Policy, settings: GRPOSettings) -> jax.Array:
    """Log-probs [N, R] (float32, no gradient) of the response tokens, in passes of logprob_rows rows."""
    cparams = _compute_params(params, settings, policy)
    resp_len = batch["response_mask"].shape[1]
    if settings.packed:
        return _packed_rollout_logprobs(cparams, batch, policy=policy, settings=settings)
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if settings.routing_replay and ROUTING_KEY in batch:
        rows[ROUTING_KEY] = batch[ROUTING_KEY]

    def one(micro: Batch) -> jax.Array:
        micro = policy.shard_rows(micro)
        hidden, _ = policy_forward(policy, cparams, micro, settings)
        logp, _ = response_logprobs(hidden, policy.unembed(cparams), micro["input_ids"], resp_len,
                                    temperature=settings.temperature, chunk_size=settings.logprob_chunk_size)
        return logp

    logp = jax.lax.map(one, split_rows(rows, settings.logprob_rows))
    return jax.lax.stop_gradient(logp.reshape(-1, resp_len))


def _packed_rollout_logprobs(cparams: Params, batch: Batch, *, policy: Policy, settings: GRPOSettings) -> jax.Array:
    """rollout_logprobs on packed buffers of logprob_budget tokens per shard (rows without a response token
    are left out and get 0); empty micro-batches are skipped."""
    capacity = settings.logprob_budget
    keep = jnp.sum(batch["response_mask"], axis=-1) > 0
    lay, micros = _pack_rows(policy, batch, keep, capacity)

    def one(micro: Batch) -> jax.Array:
        real = lambda: _packed_stats(policy, cparams, micro, settings)[0]  # noqa: E731
        return jax.lax.cond(micro["nonempty"], real, lambda: _zeros_like_out(real))

    logp = jax.lax.map(one, micros).reshape(-1, capacity)
    total, resp_len = batch["input_ids"].shape[1], batch["response_mask"].shape[1]
    return jax.lax.stop_gradient(packing.unpack_response(logp, lay, total - resp_len, resp_len))


def grpo_loss(params: Params, micro: Batch, norm: Normalizers, *, policy: Policy,
              settings: GRPOSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the minibatch loss: pg_loss + kl_coef * kl_loss - entropy_coeff * entropy.

    micro holds input_ids, attention_mask, loss_mask, advantages [rows], old_log_probs and (KL on)
    ref_log_probs; `norm` are the normalisers of the whole minibatch.
    """
    hidden, routing = policy_forward(policy, params, micro, settings)
    logp, entropy = response_logprobs(hidden, policy.unembed(params), micro["input_ids"], micro["loss_mask"].shape[1],
                                      temperature=settings.temperature, chunk_size=settings.logprob_chunk_size)
    return loss_terms(logp, entropy, routing, micro, norm, settings)


def loss_terms(logp: jax.Array, entropy: jax.Array, routing: dict[str, jax.Array] | None, micro: Batch,
               norm: Normalizers, settings: GRPOSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss and its metrics from the response tokens' log-probs and entropies [rows, R] (packed or not)."""
    s = settings
    mask = micro["loss_mask"]
    adv = micro["advantages"][:, None] * mask
    pg_loss, aux = policy_loss(logp, micro["old_log_probs"], adv, mask, clip_ratio_low=s.clip_ratio_low,
                               clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c,
                               loss_agg_mode=s.loss_agg_mode, norm=norm, token_weight=micro.get("is_weights"))
    if s.entropy_coeff == 0:  # a metric only: no backward pass through the entropy
        entropy = jax.lax.stop_gradient(entropy)
    entropy_term = aggregate(entropy, mask, s.loss_agg_mode, norm)
    loss = pg_loss - s.entropy_coeff * entropy_term
    aux = {"pg_loss": pg_loss, "entropy": entropy_term, **aux}
    if s.kl_active:
        kl_loss = aggregate(kl_penalty(logp, micro["ref_log_probs"], s.kl_estimator), mask, s.loss_agg_mode, norm)
        loss = loss + s.kl_coef * kl_loss
        aux["kl_loss"] = kl_loss
    if routing is not None:  # MoE: router metrics; this micro-batch's share of the minibatch mean
        share = s.ppo_micro_batch_size / s.ppo_mini_batch_size
        for key in ("load_balancing_loss", "expert_load_max_over_mean", "router_entropy"):
            aux[key] = share * routing[key]
        if s.router_aux_loss_coef > 0:
            loss = loss + s.router_aux_loss_coef * aux["load_balancing_loss"]
        if ROUTING_KEY in micro:
            aux["routing_mismatch"] = routing_mismatch(routing["experts"], micro[ROUTING_KEY], mask) / jnp.maximum(
                norm.num_tokens, 1.0)
    return loss, aux


# ------------------------------------------------------------------------------ packed token buffers

def _buffers_per_micro(policy: Policy) -> int:
    """One buffer per data-parallel shard in each packed micro-batch."""
    return 1 if policy.mesh is None else data_parallel_size(policy.mesh, policy.rules)


def _pack_rows(policy: Policy, rows: Batch, keep: jax.Array, capacity: int) -> tuple[packing.Layout, Batch]:
    """The rows' spans packed (rl.packing) into micro-batches: tokens / segment_ids / positions
    [micro-batches, buffers per micro-batch, capacity], plus each micro-batch's index and whether it holds any token."""
    per = _buffers_per_micro(policy)
    nb = packing.num_buffers(rows["input_ids"].shape[0], per)
    lay = packing.layout(rows["attention_mask"], keep, nb, capacity)
    tokens, segments, positions = packing.pack(rows["input_ids"], lay, nb, capacity)
    split = lambda x: x.reshape(nb // per, per, capacity)  # noqa: E731
    micros = {"tokens": split(tokens), "segment_ids": split(segments), "positions": split(positions)}
    micros["nonempty"] = jnp.any(micros["segment_ids"] > 0, axis=(1, 2))
    micros["index"] = jnp.arange(nb // per, dtype=jnp.int32)
    return lay, micros


def _packed_stats(policy: Policy, params: Params, micro: Batch, settings: GRPOSettings) -> tuple[jax.Array, jax.Array]:
    """Log-prob and entropy [buffers, capacity] of each packed micro-batch's positions (position p scores
    the token at p + 1; the last position scores nothing)."""
    bufs = policy.shard_rows({k: micro[k] for k in ("tokens", "segment_ids", "positions")})
    hidden = policy.packed(params, bufs["tokens"], bufs["segment_ids"], bufs["positions"])
    logp, entropy = token_logprobs(hidden[:, :-1], policy.unembed(params), bufs["tokens"][:, 1:],
                                   temperature=settings.temperature, chunk_size=settings.logprob_chunk_size)
    return jnp.pad(logp, ((0, 0), (0, 1))), jnp.pad(entropy, ((0, 0), (0, 1)))


def _micro_layout(lay: packing.Layout, index: jax.Array, per: int) -> tuple[packing.Layout, jax.Array]:
    """The layout restricted to micro-batch `index` (its buffers renumbered from 0) and which rows are in it."""
    inside = (lay.buffer >= 0) & (lay.buffer // per == index)
    return lay._replace(buffer=jnp.where(inside, lay.buffer - index * per, -1)), inside


def _zeros_like_out(fn: Callable, *args: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args))


def grpo_update(params: Params, opt_state: optax.OptState, batch: Batch, old_log_probs: jax.Array,
                ref_log_probs: jax.Array | None, rng: jax.Array, *, policy: Policy, settings: GRPOSettings,
                optimizer: optax.GradientTransformation) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """All minibatch updates of one rollout batch, given its old (and reference) log-probs. Pure."""
    s = settings
    n = batch["rewards"].shape[0]
    valid = _row_valid(batch)
    mask = _loss_mask(batch)
    adv = group_advantages(batch["rewards"], batch["group_ids"], valid, norm_by_std=s.norm_adv_by_std,
                           epsilon=s.adv_epsilon)
    base_mask = mask
    mask, extra = filter_rows(mask, batch["rewards"], batch["group_ids"], valid, batch.get("truncated"),
                              filter_zero_std=s.filter_zero_std_groups, mask_truncated=s.mask_truncated)
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "loss_mask": mask,
            "advantages": adv, "old_log_probs": old_log_probs}
    if "rollout_logprobs" in batch:
        rollout_lp = batch["rollout_logprobs"].astype(jnp.float32)
        scaffolded = batch.get("scaffolded", jnp.zeros(n, jnp.float32))
        extra.update(rollout_correction.gap_metrics(old_log_probs, rollout_lp, base_mask, scaffolded, s.gap_thresholds))
        if s.correction_active:
            weights, mask, corr = rollout_correction.correction(old_log_probs, rollout_lp, mask, scaffolded, s)
            rows["loss_mask"] = mask
            extra.update(corr)
            if s.rollout_is != "none":
                rows["is_weights"] = weights
    if policy.routed is not None and ROUTING_KEY in batch:
        rows[ROUTING_KEY] = batch[ROUTING_KEY]
    if s.kl_active:
        if ref_log_probs is None:
            raise ValueError("the KL loss is on (use_kl_loss and kl_coef > 0) but no reference log-probs were given")
        rows["ref_log_probs"] = ref_log_probs

    epoch_keys = jax.random.split(rng, s.ppo_epochs)
    if s.shuffle:
        order = jax.vmap(lambda k: jax.random.permutation(k, n))(epoch_keys)
    else:
        order = jnp.tile(jnp.arange(n), (s.ppo_epochs, 1))
    minibatch_index = order.reshape(-1, s.ppo_mini_batch_size)
    loss_fn = functools.partial(grpo_loss, policy=policy, settings=s)

    def one_update(carry, index):
        params, opt_state = carry
        minibatch = jax.tree.map(lambda x: jnp.take(x, index, axis=0), rows)
        norm = normalizers(minibatch["loss_mask"])
        trainable, frozen = policy.split(params)  # gradients and optimizer state of the trainable part only
        ctrainable, cfrozen = policy.split(_compute_params(params, s, policy))
        extra_stats = {}
        if s.packed:
            grads, stats, extra_stats = _packed_gradients(ctrainable, cfrozen, minibatch, norm, policy=policy, settings=s)
        else:
            grads, stats = accumulate_gradients(
                lambda t, micro: loss_fn(policy.join(t, cfrozen), micro, norm), ctrainable,
                split_rows(minibatch, s.ppo_micro_batch_size), policy.shard_rows)
        trainable, opt_state, applied, grad_norm = apply_if_finite(optimizer, trainable, opt_state, grads, stats["loss"])
        params = policy.join(trainable, frozen)
        return (params, opt_state), {**stats, **extra_stats, "grad_norm": grad_norm,
                                     "applied": applied.astype(jnp.float32)}

    (params, opt_state), per_update = jax.lax.scan(one_update, (params, opt_state), minibatch_index)
    applied = per_update.pop("applied")
    # loss metrics average the applied updates (a skipped one is usually NaN); all of them if none was
    n_applied = applied.sum()
    metrics = {k: jnp.where(n_applied > 0, jnp.sum(jnp.where(applied > 0, v, 0.0)) / jnp.maximum(n_applied, 1.0),
                            v.mean()) for k, v in per_update.items()}
    token_adv = adv[:, None] * mask
    adv_mean = masked_mean(token_adv, mask)
    metrics.update({
        "lr": last_learning_rate(opt_state),
        "num_updates": jnp.asarray(applied.shape[0], jnp.float32),
        "skipped_updates": applied.shape[0] - n_applied,
        "advantage_mean": adv_mean,
        "advantage_std": jnp.sqrt(masked_mean(jnp.square(token_adv - adv_mean), mask)),
        "reward_mean": jnp.sum(jnp.where(valid, batch["rewards"], 0.0)) / jnp.maximum(valid.sum(), 1),
        "response_tokens": mask.sum(),
        **extra,
    })
    return params, opt_state, metrics


def _packed_gradients(ctrainable: Params, cfrozen: Any, minibatch: Batch, norm: Normalizers, *, policy: Policy,
                      settings: GRPOSettings) -> tuple[Params, dict[str, jax.Array], dict[str, jax.Array]]:
    """accumulate_gradients over packed micro-batches of micro_token_budget tokens per shard. Each micro-batch
    scores the minibatch's rows it holds and computes the unpacked loss on [rows, R] with the other rows'
    mask zeroed, so the sum over micro-batches is the minibatch loss exactly; rows without a loss token are
    not packed, and micro-batches without a token are skipped. Also: packed_token_fraction (real tokens
    over the tokens the micro-batches computed). Gradients are of the trainable part (``policy.split``)."""
    capacity = settings.micro_token_budget
    keep = jnp.sum(minibatch["loss_mask"], axis=-1) > 0
    lay, micros = _pack_rows(policy, minibatch, keep, capacity)
    per = micros["tokens"].shape[1]
    total, resp_len = minibatch["input_ids"].shape[1], minibatch["loss_mask"].shape[1]

    def micro_loss(t: Params, micro: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        def real(t):
            logp, entropy = _packed_stats(policy, policy.join(t, cfrozen), micro, settings)
            local, inside = _micro_layout(lay, micro["index"], per)
            logp, entropy = (packing.unpack_response(x, local, total - resp_len, resp_len) for x in (logp, entropy))
            rows = dict(minibatch, loss_mask=minibatch["loss_mask"] * inside[:, None].astype(jnp.float32))
            return loss_terms(logp, entropy, None, rows, norm, settings)

        return jax.lax.cond(micro["nonempty"], real, lambda t: _zeros_like_out(real, t), t)

    grads, stats = accumulate_gradients(micro_loss, ctrainable, micros)
    computed = micros["nonempty"].sum() * per * capacity
    fraction = lay.length.sum() / jnp.maximum(computed, 1)
    return grads, stats, {"packed_token_fraction": fraction.astype(jnp.float32)}


def make_reference(params: Params, settings: GRPOSettings) -> Params | None:
    """A frozen copy of the initial parameters for the KL loss; None when the KL loss is off or the
    params are a LoRA state (its reference is its own base with the adapters off: no copy).

    With ref_in_host_memory the copy lives in pinned host memory (same sharding) and is brought to
    the devices only for the reference log-prob pass of each step.
    """
    if not settings.kl_active or lora.is_adapted(params):
        return None
    if settings.ref_in_host_memory:
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind("pinned_host")), params)
    return jax.tree.map(jnp.copy, params)


def _on_device(tree: Params) -> Params:
    def move(x):
        kind = getattr(x.sharding, "memory_kind", None)
        return x if kind in (None, "device") else jax.device_put(x, x.sharding.with_memory_kind("device"))
    return jax.tree.map(move, tree)


def make_grpo_step(policy: Policy, settings: GRPOSettings, optimizer: optax.GradientTransformation, *,
                   donate: bool = True, compiler_options: Mapping[str, Any] | None = None,
                   ) -> Callable[..., tuple[Params, optax.OptState, dict[str, jax.Array]]]:
    """step(params, opt_state, batch, rng, ref_params=None) -> (params, opt_state, metrics).

    opt_state is the optimizer's state of ``policy.split(params)[0]`` (the trainable part). With the KL
    loss on and no ref_params, the reference is ``policy.reference(params)`` (a LoRA state's base).

    Compiles the log-prob pass and the update once per batch shape. With donate, the params and
    optimizer state passed in are consumed (their buffers are reused for the results).
    compiler_options are XLA options for both computations (e.g. scheduler flags on TPU).
    """
    if settings.routing_replay and policy.routed is None:
        raise ValueError("GRPOSettings.routing_replay=True needs a mixture-of-experts policy; this one is dense")
    if settings.packed and policy.packed is None:
        raise ValueError("GRPOSettings.micro_token_budget (packing) needs a policy with a packed forward "
                         "(Policy.packed); this one has none (mixture-of-experts policies run unpacked rows)")
    options = dict(compiler_options) if compiler_options else None
    logprobs = jax.jit(functools.partial(rollout_logprobs, policy=policy, settings=settings),
                       compiler_options=options)
    update = jax.jit(functools.partial(grpo_update, policy=policy, settings=settings, optimizer=optimizer),
                     donate_argnums=(0, 1) if donate else (), compiler_options=options)

    def step(params: Params, opt_state: optax.OptState, batch: Mapping[str, Any], rng: jax.Array,
             ref_params: Params | None = None) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
        check_rollout_batch(batch)
        if settings.correction_active and "rollout_logprobs" not in batch:
            raise ValueError("rollout correction is on (GRPOSettings.rollout_is / rollout_rs) but the rollout batch "
                             "has no 'rollout_logprobs'")
        settings.check_batch_size(int(np.shape(batch["rewards"])[0]))
        if settings.packed:
            width = int(np.shape(batch["input_ids"])[1])
            for key, budget in (("micro_token_budget", settings.micro_token_budget),
                                ("logprob_token_budget", settings.logprob_budget)):
                if budget < width:
                    raise ValueError(f"GRPOSettings.{key}={budget} is below this batch's row width {width} "
                                     "(prompt + response): a row must fit one packed buffer")
            mask = batch["attention_mask"]
            if not isinstance(mask, jax.Array) or mask.is_fully_addressable:
                packing.check_contiguous(np.asarray(mask))
        batch = {k: v if isinstance(v, jax.Array) else jnp.asarray(v) for k, v in batch.items()}
        old = logprobs(params, batch)
        ref = None
        if settings.kl_active:
            ref_params = ref_params if ref_params is not None else policy.reference(params)
            if ref_params is None:
                raise ValueError("the KL loss is on (use_kl_loss and kl_coef > 0): pass ref_params "
                                 "(make_reference(initial_params, settings))")
            ref = logprobs(_on_device(ref_params), batch)
        return update(params, opt_state, batch, old, ref, rng)

    return step

"""Rollouts from the policy itself: jitted prefill, then a decode loop over a static KV cache.

The sampler runs on the parameters exactly as training holds them (same pytree, same shardings);
nothing is copied into another engine. One call:

1. pads the prompts to the left to a bucketed width P (see `settings.bucket_length`) and the batch to
   a multiple of the mesh's data-parallel size (the extra rows are dropped again on return);
2. prefill (jitted): runs the prompts through ``qwen.forward_cached`` (attending over their P slots),
   lays their keys / values into slots 0..P-1 of a zeroed static cache of S = P + R slots (sharded
   per ``decode_step.DECODE_CACHE_AXES``) and samples the first response token;
3. decode (jitted, cache and loop state donated): a ``lax.while_loop`` that feeds one token per row
   per step into slot P + t - 1 (``decode_step``) and exits as soon as every row has emitted a stop
   token, or after R tokens. Each step attends over all S slots, masked.

Log-probs are those of the sampled token under softmax(logits / temperature) over the full vocabulary,
BEFORE top-k / top-p filtering: the quantity the GRPO update recomputes as the old log-prob. In greedy
mode they are temperature-1 log-probs.

Compiled code is cached by ``jax.jit`` per (N, P, R) shape, model config, settings and mesh.
Multi-host: every process passes its own prompts and receives its own rows (``host_to_global``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, constrain, data_parallel_size, global_to_host, host_to_global
from ruscarl_jax.sampler.decode_step import decode_step, from_prompt_cache
from ruscarl_jax.sampler.filtering import sample_tokens, sampled_logprobs
from ruscarl_jax.sampler.settings import SamplingSettings, bucket_length, round_up

Prompts = Sequence[Sequence[int]] | tuple[Any, Any]


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Host (numpy) arrays for N rows: prompts left padded to P, responses of R = max_new_tokens slots."""

    prompt_tokens: np.ndarray  # [N, P] int32, pad id left of each prompt
    prompt_mask: np.ndarray  # [N, P] int32
    tokens: np.ndarray  # [N, R] int32, pad id after a row's stop token
    response_mask: np.ndarray  # [N, R] int32, ones up to and including the first stop token
    logprobs: np.ndarray  # [N, R] float32, 0 where response_mask is 0
    finish_reason: np.ndarray  # [N] str: 'stop' (emitted a stop token) or 'length'
    lengths: np.ndarray  # [N] int32, response_mask.sum(-1)
    num_steps: int  # tokens the loop generated (< R when every row stopped early)


def fold_step_key(base_key: jax.Array, step: int) -> jax.Array:
    """The sampling key of training step `step`: a fresh key every step from one base key."""
    return jax.random.fold_in(base_key, step)


# ------------------------------------------------------------------------------------------ host side

def _prompt_rows(prompts: Prompts) -> list[np.ndarray]:
    """Each prompt's real token ids, from a list of id lists or a left-padded (tokens, mask) pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and all(hasattr(p, "shape") for p in prompts):
        tokens, mask = (np.asarray(p) for p in prompts)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"prompts: tokens {tokens.shape} and mask {mask.shape} must both be [N, T]")
        rows = []
        for i, (t, m) in enumerate(zip(tokens, mask)):
            if not np.isin(m, (0, 1)).all() or (np.diff(m.astype(np.int64)) < 0).any():
                raise ValueError(f"prompts: mask row {i} is not left padded (zeros then ones): {m.tolist()}")
            rows.append(t[m.astype(bool)])
        return rows
    return [np.asarray(list(p), dtype=np.int64) for p in prompts]


def pad_prompts(prompts: Prompts, settings: SamplingSettings, vocab_size: int, batch_multiple: int = 1, *,
                min_length: int = 0, min_rows: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [N', P], mask [N', P], N): left padded to the bucket of max(longest prompt, min_length),
    N' = max(N, min_rows) rounded up to `batch_multiple` (filler rows hold one pad token).
    Bad ids and empty prompts name their row."""
    rows = _prompt_rows(prompts)
    if not rows:
        raise ValueError("prompts: the batch is empty")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompts: row {i} is empty (every prompt needs at least one token)")
        bad = np.flatnonzero((row < 0) | (row >= vocab_size))
        if bad.size:
            raise ValueError(f"prompts: row {i}, position {bad[0]}: token id {row[bad[0]]} is outside the vocabulary "
                             f"of {vocab_size}")
    n = len(rows)
    longest = max(max(r.size for r in rows), min_length)
    width = bucket_length(longest, settings.prompt_bucket_min, settings.prompt_bucket_steps)
    total = round_up(max(n, min_rows), batch_multiple)
    tokens = np.full((total, width), settings.pad_token_id, np.int32)
    mask = np.zeros((total, width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - row.size:] = row
        mask[i, width - row.size:] = 1
    mask[n:, -1] = 1
    return tokens, mask, n


def _max_over_processes(*values: int) -> tuple[int, ...]:
    """Element-wise maxima over all processes (a tiny all-gather; free on one process)."""
    if jax.process_count() == 1:
        return values
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


# ----------------------------------------------------------------------------------------- device side

def _pick_and_record(state: dict, logits: jax.Array, rng: jax.Array, t: jax.Array, s: SamplingSettings) -> dict:
    """Sample token t of every row that has not stopped; write it, its log-prob and mask at slot t.

    Row i draws with fold_in(fold_in(rng, seed_i), t): its randomness depends on its own seed, not on
    where it sits in the batch, so a batch split over hosts samples what one host would."""
    keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.fold_in(rng, seed), t))(state["seeds"])
    tok = jax.vmap(lambda k, row: sample_tokens(k, row, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                 greedy=s.greedy))(keys, logits)
    logp = sampled_logprobs(logits, tok, 1.0 if s.greedy else s.temperature)
    alive = ~state["done"]
    tok = jnp.where(alive, tok, s.pad_token_id).astype(jnp.int32)
    logp = jnp.where(alive, logp, 0.0)
    is_stop = jnp.isin(tok, jnp.asarray(s.stop_token_ids, jnp.int32)) if s.stop_token_ids else jnp.zeros_like(alive)

    def put(buffer, column):
        return jax.lax.dynamic_update_index_in_dim(buffer, column.astype(buffer.dtype), t, axis=1)

    return dict(state, tokens=put(state["tokens"], tok), logprobs=put(state["logprobs"], logp),
                mask=put(state["mask"], alive), done=state["done"] | (alive & is_stop), step=t + 1)


def _prefill(params, prompt_tokens, prompt_mask, seeds, rng, *, cfg, settings, mesh, rules):
    """Run the prompts (attending over their P slots only), build the decode cache, sample token 0."""
    n, p = prompt_tokens.shape
    r = settings.max_new_tokens
    positions = qwen.default_positions(prompt_mask)
    prompt_cache = qwen.init_cache(cfg, n, p)
    hidden, prompt_cache = qwen.forward_cached(params, cfg, prompt_tokens, positions, prompt_cache, prompt_mask, 0,
                                               mesh=mesh, rules=rules)
    cache = from_prompt_cache(prompt_cache, p + r, mesh, rules)
    w = qwen.output_embedding(params, cfg)
    logits = jnp.einsum("ne,ev->nv", hidden[:, -1], w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "vocab"), mesh, rules)
    state = dict(
        tokens=jnp.full((n, r), settings.pad_token_id, jnp.int32), logprobs=jnp.zeros((n, r), jnp.float32),
        mask=jnp.zeros((n, r), jnp.int32), done=jnp.zeros((n,), bool),
        kv_mask=jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.zeros((n, r), jnp.int32)], axis=1),
        prompt_len=jnp.sum(prompt_mask, axis=1, dtype=jnp.int32), step=jnp.int32(0), seeds=seeds)
    return cache, _pick_and_record(state, logits, rng, jnp.int32(0), settings)


def _decode(params, cache, state, rng, *, cfg, settings, mesh, rules):
    """Generate tokens 1..R-1 until every row has stopped: one `decode_step` per token."""
    n, r = state["tokens"].shape
    p = state["kv_mask"].shape[1] - r

    def keep_going(carry):
        _, st = carry
        return (st["step"] < r) & ~jnp.all(st["done"])

    def step(carry):
        cache, st = carry
        t = st["step"]
        slot = p + t - 1  # the previous token goes into this slot and predicts token t
        prev = jax.lax.dynamic_index_in_dim(st["tokens"], t - 1, axis=1, keepdims=False)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(st["kv_mask"], jnp.ones((n, 1), jnp.int32), slot, axis=1)
        logits, cache = decode_step(params, cfg, prev, st["prompt_len"] + t - 1, cache, kv_mask, slot, mesh=mesh, rules=rules)
        return cache, _pick_and_record(dict(st, kv_mask=kv_mask), logits, rng, t, settings)

    return jax.lax.while_loop(keep_going, step, (cache, state))


_STATIC = ("cfg", "settings", "mesh", "rules")
_prefill_jit = jax.jit(_prefill, static_argnames=_STATIC)
_decode_jit = jax.jit(_decode, static_argnames=_STATIC, donate_argnames=("cache", "state"))


def generate(params: qwen.Params, cfg: qwen.QwenConfig, prompts: Prompts, rng: jax.Array, settings: SamplingSettings,
             *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, row_seeds: Sequence[int] | None = None) -> SampleOutput:
    """Sample a response for every prompt (token id lists of any lengths, or a left-padded (tokens, mask)).

    `rng` should be fresh per call, e.g. ``fold_step_key(base_key, step)``. With a mesh, the batch is
    sharded over the batch rule's axes and the cache's KV heads over the tensor axis where divisible.
    Several processes: each passes its own prompts and gets its own rows back (the prompt width and
    the row count are agreed on first, so every process runs the same program).
    `row_seeds` (one int per prompt, default: the row index) key each row's randomness; give rows a
    seed of their own (e.g. a hash of example id and sample index) to make samples independent of
    the batch layout.
    """
    settings.check_vocab(cfg.vocab_size)
    rows = _prompt_rows(prompts)
    longest, count = _max_over_processes(max((r.size for r in rows), default=0), len(rows))
    multiple = settings.batch_bucket
    if mesh is not None:
        multiple = math.lcm(multiple, max(1, data_parallel_size(mesh, rules) // jax.process_count()))
    tokens, mask, n = pad_prompts(rows, settings, cfg.vocab_size, multiple, min_length=longest, min_rows=count)
    if row_seeds is not None and len(row_seeds) != n:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {n} prompts")
    seeds = np.zeros(tokens.shape[0], np.uint32)  # default: the row's index in the global batch
    seeds[:n] = (jax.process_index() * tokens.shape[0] + np.arange(n) if row_seeds is None
                 else np.asarray(row_seeds, np.int64) % 2**32)
    if mesh is None:
        inputs = {"tokens": tokens, "mask": mask, "seeds": seeds}
    else:
        inputs = host_to_global({"tokens": tokens, "mask": mask, "seeds": seeds}, mesh, rules)
    static = dict(cfg=cfg, settings=settings, mesh=mesh, rules=rules)
    cache, state = _prefill_jit(params, inputs["tokens"], inputs["mask"], inputs["seeds"], rng, **static)
    _, state = _decode_jit(params, cache, state, rng, **static)

    num_steps = int(np.asarray(state["step"].addressable_data(0)))
    state = {k: state[k] for k in ("tokens", "mask", "logprobs", "done")}
    state = jax.tree.map(np.asarray, state) if mesh is None else global_to_host(state, mesh, rules)
    out_mask = state["mask"][:n]
    return SampleOutput(
        prompt_tokens=tokens[:n], prompt_mask=mask[:n], tokens=state["tokens"][:n], response_mask=out_mask,
        logprobs=state["logprobs"][:n], finish_reason=np.where(state["done"][:n], "stop", "length"),
        lengths=out_mask.sum(-1).astype(np.int32), num_steps=num_steps)

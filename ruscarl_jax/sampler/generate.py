"""Rollouts from the policy itself, through the rollout engine (sampler/engine.py).

The sampler runs on the training parameters (same pytree), resharded once per call into the rollout
layout (`engine.rollout_params`: the compute dtype, replicated over the devices, each device a
data-parallel shard of its own); no second engine process. One call:

1. checks the prompts (token id lists of any lengths, or a left-padded (tokens, mask) pair) and gives
   each row its seed;
2. plans the engine's slots and pages (`engine.plan`, from ``settings.engine``) and runs it:
   continuous batching over a paged KV cache, or the static lockstep baseline
   (``EngineSettings(schedule="static")``);
3. returns the responses padded to R = max_new_tokens slots, with the prompts left padded to the
   bucketed width P (see `settings.bucket_length`).

Log-probs are those of the sampled token under softmax(logits / temperature) over the full vocabulary,
BEFORE top-k / top-p filtering: the quantity the GRPO update recomputes as the old log-prob. In greedy
mode they are temperature-1 log-probs.

Multi-host: every process passes its own prompts and receives its own rows; the prompt width and the
row count are agreed first, so every process runs the same programs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ruscarl_jax.models import lora, qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules
from ruscarl_jax.sampler import engine
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
    num_steps: int  # decode steps the longest row needed (< R when every row stopped early)
    decode_steps: int = 0  # decode steps the engine ran (the most of any shard of this process); the tail's
    # waste is decode_steps / num_steps - 1 (rows admitted late run past the longest row's length)


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


def generate(params: qwen.Params, cfg: qwen.QwenConfig, prompts: Prompts, rng: jax.Array, settings: SamplingSettings,
             *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, row_seeds: Sequence[int] | None = None,
             interrupt: Callable[[], bool] | None = None,
             priority: Sequence[float] | None = None) -> SampleOutput:
    """Sample a response for every prompt (token id lists of any lengths, or a left-padded (tokens, mask)).

    `rng` should be fresh per call, e.g. ``fold_step_key(base_key, step)``. With a mesh, the batch is
    sharded over the batch rule's axes and the cache's KV heads over the tensor axis where divisible.
    Several processes: each passes its own prompts and gets its own rows back (the prompt width and
    the row count are agreed on first, so every process runs the same program).
    `params` may be a LoRA state (models/lora.py): the engine samples from its (int8) base + adapters.
    `row_seeds` (one int per prompt, default: the row index) key each row's randomness; give rows a
    seed of their own (e.g. a hash of example id and sample index) to make samples independent of
    the batch layout. `interrupt` (see engine.run) can abandon the call (engine.Interrupted).
    `priority` (one number per prompt, e.g. its expected response length) admits
    higher rows first (engine.run).
    """
    settings.check_vocab(cfg.vocab_size)
    rows = _prompt_rows(prompts)
    longest, count = engine.agree(max((r.size for r in rows), default=0), len(rows))
    tokens, mask, n = pad_prompts(rows, settings, cfg.vocab_size, min_length=longest)
    rows = [np.asarray(r, np.int32) for r in _prompt_rows((tokens[:n], mask[:n]))]
    limit, r = settings.engine.max_seq_len, settings.max_new_tokens
    for i, row in enumerate(rows):
        if limit and row.size + r > limit:
            raise ValueError(f"prompts: row {i} has {row.size} tokens; with max_new_tokens {r} it needs {row.size + r}, "
                             f"more than the engine's max sequence length {limit} (rollout.engine.max_seq_len)")
    if row_seeds is not None and len(row_seeds) != n:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {n} prompts")
    seeds = (jax.process_index() * count + np.arange(n) if row_seeds is None  # default: the row's global index
             else np.asarray(row_seeds, np.int64)) % 2**32
    layout = engine.plan(cfg, settings, rows=count, longest_prompt=longest, mesh=mesh, rules=rules)
    if priority is not None and len(priority) != n:
        raise ValueError(f"priority: {len(priority)} values for {n} prompts")
    out_tokens, logprobs, stopped, stats = engine.run(lora.effective_params(params), cfg, rows, seeds.astype(np.uint32),
                                                      rng, settings, layout, mesh=mesh, rules=rules, interrupt=interrupt,
                                                      priority=priority)
    out_mask = (np.arange(r)[None, :] < np.asarray([_length(t, s, settings) for t, s in zip(out_tokens, stopped)])[:, None])
    out_mask = out_mask.astype(np.int32)
    lengths = out_mask.sum(-1).astype(np.int32)
    return SampleOutput(
        prompt_tokens=tokens[:n], prompt_mask=mask[:n], tokens=out_tokens, response_mask=out_mask, logprobs=logprobs,
        finish_reason=np.where(stopped, "stop", "length"), lengths=lengths, num_steps=int(lengths.max(initial=0)), decode_steps=stats["decode_steps"])


def _length(tokens: np.ndarray, stopped: bool, settings: SamplingSettings) -> int:
    """Response length: up to and including the first stop token, else all R tokens."""
    if not stopped:
        return settings.max_new_tokens
    return int(np.flatnonzero(np.isin(tokens, settings.stop_token_ids))[0]) + 1

"""One step's rollouts: scaffolded prompts -> sampler -> (judge) -> the GRPO training batch.

`collect` samples this process's B x G responses from the scaffolded prompts; `assemble` joins them
with the judge's grades into the rows the update trains on: the TRAINING prompt (unscaffolded by
default) left-padded to a width every process agrees on, followed by the sampled response.

Mixture-of-experts policies: when the run needs the rollout's routing (routing replay or the
routing_mismatch metric, see `rl.routing.routing_needed`), `collect` also records it: the experts each
response-scoring position was sent to, from a teacher-forced forward of the same parameters over the
sampler's own rows (scaffolded prompt + sampled response), in micro-batches of the log-prob pass's size
(`rl.routing.routing_pass`). It is taken this way, not from inside the sampler's decode loop, so the
sampler stays a pure token generator; in float32 the teacher-forced router sees the same inputs as the
decode step (up to rounding of the KV-cache path).

A rollout already sampled can be saved with a checkpoint and rebuilt on resume (`sample_arrays` /
`rollout_from_saved`): its samples, its routing and how long it took to sample, so the resumed step is
the one the uninterrupted run trained and reports the same rollout time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ruscarl_jax.data.types import Example
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import Rules, global_to_host, host_to_global
from ruscarl_jax.sampler import engine
from ruscarl_jax.sampler.generate import SampleOutput, generate
from ruscarl_jax.sampler.settings import SamplingSettings, bucket_length
from ruscarl_jax.scaffold.prompts import PromptBatch
from ruscarl_jax.trainer.config import ConfigError

logger = logging.getLogger("ruscarl_jax.trainer")


@dataclasses.dataclass
class Rollout:
    step: int
    prompts: PromptBatch
    samples: SampleOutput
    responses: list[str]
    seconds: float
    data_state: dict[str, Any]  # the data iterator's position after this step's batch
    experts: np.ndarray | None = None  # MoE: [N, L, R, K] rollout routing of the response positions

    @property
    def judge_items(self) -> list[tuple[Example, str]]:
        return [(r.example, text) for r, text in zip(self.prompts.records, self.responses)]


def collect(step: int, prompts: PromptBatch, params: qwen.Params, cfg: qwen.QwenConfig, tokenizer: Any,
            settings: SamplingSettings, rng: jax.Array, mesh: Mesh, rules: Rules, data_state: dict[str, Any], *,
            routing: Callable[..., jax.Array] | None = None, interrupt: Callable[[], bool] | None = None) -> Rollout:
    """Sample one response per scaffolded prompt of this process. `routing` (a jitted
    `rl.routing.routing_pass`, MoE runs that need it) records the rollout's routing; `interrupt` is asked
    at every engine iteration (see `generate`), and True abandons the rollout (engine.Interrupted)."""
    start = time.perf_counter()
    seeds = [row_seed(r.example_id, r.sample_index) for r in prompts.records]
    samples = generate(params, cfg, [r.sampling_ids for r in prompts.records], rng, settings, mesh=mesh, rules=rules,
                       row_seeds=seeds, interrupt=interrupt)
    if samples.num_steps:
        logger.info("rollout step %d: %d decode steps for a longest row of %d (%.2fx)", step, samples.decode_steps,
                    samples.num_steps, samples.decode_steps / samples.num_steps)
    responses = tokenizer.batch_decode([row[: n] for row, n in zip(samples.tokens, samples.lengths)],
                                       skip_special_tokens=True)
    experts = None if routing is None else rollout_routing(routing, params, samples, mesh, rules)
    return Rollout(step, prompts, samples, responses, time.perf_counter() - start, data_state, experts)


def rollout_routing(routing: Callable[..., jax.Array], params: qwen.Params, samples: SampleOutput, mesh: Mesh,
                    rules: Rules) -> np.ndarray:
    """This process's rollout routing [N, L, R, K] through `routing` (a jitted rl.routing.routing_pass):
    every process's rows form one global batch, cut inside the program into log-prob-sized micro-batches."""
    tokens = np.concatenate([samples.prompt_tokens, samples.tokens], axis=1).astype(np.int32)
    mask = np.concatenate([samples.prompt_mask, samples.response_mask], axis=1).astype(np.int32)
    batch = host_to_global({"tokens": tokens, "mask": mask}, mesh, rules)
    experts = routing(params, batch["tokens"], batch["mask"], response_len=samples.tokens.shape[1])
    return np.asarray(global_to_host(experts, mesh, rules), np.int32)


def log_kv_budget(cfg: qwen.QwenConfig, settings: SamplingSettings, rows: int, max_prompt: int, mesh: Mesh,
                  rules: Rules) -> int:
    """Plan the rollout engine for `rows` prompts per process of up to `max_prompt` tokens, log its KV
    cache bytes per device and return them. A page budget too small for one sequence fails here, before
    anything compiles, naming its config key."""
    longest = bucket_length(max_prompt, settings.prompt_bucket_min, settings.prompt_bucket_steps)
    try:
        layout = engine.plan(cfg, settings, rows=rows, longest_prompt=longest, mesh=mesh, rules=rules)
    except ValueError as err:
        raise ConfigError(f"config.{err}") from None
    total, per_device = engine.kv_cache_bytes(cfg, layout, mesh, rules)
    logger.info("rollout engine: %d slots per process over %d shards (one per device, replicated %s weights), %d pages "
                "of %d tokens per shard (%s); KV cache %.3f GB per device, %.3f GB in all", layout.slots, layout.groups,
                cfg.dtype, layout.pages_per_group, layout.page_size, settings.engine.schedule, per_device / 1e9,
                total / 1e9)
    return per_device


def row_seed(example_id: str, sample_index: int) -> int:
    """A sampling seed of the row itself (stable across runs, hosts and batch layouts)."""
    digest = hashlib.sha256(f"{example_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def across_processes(values: np.ndarray) -> np.ndarray:
    """[process_count, *values.shape]: every process's `values`, in process order (a small all-gather;
    free on one process). Every process must pass the same shape and dtype."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's JSON records (e.g. its rollout rows), in process order: the global row order.
    Every process must call it (a two-step all-gather: the byte lengths, then the padded bytes)."""
    if jax.process_count() == 1:
        return list(records)
    blob = np.frombuffer(json.dumps(records, default=_json_scalar).encode(), np.uint8)
    sizes = across_processes(np.asarray([blob.size], np.int64))[:, 0]
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[: blob.size] = blob
    everything = across_processes(padded)
    return [record for p, n in enumerate(sizes) for record in json.loads(everything[p, : int(n)].tobytes())]


def _json_scalar(value: Any) -> Any:
    """numpy / jax scalars as Python numbers (non-finite floats pass as JSON's NaN / Infinity)."""
    return value.item() if hasattr(value, "item") else str(value)


def rollout_from_saved(step: int, prompts: PromptBatch, saved: dict[str, np.ndarray], tokenizer: Any,
                       data_state: dict[str, Any]) -> Rollout:
    """The rollout of `prompts` rebuilt from saved samples (`sample_arrays`) instead of sampling again:
    how a resumed run gets back the pending rollout its checkpoint holds (with its routing and its
    sampling time when they were saved)."""
    tokens = np.asarray(saved["tokens"], np.int32)
    mask = np.asarray(saved["response_mask"], np.int32)
    n = tokens.shape[0]
    if n != len(prompts.records):
        raise ValueError(f"step {step}: the checkpoint's pending rollout has {n} rows on this process, "
                         f"the rebuilt prompts {len(prompts.records)}")
    lengths = mask.sum(axis=1).astype(np.int32)
    samples = SampleOutput(
        prompt_tokens=np.zeros((n, 0), np.int32), prompt_mask=np.zeros((n, 0), np.int32), tokens=tokens,
        response_mask=mask, logprobs=np.asarray(saved["logprobs"], np.float32),
        finish_reason=np.where(np.asarray(saved["stopped"]) > 0, "stop", "length"), lengths=lengths,
        num_steps=int(lengths.max(initial=0)))
    responses = tokenizer.batch_decode([row[: k] for row, k in zip(tokens, lengths)], skip_special_tokens=True)
    experts = np.asarray(saved["experts"], np.int32) if "experts" in saved else None
    seconds = float(np.asarray(saved["seconds"]).max(initial=0.0)) if "seconds" in saved else 0.0
    return Rollout(step, prompts, samples, responses, seconds, data_state, experts)


def sample_arrays(rollout: Rollout) -> dict[str, np.ndarray]:
    """This process's sampled rows as arrays a checkpoint can hold (the inverse of `rollout_from_saved`):
    samples, the routing of a MoE rollout that recorded it, and the sampling seconds (one per row, the
    rows' only way through a row-sharded checkpoint)."""
    samples = rollout.samples
    out = {"tokens": samples.tokens.astype(np.int32), "response_mask": samples.response_mask.astype(np.int32),
           "logprobs": samples.logprobs.astype(np.float32),
           "stopped": (np.asarray(samples.finish_reason) == "stop").astype(np.int32),
           "seconds": np.full((samples.tokens.shape[0],), rollout.seconds, np.float32)}
    if rollout.experts is not None:
        out["experts"] = rollout.experts.astype(np.int32)
    return out


def assemble(rollout: Rollout, rewards: np.ndarray, row_valid: np.ndarray, group_offset: int,
             pad_token_id: int, bucket_min: int = 64) -> dict[str, np.ndarray]:
    """This process's training rows: input_ids / attention_mask [N, P+R], response_mask [N, R],
    rewards, group_ids (globally unique: offset by this process's first group), row_valid, ratio and
    shown (the number of criteria the sampling prompt showed; both for the metrics only), and for the
    scaffold gap and the group filters: rollout_logprobs [N, R] (the sampler's, under the scaffolded
    prompt), scaffolded (1 where at least one criterion was shown: a small ratio > 0 can show none),
    truncated (finish reason 'length')."""
    records = rollout.prompts.records
    g = rollout.prompts.num_generations
    width = bucket_length(engine.agree(max(len(r.training_ids) for r in records))[0], bucket_min)
    n = len(records)
    prompt = np.full((n, width), pad_token_id, np.int32)
    prompt_mask = np.zeros((n, width), np.int32)
    for i, r in enumerate(records):
        ids = r.training_ids[-width:]
        prompt[i, width - len(ids):] = ids
        prompt_mask[i, width - len(ids):] = 1
    response_mask = rollout.samples.response_mask.astype(np.int32)
    return {
        "input_ids": np.concatenate([prompt, rollout.samples.tokens.astype(np.int32)], axis=1),
        "attention_mask": np.concatenate([prompt_mask, response_mask], axis=1),
        "response_mask": response_mask,
        "rewards": rewards.astype(np.float32),
        "group_ids": (group_offset + np.arange(n) // g).astype(np.int32),
        "row_valid": row_valid.astype(np.float32),
        "ratio": np.asarray([r.ratio for r in records], np.float32),
        "shown": np.asarray([r.num_shown for r in records], np.float32),
        "rollout_logprobs": np.where(response_mask > 0, rollout.samples.logprobs, 0.0).astype(np.float32),
        "scaffolded": np.asarray([r.num_shown > 0 for r in records], np.float32),
        "truncated": (np.asarray(rollout.samples.finish_reason) == "length").astype(np.float32),
        **({} if rollout.experts is None else {"rollout_experts": rollout.experts}),
    }

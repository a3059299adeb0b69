"""One step's rollouts: scaffolded prompts -> sampler -> (judge) -> the GRPO training batch.

`collect` samples this process's B x G responses from the scaffolded prompts; `assemble` joins them
with the judge's grades into the rows the update trains on: the TRAINING prompt (unscaffolded by
default) left-padded to a width every process agrees on, followed by the sampled response.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ruscarl_jax.data.types import Example
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import Rules
from ruscarl_jax.sampler.generate import SampleOutput, generate
from ruscarl_jax.sampler.settings import SamplingSettings, bucket_length
from ruscarl_jax.scaffold.prompts import PromptBatch


@dataclasses.dataclass
class Rollout:
    step: int
    prompts: PromptBatch
    samples: SampleOutput
    responses: list[str]
    seconds: float
    data_state: dict[str, Any]  # the data iterator's position after this step's batch

    @property
    def judge_items(self) -> list[tuple[Example, str]]:
        return [(r.example, text) for r, text in zip(self.prompts.records, self.responses)]


def collect(step: int, prompts: PromptBatch, params: qwen.Params, cfg: qwen.QwenConfig, tokenizer: Any,
            settings: SamplingSettings, rng: jax.Array, mesh: Mesh, rules: Rules, data_state: dict[str, Any]) -> Rollout:
    """Sample one response per scaffolded prompt of this process."""
    start = time.perf_counter()
    seeds = [row_seed(r.example_id, r.sample_index) for r in prompts.records]
    samples = generate(params, cfg, [r.sampling_ids for r in prompts.records], rng, settings, mesh=mesh, rules=rules,
                       row_seeds=seeds)
    responses = tokenizer.batch_decode([row[: n] for row, n in zip(samples.tokens, samples.lengths)],
                                       skip_special_tokens=True)
    return Rollout(step, prompts, samples, responses, time.perf_counter() - start, data_state)


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


def global_max(value: int) -> int:
    """The largest `value` over all processes."""
    return int(np.max(across_processes(np.asarray([value], np.int64))))


def rollout_from_saved(step: int, prompts: PromptBatch, saved: dict[str, np.ndarray], tokenizer: Any,
              data_state: dict[str, Any]) -> Rollout:
    """The rollout of `prompts` rebuilt from saved samples (`sample_arrays`) instead of sampling again:
    how a resumed overlap run gets back the pending rollout its checkpoint holds."""
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
    return Rollout(step, prompts, samples, responses, 0.0, data_state)


def sample_arrays(samples: SampleOutput) -> dict[str, np.ndarray]:
    """This process's sampled rows as arrays a checkpoint can hold (the inverse of `rollout_from_saved`)."""
    return {"tokens": samples.tokens.astype(np.int32), "response_mask": samples.response_mask.astype(np.int32),
            "logprobs": samples.logprobs.astype(np.float32),
            "stopped": (np.asarray(samples.finish_reason) == "stop").astype(np.int32)}


def assemble(rollout: Rollout, rewards: np.ndarray, row_valid: np.ndarray, group_offset: int,
             pad_token_id: int, bucket_min: int = 64) -> dict[str, np.ndarray]:
    """This process's training rows: input_ids / attention_mask [N, P+R], response_mask [N, R],
    rewards, group_ids (globally unique: offset by this process's first group), row_valid, ratio, and for
    the scaffold gap and the group filters: rollout_logprobs [N, R] (the sampler's, under the scaffolded
    prompt), scaffolded (1 where the reveal ratio is > 0, as in the reward_scaffolded_mean metric),
    truncated (finish reason 'length')."""
    records = rollout.prompts.records
    g = rollout.prompts.num_generations
    width = bucket_length(global_max(max(len(r.training_ids) for r in records)), bucket_min)
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
        "rollout_logprobs": np.where(response_mask > 0, rollout.samples.logprobs, 0.0).astype(np.float32),
        "scaffolded": np.asarray([r.ratio > 0 for r in records], np.float32),
        "truncated": (np.asarray(rollout.samples.finish_reason) == "length").astype(np.float32),
    }

"""One step's rollouts: scaffolded prompts -> sampler -> (judge) -> the GRPO training batch.

`collect` samples this process's B x G responses from the scaffolded prompts; `assemble` joins them
with the judge's grades into the rows the update trains on: the TRAINING prompt (unscaffolded by
default) left-padded to a width every process agrees on, followed by the sampled response.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ruscarl_jax.data.types import Example
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import Rules
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
    logger.info("rollout engine: %d slots per process, %d pages of %d tokens per data-parallel shard (%s); "
                "KV cache %.3f GB per device, %.3f GB in all", layout.slots, layout.pages_per_group, layout.page_size,
                settings.engine.schedule, per_device / 1e9, total / 1e9)
    return per_device


def row_seed(example_id: str, sample_index: int) -> int:
    """A sampling seed of the row itself (stable across runs, hosts and batch layouts)."""
    digest = hashlib.sha256(f"{example_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def global_max(value: int) -> int:
    """The largest `value` over all processes (a tiny all-gather; free on one process)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def assemble(rollout: Rollout, rewards: np.ndarray, row_valid: np.ndarray, group_offset: int,
             pad_token_id: int, bucket_min: int = 64) -> dict[str, np.ndarray]:
    """This process's training rows: input_ids / attention_mask [N, P+R], response_mask [N, R],
    rewards, group_ids (globally unique: offset by this process's first group), row_valid, ratio."""
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
    }

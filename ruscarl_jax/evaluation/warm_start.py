"""Warm start by supervised fine-tuning on scaffolded demonstrations of the synthetic key-word task.

The exploration-bottleneck experiment needs a policy that follows a scaffold (it writes the key words
a system message lists) but knows no topic's hidden rubric. The demonstrations are built from the
scaffold itself: each warm-start example gets `group_size` prompts with the in-group linear reveal
(all criteria, then fewer, then none), rendered by `scaffold.prompts.build_prompts` exactly as
rollouts are; the target answer is `synthetic.demonstration` (the shown key words, random fill).
The examples' topics and rubrics are disjoint from the task's (see
`synthetic.make_warm_start_examples`), so what is learned is the instruction following only.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.types import Example
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, host_to_global, replicate_unsharded
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.sft import SFTSettings, make_sft_step
from ruscarl_jax.sampler.settings import bucket_length
from ruscarl_jax.scaffold.prompts import build_prompts
from ruscarl_jax.scaffold.settings import ScaffoldSettings

logger = logging.getLogger(__name__)
Pair = tuple[np.ndarray, np.ndarray]  # (prompt ids, response ids ending with the end-of-turn token)


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
    """steps optimizer updates of batch_size demonstrations (drawn without replacement per epoch)."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    micro_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"WarmStartSettings.{name}={getattr(self, name)!r}: must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"WarmStartSettings.micro_batch_size={self.micro_batch_size} must divide "
                             f"batch_size={self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"WarmStartSettings.learning_rate={self.learning_rate!r}: must be > 0")


def demonstration_pairs(examples: Sequence[Example], tokenizer: Any, scaffold: ScaffoldSettings, group_size: int,
                        end_token_id: int, seed: int = 0) -> list[Pair]:
    """`group_size` (scaffolded prompt, demonstration) token pairs per example, reveal ratios 1 .. 0.

    `scaffold` supplies the wording and warning; its rule is replaced by the in-group linear decay
    without a step factor, and nothing is added to a prompt that shows no criterion (as in a
    RuscaRL rollout with add_base_when_zero=False)."""
    settings = dataclasses.replace(scaffold, rule="linear", add_base_when_zero=False)
    batch = build_prompts(list(examples), group_size, None, None, settings, seed, tokenizer)
    rng = np.random.default_rng([seed, 3])
    pairs = []
    for record in batch.records:
        text = synthetic.demonstration(record.example, record.shown_indices, rng)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [end_token_id]
        pairs.append((np.asarray(record.sampling_ids, np.int32), np.asarray(response, np.int32)))
    return pairs


def sft_batch(pairs: Sequence[Pair], prompt_width: int, response_width: int, pad_id: int) -> dict[str, np.ndarray]:
    """The SFT step's layout: prompts left padded to prompt_width, responses right padded."""
    n = len(pairs)
    ids = np.full((n, prompt_width + response_width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    response_mask = np.zeros((n, response_width), np.int32)
    for i, (prompt, response) in enumerate(pairs):
        if prompt.size > prompt_width or response.size > response_width:
            raise ValueError(f"pair {i}: prompt {prompt.size} / response {response.size} tokens exceed the widths "
                             f"{prompt_width} / {response_width}")
        ids[i, prompt_width - prompt.size:prompt_width] = prompt
        ids[i, prompt_width:prompt_width + response.size] = response
        mask[i, prompt_width - prompt.size:prompt_width + response.size] = 1
        response_mask[i, :response.size] = 1
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask}


def warm_start(params: qwen.Params, cfg: qwen.QwenConfig, pairs: Sequence[Pair], settings: WarmStartSettings, *,
               pad_id: int, mesh: Mesh, rules: Rules = DEFAULT_RULES, bucket_min: int = 64,
               log_every: int = 0) -> tuple[qwen.Params, list[float]]:
    """Fine-tune `params` on the pairs; returns the new params and the loss of every update
    (logged every `log_every` updates when > 0)."""
    if len(pairs) < settings.batch_size:
        raise ValueError(f"warm start: {len(pairs)} demonstrations, fewer than batch_size={settings.batch_size}")
    prompt_width = bucket_length(max(p.size for p, _ in pairs), bucket_min)
    response_width = max(r.size for _, r in pairs)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=settings.learning_rate, weight_decay=0.0))
    opt_state = replicate_unsharded(jax.jit(optimizer.init)(params), mesh)
    step = make_sft_step(qwen_policy(cfg, mesh, rules), SFTSettings(micro_batch_size=settings.micro_batch_size,
                                                                    logprob_chunk_size=response_width), optimizer)
    rng = np.random.default_rng([settings.seed, 4])
    order, cursor, losses = rng.permutation(len(pairs)), 0, []
    for number in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(order):
            order, cursor = rng.permutation(len(pairs)), 0
        chosen = [pairs[i] for i in order[cursor:cursor + settings.batch_size]]
        cursor += settings.batch_size
        batch = host_to_global(sft_batch(chosen, prompt_width, response_width, pad_id), mesh, rules)
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
        if log_every and number % log_every == 0:
            logger.info("warm start step %d/%d: loss %.4f", number, settings.steps, float(np.mean(losses[-log_every:])))
    return params, losses

"""N sampled responses per example from the policy, with the in-framework sampler.

The prompt is the example's own conversation (never a scaffold) rendered with the tokenizer's chat
template. Rows are sorted by prompt length and generated in batches of a fixed row count, so one
compiled program serves every batch of the same prompt-width bucket; each batch draws from its own key.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ruscarl_jax.data.types import Example
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules
from ruscarl_jax.sampler.generate import generate
from ruscarl_jax.sampler.settings import SamplingSettings
from ruscarl_jax.scaffold.prompts import render_prompt


def prompt_ids(tokenizer: Any, examples: Sequence[Example], max_prompt_length: int | None = None) -> list[np.ndarray]:
    """Each example's unscaffolded prompt as token ids; a prompt over the limit is an error naming it."""
    texts = [render_prompt(tokenizer, ex.messages) for ex in examples]
    ids = [np.asarray(x, np.int32) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if max_prompt_length is not None:
        for ex, row in zip(examples, ids):
            if row.size > max_prompt_length:
                raise ValueError(f"example {ex.id!r}: prompt of {row.size} tokens exceeds max_prompt_length={max_prompt_length}")
    return ids


def sample_responses(params: qwen.Params, cfg: qwen.QwenConfig, tokenizer: Any, examples: Sequence[Example],
                     num_samples: int, settings: SamplingSettings, rng: jax.Array, *, batch_size: int = 64,
                     max_prompt_length: int | None = None, mesh: Mesh | None = None,
                     rules: Rules = DEFAULT_RULES) -> list[list[str]]:
    """`num_samples` decoded responses for every example: result[i][k] is sample k of examples[i]."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = prompt_ids(tokenizer, examples, max_prompt_length)
    rows = [(i, k) for i in range(len(examples)) for k in range(num_samples)]
    rows.sort(key=lambda row: ids[row[0]].size)  # similar widths share a batch
    settings = dataclasses.replace(settings, batch_bucket=min(batch_size, len(rows)))
    out: list[list[str]] = [[""] * num_samples for _ in examples]
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        samples = generate(params, cfg, [ids[i] for i, _ in chunk], jax.random.fold_in(rng, b), settings,
                           mesh=mesh, rules=rules)
        texts = tokenizer.batch_decode([t[:n] for t, n in zip(samples.tokens, samples.lengths)], skip_special_tokens=True)
        for (i, k), text in zip(chunk, texts):
            out[i][k] = text
    return out

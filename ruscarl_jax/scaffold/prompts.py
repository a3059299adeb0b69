"""Scaffolded sampling prompts and training prompts for a batch of examples, rendered and tokenized.

The trainer's call, once per batch from the data pipeline:

    batch = build_prompts(examples, num_generations, step, total_steps, settings, seed, tokenizer,
                          max_prompt_length=4096, length_policy="drop")
    batch.records  # B' * G records, example-major: records[i * G + k] is sample k of batch.examples[i]

Each prompt is the tokenizer's own chat template applied at the message level
(`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`), then tokenized without
adding special tokens a second time. The training prompt is the original conversation (the reference
trains on the unscaffolded prompt) unless `settings.participate_training`, then it is the sampling one.
Note that a template with a default system message (Qwen2.5's) adds it to the unscaffolded prompt but
not to a scaffolded one, whose scaffold is the system message.

Length policy, measured on the longest prompt (sampling or training) of an example's G samples:
"drop" (default) leaves the whole example out and records its id in `dropped_ids`; "error" raises
ValueError naming the example; "truncate_left" keeps the last `max_prompt_length` tokens of each long
prompt (this cuts the start of the conversation, the system message first).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from ruscarl_jax.data.types import Example, Message
from ruscarl_jax.scaffold.plan import plan_example
from ruscarl_jax.scaffold.settings import ScaffoldSettings

logger = logging.getLogger(__name__)

LENGTH_POLICIES: tuple[str, ...] = ("drop", "error", "truncate_left")


@dataclasses.dataclass(frozen=True, eq=False)
class PromptRecord:
    """One (example, sample). Token ids are 1-D int32 arrays, unpadded."""

    example: Example
    sample_index: int
    ratio: float
    shown_indices: tuple[int, ...]
    system_message: str | None
    sampling_messages: tuple[Message, ...]
    sampling_ids: np.ndarray
    training_messages: tuple[Message, ...]
    training_ids: np.ndarray
    truncated: bool = False

    @property
    def example_id(self) -> str:
        return self.example.id

    @property
    def num_shown(self) -> int:
        """How many criteria the sampling prompt shows (0: unscaffolded, whatever the ratio)."""
        return len(self.shown_indices)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """The records of the kept examples (example-major), and what the length policy did."""

    records: list[PromptRecord]
    examples: list[Example]
    num_generations: int
    dropped_ids: tuple[str, ...] = ()
    num_truncated: int = 0

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_ids)


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The prompt text of a conversation through the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template([m.to_dict() for m in messages], tokenize=False,
                                         add_generation_prompt=True)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


def build_prompts(examples: Sequence[Example], num_generations: int, step: int | None, total_steps: int | None,
                  settings: ScaffoldSettings, seed: int, tokenizer: Any, max_prompt_length: int | None = None,
                  length_policy: str = "drop") -> PromptBatch:
    """Scaffold, render and tokenize `num_generations` samples of each example (see the module doc)."""
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy must be one of {', '.join(LENGTH_POLICIES)}, got {length_policy!r}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length!r}")
    plans = [plan_example(ex, num_generations, step, total_steps, settings, seed) for ex in examples]

    # Render every distinct conversation once (training prompts repeat G times, full reveals often do).
    texts: dict[tuple[Message, ...], str] = {}
    for ex, ex_plans in zip(examples, plans):
        for conv in [ex.messages, *(p.messages for p in ex_plans)]:
            if conv not in texts:
                texts[conv] = render_prompt(tokenizer, conv)
    token_ids = dict(zip(texts, _tokenize(tokenizer, list(texts.values()))))

    records: list[PromptRecord] = []
    kept: list[Example] = []
    dropped: list[str] = []
    num_truncated = 0
    for ex, ex_plans in zip(examples, plans):
        pairs = []
        for plan in ex_plans:
            train_messages = plan.messages if settings.participate_training else ex.messages
            pairs.append((plan, train_messages, token_ids[plan.messages], token_ids[train_messages]))
        longest = max(max(len(s), len(t)) for _, _, s, t in pairs)
        too_long = max_prompt_length is not None and longest > max_prompt_length
        if too_long and length_policy == "drop":
            dropped.append(ex.id)
            continue
        if too_long and length_policy == "error":
            raise ValueError(f"example {ex.id!r}: prompt of {longest} tokens exceeds max_prompt_length "
                             f"{max_prompt_length} (length_policy='error')")
        kept.append(ex)
        for plan, train_messages, sample_ids, train_ids in pairs:
            cut = too_long and max(len(sample_ids), len(train_ids)) > max_prompt_length
            if cut:
                sample_ids, train_ids = sample_ids[-max_prompt_length:], train_ids[-max_prompt_length:]
                num_truncated += 1
            records.append(PromptRecord(
                example=ex, sample_index=plan.sample_index, ratio=plan.ratio, shown_indices=plan.shown_indices,
                system_message=plan.system_message, sampling_messages=plan.messages, sampling_ids=sample_ids,
                training_messages=train_messages, training_ids=train_ids, truncated=cut))
    if dropped:
        logger.warning("dropped %d of %d examples longer than max_prompt_length=%s", len(dropped),
                       len(examples), max_prompt_length)
    return PromptBatch(records=records, examples=kept, num_generations=num_generations,
                       dropped_ids=tuple(dropped), num_truncated=num_truncated)

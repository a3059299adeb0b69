"""Warm start from an SFT dataset: fine-tune the initial policy on demonstrations before RL, cached.

config.warm_start.path names a JSONL file of demonstrations, one per line:
``{"prompt": [{"role": ..., "content": ...}, ...], "response": "..."}``. The prompt is rendered with the
tokenizer's chat template (so a demonstration may carry a scaffold as its system message), the
response is followed by the end-of-turn token, and `rl/sft.py`'s step trains on the response tokens
for `steps` updates of `batch_size` rows. The result is saved as a Hugging Face checkpoint in
``cache_dir/<key>``, the key hashing everything that determines it (model section, warm-start
settings, the demonstrations' and tasks' contents), so a second run loads it in a second. The
reference policy of the RL run is the warm-started one. Several processes: each fine-tunes (the
same, deterministic), process 0 writes, all load it; so cache_dir must be a filesystem they share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ruscarl_jax.data.types import Message
from ruscarl_jax.models import hf_io, qwen
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, host_to_global
from ruscarl_jax.rl.optimizer import OptimizerSettings, init_opt_state, make_optimizer
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.sft import SFTSettings, make_sft_step
from ruscarl_jax.sampler.settings import bucket_length
from ruscarl_jax.scaffold.prompts import render_prompt

logger = logging.getLogger("ruscarl_jax.trainer")
Pair = tuple[np.ndarray, np.ndarray]  # (prompt ids, response ids ending with the end-of-turn token)
Demonstration = tuple[tuple[Message, ...], str]


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
    """steps optimizer updates of batch_size demonstrations (drawn without replacement per epoch);
    seed: the order of the demonstrations and, for model.source='tiny', the initial parameters."""

    path: str = ""
    steps: int = 300
    batch_size: int = 64
    micro_batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    cache_dir: str = "~/.cache/ruscarl_jax/warm_start"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"WarmStartSettings.{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"WarmStartSettings.micro_batch_size={self.micro_batch_size} must divide "
                             f"batch_size={self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"WarmStartSettings.learning_rate={self.learning_rate!r}: must be > 0")
        if self.path and not self.cache_dir:
            raise ValueError("WarmStartSettings.cache_dir: required when a warm-start path is set")


def load_demonstrations(path: str | os.PathLike) -> list[Demonstration]:
    """The (prompt messages, response) rows of a demonstrations JSONL file; errors name file and line."""
    path = pathlib.Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str) or not row["response"]:
            raise ValueError(f"{where}: needs a non-empty string 'response'")
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
            raise ValueError(f"{where}: 'prompt' must be a non-empty list of {{'role', 'content'}} messages")
        rows.append((tuple(Message(m["role"], m["content"]) for m in prompt), row["response"]))
    if not rows:
        raise ValueError(f"{path}: no demonstrations")
    return rows


def demonstration_pairs(rows: Sequence[Demonstration], tokenizer: Any, end_token_id: int) -> list[Pair]:
    """Token ids of each (chat-template prompt, response + end-of-turn)."""
    pairs = []
    for messages, response in rows:
        prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_token_id]
        pairs.append((np.asarray(prompt, np.int32), np.asarray(answer, np.int32)))
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


def fine_tune(params: qwen.Params, cfg: qwen.QwenConfig, pairs: Sequence[Pair], settings: WarmStartSettings, *,
              pad_id: int, mesh: Mesh, rules: Rules = DEFAULT_RULES, bucket_min: int = 16,
              log_every: int = 100) -> tuple[qwen.Params, list[float]]:
    """Fine-tune `params` on the pairs; returns the new params and the loss of every update."""
    if len(pairs) < settings.batch_size:
        raise ValueError(f"warm start: {len(pairs)} demonstrations, fewer than batch_size={settings.batch_size}")
    prompt_width = bucket_length(max(p.size for p, _ in pairs), bucket_min)
    response_width = max(r.size for _, r in pairs)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=settings.learning_rate, weight_decay=0.0))
    opt_state = init_opt_state(optimizer, params)
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


def _digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(os.fspath(path)).read_bytes()).hexdigest()


def cache_directory(config: ml_collections.ConfigDict, settings: WarmStartSettings, extra: Sequence[str] = ()) -> pathlib.Path:
    """cache_dir/<key>: the key covers the model section, the warm-start settings (not cache_dir), the
    demonstrations file's contents and `extra` (e.g. what the tiny tokenizer is built from)."""
    from ruscarl_jax.trainer.config import resolve_path

    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("path", "cache_dir")}
    blob = json.dumps({"model": config.model.to_dict(), "warm_start": fields,
                       "demonstrations": _digest(resolve_path(settings.path)), "extra": list(extra)},
                      sort_keys=True, default=str)
    return pathlib.Path(os.fspath(resolve_path(settings.cache_dir))) / hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_and_save(directory: pathlib.Path, params: qwen.Params, cfg: qwen.QwenConfig, tokenizer: Any,
                   settings: WarmStartSettings, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """Fine-tune on settings.path's demonstrations and save the result as an HF checkpoint in `directory`
    (written beside it, then renamed, so an interrupted build leaves no half checkpoint)."""
    from ruscarl_jax.trainer.config import resolve_path
    from ruscarl_jax.trainer.setup import stop_token_ids

    rows = load_demonstrations(os.fspath(resolve_path(settings.path)))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end >= 0 and end != tokenizer.unk_token_id else stop_token_ids(tokenizer)[0]
    pairs = demonstration_pairs(rows, tokenizer, end)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    logger.info("warm start: %d SFT steps on %d demonstrations from %s (cached in %s)", settings.steps, len(pairs),
                settings.path, directory)
    started = time.perf_counter()
    params, losses = fine_tune(params, cfg, pairs, settings, pad_id=pad, mesh=mesh, rules=rules)
    partial = directory.with_name(directory.name + f".partial-{os.getpid()}")
    hf_io.save_checkpoint(partial, params, cfg, tokenizer=tokenizer)
    info = {"demonstrations": len(pairs), "steps": settings.steps, "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": time.perf_counter() - started}
    if jax.process_index() == 0:
        (partial / "warm_start.json").write_text(json.dumps(info, indent=2))
        if directory.exists():  # another run finished it first
            shutil.rmtree(partial)
        else:
            partial.rename(directory)
    return info

"""Supervised fine-tuning step for warm starts: token-mean cross-entropy on response tokens.

Same batch layout (prompt left-padded to P, response right-padded to R), the same chunked log-probs,
micro-batching with gradient accumulation and non-finite guard as the GRPO step; one optimizer
update per call over the whole batch.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ruscarl_jax.rl.accumulate import Batch, accumulate_gradients, apply_if_finite, split_rows
from ruscarl_jax.rl.logprobs import response_logprobs
from ruscarl_jax.rl.losses import Normalizers, normalizers
from ruscarl_jax.rl.optimizer import cast_floating, last_learning_rate
from ruscarl_jax.rl.policy import Params, Policy
from ruscarl_jax.rl.settings import COMPUTE_DTYPES


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """micro_batch_size: rows per forward/backward (divides the batch); logprob_chunk_size: response
    positions per log-prob chunk; compute_dtype: cast of the float32 master parameters."""

    micro_batch_size: int = 8
    logprob_chunk_size: int = 256
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"SFTSettings.micro_batch_size={self.micro_batch_size!r}: must be >= 1")
        if self.logprob_chunk_size < 1:
            raise ValueError(f"SFTSettings.logprob_chunk_size={self.logprob_chunk_size!r}: must be >= 1")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"SFTSettings.compute_dtype={self.compute_dtype!r}: valid: {list(COMPUTE_DTYPES)}")


def check_sft_batch(batch: Mapping[str, Any], micro_batch_size: int) -> None:
    """Raise ValueError naming the key when an SFT batch is missing a field or is mis-shaped."""
    for key in ("input_ids", "attention_mask", "response_mask"):
        if key not in batch:
            raise ValueError(f"SFT batch: missing key '{key}'; it has {sorted(batch)}")
    ids = np.shape(batch["input_ids"])
    if len(ids) != 2:
        raise ValueError(f"SFT batch: 'input_ids' must be [rows, prompt+response], got shape {ids}")
    if np.shape(batch["attention_mask"]) != ids:
        raise ValueError(f"SFT batch: 'attention_mask' has shape {np.shape(batch['attention_mask'])}, expected {ids}")
    resp = np.shape(batch["response_mask"])
    if len(resp) != 2 or resp[0] != ids[0] or not 0 < resp[1] < ids[1]:
        raise ValueError(f"SFT batch: 'response_mask' has shape {resp}; expected [{ids[0]}, R] with 0 < R < {ids[1]}")
    if ids[0] % micro_batch_size:
        raise ValueError(f"SFT batch has {ids[0]} rows; SFTSettings.micro_batch_size={micro_batch_size} must divide it")


def sft_loss(params: Params, micro: Batch, norm: Normalizers, *, policy: Policy,
             settings: SFTSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the batch's token-mean negative log-likelihood."""
    mask = micro["loss_mask"]
    hidden = policy.hidden(params, micro["input_ids"], micro["attention_mask"])
    logp, _ = response_logprobs(hidden, policy.unembed(params), micro["input_ids"], mask.shape[1],
                                chunk_size=settings.logprob_chunk_size)
    nll = -jnp.sum(jnp.where(mask > 0, logp * mask, 0.0)) / jnp.maximum(norm.num_tokens, 1.0)
    return nll, {}


def sft_update(params: Params, opt_state: optax.OptState, batch: Batch, *, policy: Policy, settings: SFTSettings,
               optimizer: optax.GradientTransformation) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """One optimizer update on the response-token cross-entropy of `batch`. Pure."""
    mask = batch["response_mask"].astype(jnp.float32)
    if "row_valid" in batch:
        mask = mask * (jnp.asarray(batch["row_valid"]) != 0)[:, None]
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "loss_mask": mask}
    norm = normalizers(mask)
    cparams = params if settings.compute_dtype == "float32" else cast_floating(params, settings.compute_dtype)
    grads, stats = accumulate_gradients(
        functools.partial(sft_loss, norm=norm, policy=policy, settings=settings), cparams,
        split_rows(rows, settings.micro_batch_size), policy.shard_rows)
    params, opt_state, applied, grad_norm = apply_if_finite(optimizer, params, opt_state, grads, stats["loss"])
    metrics = {"loss": stats["loss"], "grad_norm": grad_norm, "lr": last_learning_rate(opt_state),
               "skipped_updates": 1.0 - applied.astype(jnp.float32), "response_tokens": norm.num_tokens}
    return params, opt_state, metrics


def make_sft_step(policy: Policy, settings: SFTSettings, optimizer: optax.GradientTransformation, *,
                  donate: bool = True, compiler_options: Mapping[str, Any] | None = None,
                  ) -> Callable[..., tuple[Params, optax.OptState, dict[str, jax.Array]]]:
    """step(params, opt_state, batch) -> (params, opt_state, metrics), jitted, batch checked first."""
    update = jax.jit(functools.partial(sft_update, policy=policy, settings=settings, optimizer=optimizer),
                     donate_argnums=(0, 1) if donate else (),
                     compiler_options=dict(compiler_options) if compiler_options else None)

    def step(params: Params, opt_state: optax.OptState, batch: Mapping[str, Any]):
        check_sft_batch(batch, settings.micro_batch_size)
        return update(params, opt_state, dict(batch))

    return step

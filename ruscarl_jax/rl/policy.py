"""What the update steps need from a model: final hidden states, the output embedding, and a mesh.

The steps are written against this small interface, so they run on the Flax Qwen decoder
(``qwen_policy``) or on any other function of (params, tokens, mask), such as a toy policy in a test.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, constrain

Params = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Policy:
    """hidden(params, tokens [B, T], attention_mask [B, T]) -> final hidden states [B, T, E];
    unembed(params) -> [E, V] (logits = hidden @ unembed). With a mesh, each micro-batch's rows are
    pinned to the rules' 'batch' axes, so data parallelism splits every micro-batch across devices.

    routed (mixture-of-experts models only): routed(params, tokens, mask, forced_experts | None) ->
    (hidden, routing), where forced_experts / routing["experts"] are [B, L, T, K] expert ids (-1 =
    the router chooses) and routing holds the scalar router metrics (models.moe.summarize).

    packed (optional): packed(params, tokens [B, T], segment_ids [B, T], positions [B, T]) -> hidden
    states of packed rows (``rl.packing``), for GRPOSettings.micro_token_budget.

    split(params) -> (trainable, frozen) and join(trainable, frozen) -> params: the update differentiates
    and optimizes the trainable part only (all of it by default; a LoRA state's adapters, models/lora.py).
    reference(params): the KL reference computed from the params themselves (a LoRA state's base with
    the adapters off), or None when the trainer must keep a frozen copy."""

    hidden: Callable[[Params, jax.Array, jax.Array], jax.Array]
    unembed: Callable[[Params], jax.Array]
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    routed: Callable[[Params, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]] | None = None
    packed: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    split: Callable[[Params], tuple[Params, Any]] = lambda params: (params, None)
    join: Callable[[Params, Any], Params] = lambda trainable, frozen: trainable
    reference: Callable[[Params], Params | None] = lambda params: None

    def shard_rows(self, batch: Batch) -> Batch:
        """Constrain every [rows, ...] leaf of a (micro-)batch to be split over the batch axes."""
        if self.mesh is None:
            return batch
        return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1), self.mesh, self.rules), batch)


def qwen_policy(cfg: Any, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Policy:
    """The Flax Qwen decoder (ruscarl_jax.models.qwen) as a Policy; cfg.remat sets its remat policy.
    The params may be plain model params or a LoRA state (models/lora.py: adapters trained, base frozen,
    the KL reference the base with the adapters off)."""
    from ruscarl_jax.models import lora, qwen

    routed = None
    if cfg.is_moe:
        def routed(params, tokens, mask, forced):
            return qwen.forward_routed(lora.effective_params(params), cfg, tokens, mask, forced_experts=forced,
                                       mesh=mesh, rules=rules)

    def packed(params, tokens, segment_ids, positions):
        return qwen.forward(lora.effective_params(params), cfg, tokens, (segment_ids > 0).astype(jnp.int32), positions,
                            segment_ids=segment_ids, mesh=mesh, rules=rules)

    return Policy(
        hidden=lambda params, tokens, mask: qwen.forward(lora.effective_params(params), cfg, tokens, mask,
                                                         mesh=mesh, rules=rules),
        packed=None if cfg.is_moe else packed,
        unembed=lambda params: qwen.output_embedding(lora.effective_params(params), cfg),
        mesh=mesh, rules=rules, routed=routed, split=lora.split, join=lora.join, reference=lora.reference)

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
    states of packed rows (``rl.packing``), for GRPOSettings.micro_token_budget."""

    hidden: Callable[[Params, jax.Array, jax.Array], jax.Array]
    unembed: Callable[[Params], jax.Array]
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    routed: Callable[[Params, jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]] | None = None
    packed: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array] | None = None

    def shard_rows(self, batch: Batch) -> Batch:
        """Constrain every [rows, ...] leaf of a (micro-)batch to be split over the batch axes."""
        if self.mesh is None:
            return batch
        return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1), self.mesh, self.rules), batch)


def qwen_policy(cfg: Any, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Policy:
    """The Flax Qwen decoder (ruscarl_jax.models.qwen) as a Policy; cfg.remat sets its remat policy."""
    from ruscarl_jax.models import qwen

    routed = None
    if cfg.is_moe:
        def routed(params, tokens, mask, forced):
            return qwen.forward_routed(params, cfg, tokens, mask, forced_experts=forced, mesh=mesh, rules=rules)
    def packed(params, tokens, segment_ids, positions):
        return qwen.forward(params, cfg, tokens, (segment_ids > 0).astype(jnp.int32), positions,
                            segment_ids=segment_ids, mesh=mesh, rules=rules)

    return Policy(
        hidden=lambda params, tokens, mask: qwen.forward(params, cfg, tokens, mask, mesh=mesh, rules=rules),
        packed=None if cfg.is_moe else packed,
        unembed=lambda params: qwen.output_embedding(params, cfg),
        mesh=mesh, rules=rules, routed=routed)

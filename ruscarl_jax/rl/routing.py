"""The rollout's MoE routing pass: which experts each response-scoring position of a rollout row was sent to.

Routing replay (``GRPOSettings.routing_replay``) forces the update's forwards onto these experts and the
``routing_mismatch`` metric compares them with the update's own router. Both need a teacher-forced
forward over the sampler's own rows (scaffolded prompt + sampled response) with the rollout's
parameters, which costs about one log-prob pass; `routing_needed` says when a run pays for it.

`routing_pass` is that forward as one pure function over the whole rollout batch, cut into micro-batches
of ``logprob_rows`` rows (counted over all processes, like the log-prob pass, so each device holds
logprob_rows / data-parallel rows at a time); `make_routing_pass` jits it. The memory planner lowers the
same function by name.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from ruscarl_jax.rl.accumulate import split_rows
from ruscarl_jax.rl.policy import Params, Policy
from ruscarl_jax.rl.settings import GRPOSettings


def routing_needed(policy_is_moe: bool, settings: GRPOSettings) -> bool:
    """Whether the rollout's routing is recorded: a MoE policy with routing replay or the mismatch metric on."""
    return bool(policy_is_moe) and (settings.routing_replay or settings.routing_mismatch_metric)


def routing_pass(params: Params, tokens: jax.Array, mask: jax.Array, *, policy: Policy, settings: GRPOSettings,
                 response_len: int) -> jax.Array:
    """Rollout routing [N, L, R, K] (int32) of rows tokens / mask [N, P+R]: the experts of the states at
    P-1 .. P+R-2, the ones that score response tokens 0 .. R-1, with R = response_len."""
    if policy.routed is None:
        raise ValueError("routing_pass: the policy is dense (no mixture-of-experts layer)")
    total = tokens.shape[1]

    def one(micro: dict[str, jax.Array]) -> jax.Array:
        micro = policy.shard_rows(micro)
        _, routing = policy.routed(params, micro["tokens"], micro["mask"], None)
        return routing["experts"][:, :, total - response_len - 1: total - 1].astype("int32")

    experts = jax.lax.map(one, split_rows({"tokens": tokens, "mask": mask}, settings.logprob_rows))
    return experts.reshape((-1,) + experts.shape[2:])


def make_routing_pass(policy: Policy, settings: GRPOSettings) -> Callable[..., jax.Array]:
    """routing(params, tokens, mask, response_len=R) -> [N, L, R, K], jitted (R static)."""
    return jax.jit(functools.partial(routing_pass, policy=policy, settings=settings), static_argnames=("response_len",))


def experts_shape(cfg: Any, rows: int, response_len: int) -> tuple[int, int, int, int]:
    """Shape of a rollout routing array: [rows, layers (-1 ids in dense ones), response_len, top_k]."""
    return rows, int(cfg.num_layers), response_len, int(cfg.num_experts_per_tok)

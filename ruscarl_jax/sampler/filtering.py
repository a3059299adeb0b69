"""Temperature, top-k and top-p (nucleus) filtering and sampling of next tokens, as pure jnp.

Order: logits are divided by the temperature; top-k keeps the k largest; top-p then keeps the
smallest prefix of the remaining tokens, in descending probability under the renormalised top-k
distribution, whose mass is >= p (always at least the most likely token). Ties are broken toward
the lower token id everywhere (``lax.top_k`` is stable), so the kept set is deterministic.

Sampling happens in the sorted candidate space (``lax.top_k`` over k, or the whole vocabulary when
only top-p is on), so no vocabulary-sized scatter is needed per decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def scale_logits(logits: jax.Array, temperature: float) -> jax.Array:
    """float32 logits / temperature."""
    return logits.astype(jnp.float32) / jnp.float32(temperature)


def sorted_candidates(logits: jax.Array, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array]:
    """(values, token ids) [..., K] in descending order, lower id first among ties, with values of
    tokens that top-k / top-p remove set to -inf. K = top_k when top-k is on, else the vocabulary."""
    vocab = logits.shape[-1]
    k = vocab if top_k <= 0 else min(int(top_k), vocab)
    values, ids = jax.lax.top_k(logits, k)
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        mass_before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
        keep = mass_before < jnp.float32(top_p)
        keep = keep.at[..., 0].set(True)
        values = jnp.where(keep, values, -jnp.inf)
    return values, ids


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature-scaled logits [..., V] with every token that top-k / top-p removes set to -inf.

    ``softmax`` of the result is the distribution `sample_tokens` draws from.
    """
    scaled = scale_logits(logits, temperature)
    if top_k <= 0 and top_p >= 1.0:
        return scaled
    values, ids = sorted_candidates(scaled, top_k, top_p)
    flat_values = values.reshape(-1, values.shape[-1])
    flat_ids = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    out = jnp.full((flat_ids.shape[0], logits.shape[-1]), -jnp.inf, jnp.float32).at[rows, flat_ids].set(flat_values)
    return out.reshape(logits.shape)


def sample_tokens(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False) -> jax.Array:
    """One token id per row of `logits` [..., V] (int32 [...]); greedy = arg-max, lowest id among ties."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = scale_logits(logits, temperature)
    if top_k <= 0 and top_p >= 1.0:
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    values, ids = sorted_candidates(scaled, top_k, top_p)
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def sampled_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
    """log softmax(logits / temperature)[token] over the FULL vocabulary, before any filtering.

    This is what the GRPO update recomputes as old log-probs (logits / temperature, log-softmax over
    the vocabulary), not the log-prob under the truncated top-k / top-p distribution.
    """
    scaled = scale_logits(logits, temperature)
    picked = jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(scaled, axis=-1)

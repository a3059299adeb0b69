"""Log-probs and entropies of given tokens from final hidden states, chunked over the sequence.

The float32 logits of a whole batch ([rows, length, vocab]; 151,936 entries per token for Qwen) are
never materialised: the positions are cut into chunks, and each chunk's logits are computed, reduced
to (log-prob of the target, entropy) and dropped. The chunk function is rematerialised
(``jax.checkpoint``), so the backward pass recomputes one chunk's logits at a time as well.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_stats(hidden: jax.Array, w: jax.Array, targets: jax.Array,
                 temperature: float) -> tuple[jax.Array, jax.Array]:
    """hidden [B, C, E], w [E, V], targets [B, C] -> (log p(target), entropy), each [B, C] float32."""
    out_dtype = jnp.promote_types(hidden.dtype, jnp.float32)  # float32, or float64 under x64
    logits = jnp.einsum("bce,ev->bcv", hidden, w.astype(hidden.dtype), preferred_element_type=out_dtype)
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return target_logit - lse, entropy


def token_logprobs(hidden: jax.Array, w: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` [B, T] and the entropy of each position's distribution, both [B, T].

    hidden [B, T, E] are the states that predict the targets (position t predicts targets[:, t]);
    w [E, V] is the output embedding; logits are divided by `temperature`. At most
    [B, chunk_size, V] float32 logits exist at any time, in the forward and the backward pass.
    """
    b, t, e = hidden.shape
    chunk = max(1, min(int(chunk_size), t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n_chunks, chunk, e).swapaxes(0, 1)
    ts = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda xs: _chunk_stats(xs[0], w, xs[1], temperature))
    logp, entropy = jax.lax.map(body, (hs, ts))
    logp = logp.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    entropy = entropy.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]
    return logp, entropy


def response_logprobs(hidden: jax.Array, w: jax.Array, input_ids: jax.Array, response_len: int, *,
                      temperature: float = 1.0, chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies [N, R] of the response tokens of rows laid out as prompt (P) + response (R).

    hidden [N, P+R, E] is the model's output over input_ids [N, P+R]; response token t is scored by
    the state at position P+t-1.
    """
    total = input_ids.shape[1]
    prompt_len = total - response_len
    if prompt_len < 1:
        raise ValueError(f"input_ids has {total} positions but the response has {response_len}: "
                         "each row needs at least one prompt token before its response")
    states = jax.lax.slice_in_dim(hidden, prompt_len - 1, total - 1, axis=1)
    targets = jax.lax.slice_in_dim(input_ids, prompt_len, total, axis=1)
    return token_logprobs(states, w, targets, temperature=temperature, chunk_size=chunk_size)

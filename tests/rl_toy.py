"""A tiny causal policy for the RL step tests: it compiles in a fraction of the time of a transformer.

hidden_t = tanh(mean_{s <= t}(embed[token_s] + pos[position_s]) @ mix), masked tokens excluded;
logits = hidden @ out. Causal, position-aware, and respects left padding like the real decoder.
"""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from ruscarl_jax.rl.policy import Policy


def toy_params(key, vocab=32, dim=16, max_len=32, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "embed": (jax.random.normal(k[0], (vocab, dim)) * 0.5).astype(dtype),
        "pos": (jax.random.normal(k[1], (max_len, dim)) * 0.5).astype(dtype),
        "mix": (jax.random.normal(k[2], (dim, dim)) / np.sqrt(dim)).astype(dtype),
        "out": (jax.random.normal(k[3], (dim, vocab)) * 0.05).astype(dtype),
    }


def toy_hidden(params, tokens, mask):
    m = mask.astype(params["embed"].dtype)[..., None]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    x = (params["embed"][tokens] + params["pos"][positions]) * m
    mean = jnp.cumsum(x, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
    return jnp.tanh(mean @ params["mix"])


def assert_directional_derivatives(loss, params, grads, directions: int = 4, eps: float = 1e-6) -> None:
    """Central finite differences of `loss` along random directions equal grads . direction (run under x64)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gflat = jax.flatten_util.ravel_pytree(grads)[0]
    for k in range(directions):
        d = jnp.asarray(np.random.default_rng(10 + k).normal(size=flat.shape))
        fd = (loss(unravel(flat + eps * d)) - loss(unravel(flat - eps * d))) / (2 * eps)
        np.testing.assert_allclose(float(fd), float(gflat @ d), rtol=1e-6, atol=1e-9)


TOY_POLICY = Policy(hidden=toy_hidden, unembed=lambda p: p["out"])

# Tests compile many small steps; XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def rollout_batch(seed, groups=4, group_size=4, prompt=4, response=5, vocab=32):
    """A random rollout batch in the trainer's layout: left-padded prompts, right-padded responses."""
    rng = np.random.default_rng(seed)
    n = groups * group_size
    ids = rng.integers(1, vocab, (n, prompt + response)).astype(np.int32)
    attn = np.ones((n, prompt + response), np.int32)
    resp = np.ones((n, response), np.int32)
    for i in range(n):
        pad = rng.integers(0, prompt - 1)
        attn[i, :pad] = 0
        ids[i, :pad] = 0
        length = rng.integers(1, response + 1)
        resp[i, length:] = 0
        attn[i, prompt + length:] = 0
        ids[i, prompt + length:] = 0
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "rewards": rng.random(n).astype(np.float32), "group_ids": np.repeat(np.arange(groups), group_size),
            "row_valid": np.ones(n, np.int32)}

"""Chunked token log-probs / entropies against NumPy float64, their gradients, and their memory bound."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruscarl_jax.rl.logprobs import response_logprobs, token_logprobs


def np_stats(h, w, targets, temperature):
    z = np.einsum("bte,ev->btv", h, w) / temperature
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -(p * logp_all).sum(-1), p, logp_all


def case(seed, b=3, t=10, e=8, v=37):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, t, e)), rng.normal(size=(e, v)), rng.integers(0, v, (b, t))


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_numpy(chunk, temperature):
    h, w, tg = case(0)
    logp, ent = token_logprobs(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(tg),
                               temperature=temperature, chunk_size=chunk)
    want_logp, want_ent, _, _ = np_stats(h, w, tg, temperature)
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-5, atol=5e-5)


def test_response_logprobs_score_each_token_from_the_previous_position():
    h, w, _ = case(1, t=9)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, w.shape[1], (3, 9))
    prompt, resp = 4, 5
    logp, _ = response_logprobs(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(ids), resp,
                                temperature=0.5, chunk_size=2)
    _, _, _, logp_all = np_stats(h, w, ids, 0.5)
    want = np.array([[logp_all[b, prompt + t - 1, ids[b, prompt + t]] for t in range(resp)] for b in range(3)])
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least one prompt token"):
        response_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(ids), 9)


def test_gradients_match_analytic_numpy():
    """d/d(hidden, w) of sum(a * logp + b * entropy), against the closed-form softmax derivatives."""
    h, w, tg = case(2)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=tg.shape), rng.normal(size=tg.shape)
    temp = 0.8

    def f(hj, wj):
        logp, ent = token_logprobs(hj, wj, jnp.asarray(tg), temperature=temp, chunk_size=3)
        return jnp.sum(jnp.asarray(a, jnp.float32) * logp + jnp.asarray(b, jnp.float32) * ent)

    gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    _, ent, p, logp_all = np_stats(h, w, tg, temp)
    onehot = np.eye(w.shape[1])[tg]
    dz = a[..., None] * (onehot - p) + b[..., None] * (-p * (logp_all + ent[..., None]))
    want_h = np.einsum("btv,ev->bte", dz, w) / temp
    want_w = np.einsum("bte,btv->ev", h, dz) / temp
    np.testing.assert_allclose(np.asarray(gh), want_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-4, atol=1e-5)


def test_chunking_bounds_memory_forward_and_backward():
    """Compiled temporaries stay well below one [B, T, V] float32 logits tensor when chunked."""
    b, t, e, v = 4, 256, 32, 4096
    h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v), jnp.float32)
    tg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    full = b * t * v * 4

    def loss(hj, wj, tj, chunk):
        logp, ent = token_logprobs(hj, wj, tj, chunk_size=chunk)
        return logp.sum() + ent.sum()

    def temp_bytes(fn, chunk):
        return jax.jit(fn, static_argnums=3).lower(h, w, tg, chunk).compile().memory_analysis().temp_size_in_bytes

    grad = jax.grad(loss, argnums=(0, 1))
    assert temp_bytes(grad, t) >= full  # unchunked: the whole logits tensor (and more) is live
    small, larger = temp_bytes(grad, 8), temp_bytes(grad, 32)
    assert small < larger < 0.6 * full  # a few chunk-sized buffers: the bound scales with the chunk
    assert temp_bytes(loss, 8) < full / 8


def test_bfloat16_hidden_gives_float32_logprobs():
    h, w, tg = case(3)
    lp32, _ = token_logprobs(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(tg))
    lp16, _ = token_logprobs(jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(tg))
    assert lp16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp16), np.asarray(lp32), atol=0.15)

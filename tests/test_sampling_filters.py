"""Temperature / top-k / top-p filtering and sampling against a NumPy float64 reference.

The frequency tests draw many tokens from one fixed logits vector with a fixed seed and compare
them with the filtered distribution by Pearson's chi-square statistic. scipy is not installed, so
the critical values are hard-coded from a chi-square table at significance 0.001 (upper tail) for
the degrees of freedom used (kept tokens - 1).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ruscarl_jax.sampler.filtering import filter_logits, sample_tokens, sampled_logprobs

# chi-square critical values, P(X > c) = 0.001, by degrees of freedom (standard table)
CHI2_CRITICAL_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
                      9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697}

LOGITS = np.array([1.3, -0.2, 2.1, 0.4, 2.1, -1.5, 0.9, 0.0, 1.7, -0.7, 0.4, 1.1], np.float32)  # ties at 2.1 and 0.4


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64: softmax(logits / T), then the k largest (lower id first among ties), renormalised, then the
    smallest prefix in that order whose mass >= p (at least one token), renormalised."""
    scaled = logits.astype(np.float64) / temperature
    order = np.lexsort((np.arange(scaled.size), -scaled))  # descending value, then ascending id
    keep = order[:top_k] if top_k > 0 else order
    probs = np.exp(scaled[keep] - scaled[keep].max())
    probs /= probs.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    inside = mass_before < top_p
    out = np.zeros(scaled.size)
    out[keep[inside]] = probs[inside] / probs[inside].sum()
    return out


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    return float(((counts[kept] - expected) ** 2 / expected).sum()), int(kept.sum()) - 1


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),   # plain softmax
    (0.7, 7, 1.0),   # top-k alone, with a tie at the boundary (0.4: id 3 is kept, id 10 never drawn)
    (1.0, 0, 0.8),   # top-p alone
    (1.3, 6, 0.9),   # both, after temperature
    (0.5, 4, 0.6),   # a sharp temperature with both filters
])
def test_sampled_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    draws = 40_000
    probs = reference_probs(LOGITS, temperature, top_k, top_p)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (draws, LOGITS.size))
    sample = jax.jit(lambda key, x: sample_tokens(key, x, temperature=temperature, top_k=top_k, top_p=top_p))
    tokens = np.asarray(sample(jax.random.key(1234), logits))
    counts = np.bincount(tokens, minlength=LOGITS.size)
    assert counts[probs == 0].sum() == 0, f"tokens outside the top-k / top-p set were drawn: {np.flatnonzero(counts * (probs == 0))}"
    statistic, df = _chi_square(counts, probs)
    assert df >= 1
    assert statistic < CHI2_CRITICAL_0001[df], (statistic, df, counts, probs)


def test_chi_square_check_can_fail():
    """The same check rejects top-6 draws at temperature 1.0 against the top-6 distribution at 0.7."""
    draws = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (draws, LOGITS.size))
    tokens = np.asarray(sample_tokens(jax.random.key(1234), logits, temperature=1.0, top_k=6))
    statistic, df = _chi_square(np.bincount(tokens, minlength=LOGITS.size), reference_probs(LOGITS, 0.7, 6, 1.0))
    assert statistic > CHI2_CRITICAL_0001[df]


def test_filtered_logits_equal_the_reference_set_and_values():
    for temperature, top_k, top_p in [(0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 6, 0.9), (1.0, 1, 1.0), (1.0, 12, 0.5)]:
        out = np.asarray(filter_logits(jnp.asarray(LOGITS), temperature=temperature, top_k=top_k, top_p=top_p))
        probs = reference_probs(LOGITS, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(out), probs > 0)
        kept = probs > 0
        np.testing.assert_allclose(out[kept], LOGITS[kept].astype(np.float64) / temperature, rtol=1e-6)


def test_ties_are_broken_toward_the_lower_token_id():
    logits = jnp.array([0.0, 3.0, 1.0, 3.0, 3.0, 2.0])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))
    assert np.flatnonzero(kept).tolist() == [1, 3]  # three tokens tie at 3.0: ids 1 and 3 are kept, 4 is not
    assert int(sample_tokens(jax.random.key(0), logits, greedy=True)) == 1
    # a batch of rows keeps each row's own set
    both = np.asarray(filter_logits(jnp.stack([logits, logits[::-1]]), top_k=2))
    assert [np.flatnonzero(np.isfinite(r)).tolist() for r in both] == [[1, 3], [1, 2]]


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_at_least_one_token():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.asarray(np.log(probs), jnp.float32)

    def kept(p):
        return np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_p=p)))).tolist()

    assert kept(0.45) == [1]  # 0.5 >= 0.45
    assert kept(0.79) == [1, 3]  # 0.8 >= 0.79
    assert kept(0.81) == [1, 2, 3]
    assert kept(0.97) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # never empty
    # top-p applies to the top-k distribution renormalised: top-2 mass is 0.5 / 0.8 = 0.625 for token 1
    k2 = np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.6))))
    assert k2.tolist() == [1]
    k2 = np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.65))))
    assert k2.tolist() == [1, 3]


def test_logprobs_are_of_the_unfiltered_tempered_distribution():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    tokens = jnp.array([5, 2])  # token 5 is outside any top-k set above; its log-prob is still defined
    out = np.asarray(sampled_logprobs(logits, tokens, 0.7))
    scaled = np.stack([LOGITS, LOGITS[::-1]]).astype(np.float64) / 0.7
    ref = scaled[[0, 1], [5, 2]] - np.log(np.exp(scaled).sum(-1))
    np.testing.assert_allclose(out, ref, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-6, 6), min_size=12, max_size=12), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       top_k=st.integers(0, 13), top_p=st.floats(0.05, 1.0))
def test_kept_set_matches_the_reference_on_random_logits(values, temperature, top_k, top_p):
    logits = np.asarray(values, np.float32) / 2  # coarse values: many ties
    probs = reference_probs(logits, temperature, top_k, top_p)
    # skip cases where float32 and float64 may disagree: p within 1e-5 of a cumulative mass of the kept order
    order = np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))
    keep = order[:top_k] if top_k > 0 else order
    p = np.exp(logits[keep].astype(np.float64) / temperature)
    assume(np.min(np.abs(np.cumsum(p / p.sum()) - top_p)) > 1e-5)
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isfinite(out), probs > 0)

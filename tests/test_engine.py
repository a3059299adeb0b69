"""The rollout engine: continuous batching over few slots and a small paged cache, against transformers
generate, the static lockstep schedule and a teacher-forced forward pass (8 devices and two processes:
tests/test_sampler.py, which runs through the engine too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from model_fixtures import left_padded_batch
from test_sampler import LENGTHS, PAD, VOCAB, _first_stop, _hf_generate, _reference_logprobs, tiny  # noqa: F401

from ruscarl_jax.models import qwen
from ruscarl_jax.plan import hlo as hlo_lib
from ruscarl_jax.models.sharding import make_mesh
from ruscarl_jax.sampler import engine
from ruscarl_jax.sampler import layout as rollout_layout
from ruscarl_jax.sampler.generate import generate
from ruscarl_jax.sampler.settings import EngineSettings, SamplingSettings

R = 16
# 2 slots for 6 prompts: every slot is refilled; 4-token pages, checked every 3 steps
SMALL = EngineSettings(slots=2, page_size=4, check_every=3)


@pytest.mark.parametrize("name", ["qwen2_gqa4_tied", "qwen3_odd_head_dim"])
def test_engine_greedy_matches_transformers_generate(name, tiny):
    model, _, cfg, params = tiny(name)
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=2)
    free = _hf_generate(model, tokens, mask, R)
    stops = (int(free[0, 5]), int(free[3, 9]))  # tokens HF emits mid-response: some rows stop early
    expected = _hf_generate(model, tokens, mask, R, eos=list(stops))
    settings = SamplingSettings(max_new_tokens=R, greedy=True, stop_token_ids=stops, pad_token_id=PAD, prompt_bucket_min=8,
                                engine=SMALL)
    out = generate(params, cfg, (tokens, mask), jax.random.key(0), settings)
    np.testing.assert_array_equal(out.tokens[:, :expected.shape[1]], expected)
    assert (out.tokens[:, expected.shape[1]:] == PAD).all()
    lengths = [R if _first_stop(row, stops) is None else _first_stop(row, stops) + 1 for row in expected]
    np.testing.assert_array_equal(out.lengths, lengths)
    assert {"stop", "length"} <= set(out.finish_reason) and len(set(lengths)) > 2  # uneven lengths: slots do refill
    ref, _ = _reference_logprobs(model, out, 1.0)
    np.testing.assert_allclose(out.logprobs * out.response_mask, ref * out.response_mask, atol=1e-4)


def test_engine_samples_what_the_static_schedule_samples(tiny):
    """Same row seeds, different slots and times: the same draws (a float reordering may flip a rare near-tie)."""
    model, _, cfg, params = tiny("qwen3_odd_head_dim")
    lengths = [9, 4, 1, 7, 12, 3, 5, 2, 11, 6, 8, 10]
    tokens, mask = left_padded_batch(VOCAB, lengths, seed=5)
    common = dict(max_new_tokens=R, temperature=0.8, top_p=0.9, top_k=30, stop_token_ids=tuple(range(1, 6)),
                  pad_token_id=PAD, prompt_bucket_min=8)
    seeds = [1000 + 7 * i for i in range(len(lengths))]
    key = jax.random.key(4)
    static = generate(params, cfg, (tokens, mask), key, SamplingSettings(**common, engine=EngineSettings(schedule="static")),
                      row_seeds=seeds)
    paged = generate(params, cfg, (tokens, mask), key, SamplingSettings(**common, engine=EngineSettings(
        slots=3, page_size=4, check_every=4)), row_seeds=seeds)
    assert len(set(static.lengths.tolist())) > 3  # uneven lengths
    rows_differing = (paged.tokens != static.tokens).any(axis=1).mean()
    assert rows_differing <= 1 / len(lengths)
    same = (paged.tokens == static.tokens).all(axis=1)
    np.testing.assert_allclose(paged.logprobs[same], static.logprobs[same], atol=1e-5)
    # log-probs at the sampling temperature, before top-k / top-p, equal a teacher-forced forward
    ref, _ = _reference_logprobs(model, paged, 0.8)
    valid = paged.response_mask == 1
    np.testing.assert_allclose(paged.logprobs[valid], ref[valid], atol=1e-4)


def test_slot_refill_page_reuse_and_exhaustion(tiny):
    """A page budget that cannot hold every running sequence preempts (and later recomputes) the latest
    admitted one instead of failing; the rows come out as with ample pages, and every page comes back."""
    _, _, cfg, params = tiny("qwen2_gqa4_tied")
    rows = [np.asarray(r, np.int32) for r in ([5, 9, 2], [7], [1, 2, 3, 4, 5], [8, 8, 1, 30], [40, 41], [3, 3, 3])]
    seeds = np.arange(len(rows), dtype=np.uint32) + 50
    key = jax.random.key(8)
    base = dict(max_new_tokens=R, temperature=1.0, pad_token_id=PAD, prompt_bucket_min=8)

    def run(engine_settings, priority=None):
        settings = SamplingSettings(**base, engine=engine_settings)
        layout = engine.plan(cfg, settings, rows=len(rows), longest_prompt=5, mesh=None)
        state = engine._Engine(rollout_layout.cast_params(params, cfg.dtype), cfg, rows, seeds, key, settings, layout, None,
                               engine.DEFAULT_RULES, priority=priority)
        if priority is not None:  # higher priority first, ties in row order
            assert list(state.queue) == [4, 1, 3, 0, 2, 5]
        state.run()
        return state, layout

    ample, _ = run(EngineSettings(slots=3, page_size=2, check_every=4))
    tight, layout = run(EngineSettings(slots=3, page_size=2, num_pages=13, check_every=4))  # one sequence needs 12
    assert ample.preemptions == 0 and tight.preemptions > 0
    assert tight.admissions == len(rows) + tight.preemptions > layout.slots  # slots were refilled
    np.testing.assert_array_equal(tight.tokens, ample.tokens)
    np.testing.assert_allclose(tight.logprobs, ample.logprobs, atol=1e-5)
    assert not tight.stopped.any() and (tight.tokens != PAD).all()  # no stop tokens: every row ran all R tokens
    assert sorted(tight.pages.free[0]) == list(range(13)) and all(s is None for s in tight.slots)
    # 6 rows of R tokens (the first from prefill) over 3 slots: 2 waves of R - 1 decode steps, at most a chunk late each
    assert 2 * (R - 1) <= ample.decode_steps <= 2 * (R - 1) + 2 * 4
    ordered, _ = run(EngineSettings(slots=3, page_size=2, check_every=4), priority=[1, 5, 0, 2, 9, 0])
    np.testing.assert_array_equal(ordered.tokens, ample.tokens)  # the order changes when rows run, not what they sample


def test_bad_engine_input_is_named(tiny):
    _, _, cfg, params = tiny("qwen2_gqa4_tied")
    settings = SamplingSettings(max_new_tokens=8, prompt_bucket_min=8, engine=EngineSettings(max_seq_len=12))
    with pytest.raises(ValueError, match=r"row 1 has 5 tokens; with max_new_tokens 8 it needs 13, more than the "
                                         r"engine's max sequence length 12 \(rollout.engine.max_seq_len\)"):
        generate(params, cfg, [[1, 2], [1, 2, 3, 4, 5]], jax.random.key(0), settings)
    tight = SamplingSettings(max_new_tokens=8, prompt_bucket_min=8, engine=EngineSettings(page_size=4, num_pages=3))
    with pytest.raises(ValueError, match=r"rollout.engine.num_pages: 3 pages of 4 tokens .* needs 4 pages"):
        engine.plan(cfg, tight, rows=4, longest_prompt=6, mesh=None)
    with pytest.raises(ValueError, match=r"rollout.engine.memory_gb"):
        engine.plan(cfg, SamplingSettings(max_new_tokens=8, engine=EngineSettings(memory_gb=1e-9)), rows=4,
                    longest_prompt=6, mesh=None)
    for field, value in [("page_size", 0), ("check_every", 0), ("slots", -1), ("cache_dtype", "int8"), ("attention", "x")]:
        with pytest.raises(ValueError, match=rf"EngineSettings\.{field}="):
            EngineSettings(**{field: value})


def test_kv_bytes_follow_the_layout(tiny):
    _, _, cfg, _ = tiny("qwen2_gqa4_tied")
    settings = SamplingSettings(max_new_tokens=8, engine=EngineSettings(page_size=4, num_pages=40, cache_dtype="bfloat16"))
    layout = engine.plan(cfg, settings, rows=4, longest_prompt=6, mesh=None)
    total, per_device = engine.kv_cache_bytes(cfg, layout, None)
    assert total == per_device == 2 * cfg.num_layers * cfg.num_kv_heads * 40 * 4 * cfg.head_dim * 2
    static = engine.plan(cfg, SamplingSettings(max_new_tokens=8, prompt_bucket_min=8, engine=EngineSettings(schedule="static")),
                         rows=4, longest_prompt=6, mesh=None)  # 4 rows x (prompt bucket 8 + 8 new tokens), float32
    assert engine.kv_cache_bytes(cfg, static, None)[0] == 2 * cfg.num_layers * cfg.num_kv_heads * 4 * 16 * cfg.head_dim * 4


def test_engine_config_errors_name_the_key():
    from configs import tiny as tiny_config
    from ruscarl_jax.trainer import config as config_lib

    for key, value, devices, message in [
        ("num_pages", 3, 1, r"config.rollout.engine.num_pages: 3 pages over 1 data-parallel shard\(s\) = 3 per shard of 16 "
                            r"tokens; one sequence of up to 268 tokens needs 17"),
        ("slots", 1, 2, r"config.rollout.engine.slots: 1 slots for 2 data-parallel shards: every shard"),
        ("max_seq_len", 100, 1, r"config.rollout.engine.max_seq_len: 100 cannot hold a prompt of data.max_prompt_length=256"),
        ("page_size", 0, 1, r"config.rollout.engine.page_size: EngineSettings.page_size=0: must be >= 1"),
        ("schedule", "fast", 1, r"config.rollout.engine.schedule: .*valid: continuous, static"),
    ]:
        config = tiny_config.get_config()
        config.data.max_prompt_length, config.rollout.max_new_tokens, config.rollout.prompt_bucket_min = 256, 12, 64
        config.rollout.engine[key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(config, num_devices=devices)
    assert config_lib.validate(tiny_config.get_config(), num_devices=1).sampling.engine == EngineSettings()


def test_pallas_gpu_paged_kernel_reads_our_page_layout():
    """jax's Pallas GPU paged-attention kernel (run in the Pallas interpreter here) on our cache layout and
    page tables gives the pure-JAX paged attention: the two decode paths attend to the same tokens."""
    from ruscarl_jax.models import attention

    rng = np.random.default_rng(0)
    layers, kv_heads, pages, page, dim, heads = 2, 2, 12, 4, 16, 8
    k_pool, v_pool = (jax.numpy.asarray(rng.normal(size=(layers, 1, kv_heads, pages, page, dim)), np.float32)
                      for _ in range(2))
    q = jax.numpy.asarray(rng.normal(size=(3, 1, heads, dim)), np.float32)
    table = jax.numpy.asarray([[3, 1, 7, 0], [5, 2, 0, 0], [11, 9, 8, 6]], np.int32)  # scattered pages
    lengths = jax.numpy.asarray([10, 5, 16], np.int32)  # partial last pages; unused entries are never read
    ref = attention.paged_decode(q, k_pool, v_pool, jax.numpy.int32(1), table, lengths, impl="jax")
    out = attention._pallas_paged(q[:, 0], k_pool, v_pool, jax.numpy.int32(1), table, lengths, platform="gpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref[:, 0]), atol=1e-5)


def test_weights_are_cast_once_and_not_copied_when_already_in_the_compute_dtype():
    params = {"w": jax.numpy.ones((2, 3), np.float32), "ids": jax.numpy.arange(3)}
    same = rollout_layout.cast_params(params, "float32")
    assert same["w"] is params["w"] and same["ids"] is params["ids"]
    half = rollout_layout.cast_params(params, "bfloat16")
    assert half["w"].dtype == jax.numpy.bfloat16 and half["ids"].dtype == params["ids"].dtype


def test_interrupt_is_asked_every_iteration_and_abandons_sampling(tiny):
    """`interrupt` (the trainer's preemption check) is asked once per scheduler iteration; False changes
    nothing, True abandons the call with engine.Interrupted at that iteration."""
    _, _, cfg, params = tiny("qwen3_odd_head_dim")
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=2)
    settings = SamplingSettings(max_new_tokens=R, greedy=True, pad_token_id=PAD, prompt_bucket_min=8, engine=SMALL)
    plain = generate(params, cfg, (tokens, mask), jax.random.key(0), settings)
    asked = []
    same = generate(params, cfg, (tokens, mask), jax.random.key(0), settings, interrupt=lambda: asked.append(1) or False)
    np.testing.assert_array_equal(same.tokens, plain.tokens)
    assert len(asked) >= R // SMALL.check_every  # 2 slots for 6 rows of up to 16 tokens, 3 steps an iteration
    calls = []
    with pytest.raises(engine.Interrupted, match="sampling interrupted after"):
        generate(params, cfg, (tokens, mask), jax.random.key(0), settings, interrupt=lambda: calls.append(1) or len(calls) == 3)
    assert len(calls) == 3


# ------------------------------------------------------------------ TPU programs (the TPU compiler on this CPU)

def _tpu_mesh(topology: str, chips: int):
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kw = dict(chip_config_name="megacore") if topology.startswith("v5p") else {}
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices[:chips]
    return make_mesh({"fsdp": chips}, devices)  # the training layout: ZeRO-3 over every chip


def test_tpu_decode_step_is_shard_local_and_runs_the_mosaic_kernel():
    """A tiny Qwen (head_dim 128) compiled for 4 v5p chips with FSDP training weights: the decode chunk
    runs the Pallas (Mosaic) paged-attention kernel and moves next to nothing between chips: far less than
    one weight matrix (what a per-token weight gather would move) or one shard's pages (a page gather)."""
    pytest.importorskip("libtpu")
    cfg = qwen.QwenConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=128, dtype="bfloat16", param_dtype="float32")
    mesh = _tpu_mesh("v5p:2x2x1", 4)
    settings = SamplingSettings(max_new_tokens=64, top_k=20, top_p=0.8, temperature=0.7, engine=EngineSettings(
        slots=16, page_size=16, check_every=8, attention="pallas", max_seq_len=128))
    layout = engine.plan(cfg, settings, rows=16, longest_prompt=64, mesh=mesh)
    assert layout.groups == 4 and layout.slots == 16
    fn, args, static = engine.decode_program(cfg, settings, layout, mesh)
    hlo = fn.lower(*args, **static).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo  # the Mosaic paged-attention kernel
    smallest_matrix = 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim  # k_proj in bfloat16: 128 KiB
    shard_pages = 2 * 2 * cfg.num_layers * cfg.num_kv_heads * layout.pages_per_group * layout.page_size * cfg.head_dim
    moved = sum(hlo_lib.analyze(hlo, num_devices=4).per_step.values())  # bytes per chip, loops multiplied out
    assert moved <= 1024 < smallest_matrix <= shard_pages, (moved, smallest_matrix, shard_pages)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_tpu_paged_kernel_block_sizes_compile(topology):
    """The kernel at qwen7b's shapes (28 query / 4 KV heads, head_dim 128, 16-token pages, bfloat16, 512-page
    tables) compiles for v5e, v5p and v6e with the engine's block size; head_dim 64 is refused by plan."""
    pytest.importorskip("libtpu")
    from ruscarl_jax.models import attention

    mesh = _tpu_mesh(topology, 1)
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    fn = jax.jit(lambda q, k, v, t, n: attention.paged_decode(q, k, v, jnp.int32(0), t, n, impl="pallas", platform="tpu"))
    hlo = fn.lower(s((8, 1, 28, 128), jnp.bfloat16), s((1, 1, 4, 4096, 16, 128), jnp.bfloat16),
                   s((1, 1, 4, 4096, 16, 128), jnp.bfloat16), s((8, 512), jnp.int32), s((8,), jnp.int32)).compile().as_text()
    assert "tpu_custom_call" in hlo
    small = qwen.QwenConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                            head_dim=64)
    with pytest.raises(ValueError, match=r"rollout.engine.attention='pallas': the TPU kernel needs head_dim % 128 == 0"):
        engine.plan(small, SamplingSettings(max_new_tokens=8, engine=EngineSettings(attention="pallas")), rows=4,
                    longest_prompt=8, mesh=mesh)

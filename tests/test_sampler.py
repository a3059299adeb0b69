"""The in-framework sampler against transformers generate and a teacher-forced forward pass.

Tiny random Qwen2 / Qwen3 models are built with transformers (PyTorch CPU) in the test; their 2-D
weights are redrawn with std 0.2 so that greedy outputs are diverse (HF's 0.02 init makes the tiny
models repeat one token) and arg-max margins are wide.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from model_fixtures import hf_logits, left_padded_batch, make_hf_model, save_hf_model

from ruscarl_jax.models import hf_io, qwen
from ruscarl_jax.models.sharding import make_mesh
from ruscarl_jax.sampler import engine as engine_module
from ruscarl_jax.sampler import layout as layout_module
from ruscarl_jax.sampler.generate import fold_step_key, generate, pad_prompts
from ruscarl_jax.sampler.settings import EngineSettings, SamplingSettings, bucket_length

VOCAB = 101
LENGTHS = [9, 4, 1, 7, 12, 3]  # mixed prompt lengths, left padded
R = 16
PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (HF model, checkpoint dir, cfg, params), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            model = make_hf_model(name, vocab_size=VOCAB)
            torch.manual_seed(1)
            with torch.no_grad():
                for param in model.parameters():
                    if param.ndim == 2:
                        param.normal_(0.0, 0.2)
            directory = save_hf_model(model, tmp_path_factory.mktemp(name))
            built[name] = (model, directory, *hf_io.load_checkpoint(directory))
        return built[name]

    return get


def _hf_generate(model, tokens, mask, max_new_tokens, eos=None) -> np.ndarray:
    model.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                             max_new_tokens=max_new_tokens)
    return out[:, tokens.shape[1]:].numpy()


def _reference_logprobs(model, out, temperature: float) -> np.ndarray:
    """float64 log softmax(logits / T) of each response token, from a fresh HF forward over prompt + response."""
    tokens = np.concatenate([out.prompt_tokens, out.tokens], axis=1)
    mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1)
    p = out.prompt_tokens.shape[1]
    logits = hf_logits(model, tokens, mask).astype(np.float64)[:, p - 1:-1] / temperature
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, out.tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    return (picked - logz), logits


def _first_stop(row: np.ndarray, stops) -> int | None:
    hits = np.flatnonzero(np.isin(row, stops))
    return int(hits[0]) if hits.size else None


@pytest.mark.parametrize("name", ["qwen2_gqa4_tied", "qwen3_odd_head_dim"])
def test_greedy_matches_transformers_generate(name, tiny):
    model, _, cfg, params = tiny(name)
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=2)
    free = _hf_generate(model, tokens, mask, R)
    stops = (int(free[0, 5]), int(free[3, 9]))  # two tokens HF emits mid-response, so some rows stop early
    expected = _hf_generate(model, tokens, mask, R, eos=list(stops))
    settings = SamplingSettings(max_new_tokens=R, greedy=True, stop_token_ids=stops, pad_token_id=PAD, prompt_bucket_min=8)
    out = generate(params, cfg, (tokens, mask), jax.random.key(0), settings)

    assert out.tokens.shape == (len(LENGTHS), R)
    np.testing.assert_array_equal(out.tokens[:, :expected.shape[1]], expected)
    assert (out.tokens[:, expected.shape[1]:] == PAD).all()  # HF returns fewer columns only when every row stopped
    reasons = []
    for row in range(len(LENGTHS)):
        first = _first_stop(expected[row], stops)
        length = R if first is None else first + 1
        reasons.append("length" if first is None else "stop")
        np.testing.assert_array_equal(out.response_mask[row], np.arange(R) < length)
        assert out.lengths[row] == length
    assert list(out.finish_reason) == reasons and {"stop", "length"} <= set(reasons)

    # greedy log-probs are temperature-1 log-probs of the chosen tokens under a fresh full forward pass
    ref, _ = _reference_logprobs(model, out, 1.0)
    np.testing.assert_allclose(out.logprobs * out.response_mask, ref * out.response_mask, atol=1e-4)
    assert (out.logprobs[out.response_mask == 0] == 0).all()


def test_sampled_logprobs_equal_teacher_forced_forward(tiny):
    model, _, cfg, params = tiny("qwen3_odd_head_dim")
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=3)
    settings = SamplingSettings(max_new_tokens=R, temperature=0.7, top_p=0.8, top_k=20, stop_token_ids=tuple(range(1, 9)),
                                pad_token_id=PAD, prompt_bucket_min=8)
    out = generate(params, cfg, [list(t[m == 1]) for t, m in zip(tokens, mask)], fold_step_key(jax.random.key(7), 3), settings)
    ref, scaled = _reference_logprobs(model, out, 0.7)
    valid = out.response_mask == 1
    assert valid.sum() > 3 * len(LENGTHS)
    # log-probs of the sampled tokens under softmax(logits / T) over the FULL vocabulary (before top-k / top-p)
    np.testing.assert_allclose(out.logprobs[valid], ref[valid], atol=1e-4)
    # ... while the tokens themselves come from the top-20 (ranks from the reference logits; 1e-4 slack for ties)
    kth = np.sort(scaled, axis=-1)[..., -20]
    picked = np.take_along_axis(scaled, out.tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    assert (picked[valid] >= kth[valid] - 1e-4).all()


def test_stop_tokens_end_rows_and_the_rest_stays_padded(tiny):
    _, _, cfg, params = tiny("qwen3_odd_head_dim")
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=4)
    stops = tuple(range(1, 9))
    settings = SamplingSettings(max_new_tokens=R, temperature=0.7, top_p=0.8, top_k=20, stop_token_ids=stops,
                                pad_token_id=PAD, prompt_bucket_min=8)
    key = jax.random.key(11)
    outs = [generate(params, cfg, (tokens, mask), fold_step_key(key, step), settings) for step in (1, 2, 1)]
    out = outs[0]
    assert out.tokens.shape == out.response_mask.shape == out.logprobs.shape == (len(LENGTHS), R)
    for row in range(len(LENGTHS)):
        first = _first_stop(out.tokens[row], stops)
        length = R if first is None else first + 1
        np.testing.assert_array_equal(out.response_mask[row], np.arange(R) < length)
        assert (out.tokens[row, length:] == PAD).all() and (out.logprobs[row, length:] == 0).all()
        assert (out.logprobs[row, :length] < 0).all()
        assert out.finish_reason[row] == ("length" if first is None else "stop")
        assert out.lengths[row] == length
    assert "stop" in set(out.finish_reason)
    # the loop ran exactly as long as the longest row (it exits once every row has stopped)
    expected_steps = R if "length" in set(out.finish_reason) else int(out.lengths.max())
    assert out.num_steps == expected_steps
    # a fresh key per step gives fresh samples; the same key gives the same samples
    assert not np.array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].tokens, outs[2].tokens)

    # other prompt lengths in the same bucket (longest 9..16 -> width 16) reuse the compiled programs
    compiled = (engine_module._prefill_jit._cache_size(), engine_module._decode_jit._cache_size())
    other, other_mask = left_padded_batch(VOCAB, [16, 2, 9, 5, 11, 1], seed=9)
    assert generate(params, cfg, (other, other_mask), key, settings).prompt_tokens.shape == (len(LENGTHS), 16)
    assert (engine_module._prefill_jit._cache_size(), engine_module._decode_jit._cache_size()) == compiled


def test_every_row_stopping_exits_the_loop_early(tiny):
    _, _, cfg, params = tiny("qwen3_odd_head_dim")
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=4)
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0, stop_token_ids=tuple(range(0, VOCAB, 2)),
                                pad_token_id=PAD, prompt_bucket_min=8)  # half the vocabulary stops a row
    out = generate(params, cfg, (tokens, mask), jax.random.key(5), settings)
    assert (out.finish_reason == "stop").all()
    assert out.num_steps == out.lengths.max() < 40
    assert (out.tokens[:, out.num_steps:] == PAD).all() and out.tokens.shape == (len(LENGTHS), 40)


# one slot per row; and 4 slots (one per data-parallel shard) refilled from 6 rows, 4-token pages
@pytest.mark.parametrize("engine_settings", [EngineSettings(), EngineSettings(slots=4, page_size=4, check_every=5)])
def test_eight_devices_give_the_one_device_greedy_output(tiny, engine_settings):
    assert len(jax.devices()) == 8
    _, directory, cfg, params = tiny("qwen2_gqa4_tied")
    tokens, mask = left_padded_batch(VOCAB, LENGTHS, seed=2)  # 6 rows: slots padded to a multiple of data x fsdp = 4
    settings = SamplingSettings(max_new_tokens=R, greedy=True, stop_token_ids=(5,), pad_token_id=PAD, prompt_bucket_min=8,
                                engine=engine_settings)
    ref = generate(params, cfg, (tokens, mask), jax.random.key(0), settings)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = hf_io.load_checkpoint(directory, mesh=mesh)
    out = generate(sharded, cfg, (tokens, mask), jax.random.key(0), settings, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.response_mask, ref.response_mask)
    np.testing.assert_array_equal(out.finish_reason, ref.finish_reason)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)

    # the rollout layout: every device a shard with its own page group (8 groups, slots padded to 8), the
    # weights replicated in the compute dtype, the cache split over the devices on its page-group axis
    layout = engine_module.plan(cfg, settings, rows=6, longest_prompt=12, mesh=mesh)
    assert layout.groups == 8 and layout.slots == 8
    rmesh = layout_module.rollout_mesh(mesh)
    assert rmesh.shape["data"] == 8 and list(rmesh.devices.flat) == list(mesh.devices.flat)
    weights = layout_module.rollout_params(sharded, cfg.dtype, rmesh)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(weights))
    cache = engine_module._init_cache_jit(cfg, layout, rmesh, engine_module.DEFAULT_RULES)
    assert cache["k"].sharding.spec == PartitionSpec(None, "data")
    assert {s.data.shape[1] for s in cache["k"].addressable_shards} == {1}


# ----------------------------------------------------------------------------- host side: no compiling

def test_prompt_padding_and_buckets():
    settings = SamplingSettings(max_new_tokens=4, pad_token_id=7, prompt_bucket_min=8)
    rows = [[5, 6, 9], [3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    tokens, mask, n = pad_prompts(rows, settings, vocab_size=20, batch_multiple=4)
    assert n == 3 and tokens.shape == mask.shape == (4, 16)  # longest 10 -> next power of two, 3 rows -> 4
    for i, row in enumerate(rows):
        assert tokens[i, 16 - len(row):].tolist() == row and (tokens[i, :16 - len(row)] == 7).all()
        assert mask[i].tolist() == [0] * (16 - len(row)) + [1] * len(row)
    assert mask[3].sum() == 1  # the filler row holds one pad token
    # a left-padded (tokens, mask) pair gives the same layout as the lists
    again, again_mask, _ = pad_prompts((tokens[:3], mask[:3]), settings, vocab_size=20, batch_multiple=4)
    np.testing.assert_array_equal(again, tokens)
    np.testing.assert_array_equal(again_mask, mask)

    # power-of-two buckets from the minimum up; with steps per octave, equally spaced widths in between
    assert [bucket_length(n) for n in (1, 64, 65, 128, 129, 4096, 4097)] == [64, 64, 128, 128, 256, 4096, 8192]
    assert [bucket_length(n, 64, 4) for n in (65, 80, 81, 100, 128, 129, 161, 500)] == [80, 80, 96, 112, 128, 160, 192, 512]


def test_bad_input_is_named():
    settings = SamplingSettings(max_new_tokens=4, prompt_bucket_min=8)
    with pytest.raises(ValueError, match=r"row 1 is empty"):
        pad_prompts([[1, 2], []], settings, vocab_size=10)
    with pytest.raises(ValueError, match=r"row 0, position 2: token id 10 is outside the vocabulary of 10"):
        pad_prompts([[1, 2, 10]], settings, vocab_size=10)
    with pytest.raises(ValueError, match=r"mask row 1 is not left padded"):
        pad_prompts((np.ones((2, 3), np.int32), np.array([[0, 1, 1], [1, 1, 0]])), settings, vocab_size=10)
    with pytest.raises(ValueError, match=r"batch is empty"):
        pad_prompts([], settings, vocab_size=10)
    for field, value, message in [("temperature", 0.0, r"temperature=0.0: must be > 0"), ("top_p", 0.0, r"top_p=0.0"),
                                  ("top_p", 1.5, r"top_p=1.5"), ("top_k", -1, r"top_k=-1"),
                                  ("max_new_tokens", 0, r"max_new_tokens=0")]:
        kwargs = {"max_new_tokens": 4, field: value}
        with pytest.raises(ValueError, match=r"SamplingSettings\." + message):
            SamplingSettings(**kwargs)
    SamplingSettings(max_new_tokens=4, greedy=True, temperature=0.0)  # greedy ignores the temperature
    with pytest.raises(ValueError, match=r"stop_token_ids: id\(s\) \[12\] are outside the model's vocabulary of 10"):
        SamplingSettings(max_new_tokens=4, stop_token_ids=(3, 12)).check_vocab(10)


def test_step_keys_are_fresh_per_step():
    base = jax.random.key(3)
    keys = [jax.random.key_data(fold_step_key(base, step)) for step in range(4)]
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 4
    np.testing.assert_array_equal(keys[2], jax.random.key_data(jax.random.fold_in(base, 2)))


# ------------------------------------------------------------------------------ two processes, one mesh

MULTI_CFG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, tie_word_embeddings=True)
MULTI_PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5], [8, 8, 1, 30, 2, 2, 9, 11, 4, 3, 6], [40, 41]]  # process 0: 3 rows, 1: 2
# one slot per data-parallel shard (2 per process) for 3 and 2 prompts: the processes refill in lockstep
MULTI_SETTINGS = dict(max_new_tokens=6, greedy=True, pad_token_id=PAD, prompt_bucket_min=8, stop_token_ids=(3, 9),
                      engine=dict(slots=2, page_size=2, check_every=2))

_CHILD = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import make_mesh, tree_shardings
from ruscarl_jax.sampler.generate import generate
from ruscarl_jax.sampler.settings import SamplingSettings

spec = json.loads(sys.argv[4])
cfg = qwen.QwenConfig(**spec["cfg"])
host = jax.tree.map(np.asarray, qwen.init_params(cfg, jax.random.key(0)))
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
shardings = tree_shardings(qwen.param_logical_axes(cfg), jax.tree.map(lambda x: x.shape, host), mesh)
params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings)
mine = spec["prompts"][:3] if jax.process_index() == 0 else spec["prompts"][3:]
out = generate(params, cfg, mine, jax.random.key(0), SamplingSettings(**spec["settings"]), mesh=mesh)
np.savez(sys.argv[3], tokens=out.tokens, mask=out.response_mask, logprobs=out.logprobs, prompt=out.prompt_tokens,
         reasons=out.finish_reason.astype(str))
jax.distributed.shutdown()
"""


def test_two_processes_each_get_their_own_rows_of_one_sharded_run(tmp_path):
    """Two processes (4 CPU devices each, gloo collectives) share one 8-device mesh; each passes its own
    prompts, of different counts and lengths, and gets back exactly the rows a one-device run gives them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    spec = json.dumps(dict(cfg=MULTI_CFG, prompts=MULTI_PROMPTS, settings=MULTI_SETTINGS))
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, address, str(i), str(tmp_path / f"out{i}.npz"), spec],
                                 env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(2)]
    logs = [child.communicate(timeout=300)[0] for child in children]
    assert [c.returncode for c in children] == [0, 0], "\n".join(logs)

    cfg = qwen.QwenConfig(**MULTI_CFG)
    ref = generate(qwen.init_params(cfg, jax.random.key(0)), cfg, MULTI_PROMPTS, jax.random.key(0),
                   SamplingSettings(**MULTI_SETTINGS))
    for i, rows in enumerate([slice(0, 3), slice(3, 5)]):
        got = np.load(tmp_path / f"out{i}.npz")
        assert got["tokens"].shape == (rows.stop - rows.start, MULTI_SETTINGS["max_new_tokens"])
        np.testing.assert_array_equal(got["prompt"], ref.prompt_tokens[rows])  # both padded to the global width
        np.testing.assert_array_equal(got["tokens"], ref.tokens[rows])
        np.testing.assert_array_equal(got["mask"], ref.response_mask[rows])
        np.testing.assert_array_equal(got["reasons"], ref.finish_reason[rows])
        np.testing.assert_allclose(got["logprobs"], ref.logprobs[rows], atol=1e-5)


def test_row_seeds_make_samples_independent_of_batch_layout():
    """A row's sample depends on its seed, not its position: what lets several hosts sample one batch."""
    from ruscarl_jax.models import qwen as qwen_module
    from ruscarl_jax.sampler.generate import generate as generate_fn

    cfg = qwen_module.QwenConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                 num_kv_heads=2, head_dim=8)
    params = qwen_module.init_params(cfg, jax.random.key(3))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    settings = SamplingSettings(max_new_tokens=8, temperature=1.5, prompt_bucket_min=8)
    key = jax.random.key(11)
    out = generate_fn(params, cfg, prompts, key, settings, row_seeds=[101, 202, 303])
    flipped = generate_fn(params, cfg, prompts[::-1], key, settings, row_seeds=[303, 202, 101])
    np.testing.assert_array_equal(out.tokens, flipped.tokens[::-1])
    other = generate_fn(params, cfg, prompts, key, settings, row_seeds=[104, 205, 306])
    assert (other.tokens != out.tokens).any()  # different seeds do draw differently

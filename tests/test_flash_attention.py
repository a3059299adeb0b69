"""Full-sequence attention: the fused kernels (splash on TPU) give the XLA reference's numbers, keep packed
segments apart, and appear in the programs compiled for a TPU topology (the TPU compiler on this CPU)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ruscarl_jax.models import attention, qwen
from ruscarl_jax.models.sharding import make_mesh, platform


def _qkv(b, t, h, kvh, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kvh, kvh))


def _segments(b, t):
    seg = np.zeros((b, t), np.int32)
    seg[0, 10:] = 1  # left padding, one sequence
    seg[1, :50], seg[1, 50:130], seg[1, 130:190] = 1, 2, 3  # three packed sequences, right padding
    return jnp.asarray(seg)


def _numpy_reference(q, k, v, seg):
    """float64 NumPy: softmax over keys s <= t of the query's segment, GQA by repeating KV heads."""
    q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((t, t), bool))[None]
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_xla_path_equals_float64_reference():
    q, k, v = _qkv(2, 200, 4, 2, 16)
    seg = _segments(2, 200)
    out = attention.segment_causal(q, k, v, seg, "xla", "cpu")
    np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, seg), atol=2e-5)


def test_splash_kernel_equals_xla_forward_and_backward():
    """The Pallas TPU kernel, run by the Pallas interpreter on CPU, against the XLA path (GQA 4:2, a length
    that is not a multiple of the kernel's 128-token tiles, padding and three packed segments)."""
    q, k, v = _qkv(2, 200, 4, 2, 64, seed=1)
    seg = _segments(2, 200)
    ref = attention.segment_causal(q, k, v, seg, "xla", "cpu")
    out = attention.segment_causal(q, k, v, seg, "splash", "cpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention.segment_causal(q, k, v, seg, impl, "cpu", interpret=True)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads("splash"), grads("xla")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_splash_sharded_over_mesh_equals_unsharded():
    """With a mesh the kernel runs per device (shard_map over rows and heads) and the result is unchanged."""
    q, k, v = _qkv(4, 128, 4, 2, 32, seed=2)
    seg = jnp.asarray(np.repeat(np.asarray(_segments(2, 128)), 2, axis=0))
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    ref = attention.segment_causal(q, k, v, seg, "xla", "cpu")
    out = jax.jit(lambda q, k, v, s: attention.segment_causal(q, k, v, s, "splash", "cpu", mesh, interpret=True))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_packed_rows_equal_separate_rows():
    """Two sequences packed in one row with segment ids and per-segment positions give the hidden states of
    the same sequences run as separate left-padded rows."""
    cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = qwen.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(3)
    a, b = rng.integers(1, 64, 7), rng.integers(1, 64, 5)
    rows = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), np.int32)
    rows[0], mask[0] = a, 1
    rows[1, 2:], mask[1, 2:] = b, 1
    sep = qwen.forward(params, cfg, jnp.asarray(rows), jnp.asarray(mask))
    packed = np.zeros((1, 16), np.int32)
    packed[0, :7], packed[0, 7:12] = a, b
    seg = np.zeros((1, 16), np.int32)
    seg[0, :7], seg[0, 7:12] = 1, 2
    pos = np.zeros((1, 16), np.int32)
    pos[0, :7], pos[0, 7:12] = np.arange(7), np.arange(5)
    out = qwen.forward(params, cfg, jnp.asarray(packed), jnp.asarray(seg > 0, jnp.int32), jnp.asarray(pos),
                       segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(out[0, :7]), np.asarray(sep[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 7:12]), np.asarray(sep[1, 2:]), atol=1e-5)


@pytest.fixture(scope="module")
def v5p_devices():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topologies = pytest.importorskip("jax.experimental.topologies")
    pytest.importorskip("libtpu")
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def test_tpu_training_forward_backward_holds_mosaic_kernel_and_no_scores(v5p_devices):
    """Compiled by the TPU compiler for a v5p-8 mesh: a Qwen forward + backward over 2048 tokens runs the
    splash kernel (Mosaic custom calls for the forward and both backward halves) and never builds the
    [heads, T, T] float32 scores (which alone would be 2 rows x 4 heads x 2048^2 x 4 B = 128 MiB per layer)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh({"fsdp": -1}, v5p_devices)
    assert platform(mesh) == "tpu"
    cfg = qwen.QwenConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=128, dtype="bfloat16", remat="full")
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          qwen.param_shapes(cfg), qwen.param_shardings(cfg, mesh))
    tokens = jax.ShapeDtypeStruct((8, 2048), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))

    def loss(p, t):
        return jnp.mean(qwen.forward(p, cfg, t, jnp.ones_like(t), mesh=mesh).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3
    assert "splash" in hlo
    assert "2048,2048" not in hlo  # no [.., T, T] buffer anywhere in the program


def test_tpu_packed_update_and_log_probs_hold_mosaic_kernels(v5p_devices):
    """The packed GRPO update and log-prob pass of a small Qwen, compiled for a v5p-8 mesh: splash kernels in
    both (forward; forward + backward in the update) and no [T, T] buffer for the 1024-token packed buffers."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer
    from ruscarl_jax.rl.policy import qwen_policy
    from ruscarl_jax.rl.settings import GRPOSettings
    from ruscarl_jax.rl.train_step import grpo_update, rollout_logprobs

    mesh = make_mesh({"fsdp": -1}, v5p_devices)
    cfg = qwen.QwenConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=128, dtype="bfloat16", remat="full")
    policy = qwen_policy(cfg, mesh)
    settings = GRPOSettings(ppo_mini_batch_size=8, ppo_micro_batch_size=4, micro_token_budget=1024, use_kl_loss=False)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-5))
    shardings = qwen.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), qwen.param_shapes(cfg), shardings)
    opt_state = jax.eval_shape(optimizer.init, params)
    rows = lambda *shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))  # noqa: E731
    batch = {"input_ids": rows(8, 1024), "attention_mask": rows(8, 1024), "response_mask": rows(8, 512),
             "rewards": rows(8, dt=jnp.float32), "group_ids": rows(8)}
    old = rows(8, 512, dt=jnp.float32)
    lp = jax.jit(lambda p, b: rollout_logprobs(p, b, policy=policy, settings=settings)).lower(params, batch).compile()
    update = jax.jit(lambda p, o, b, lp, k: grpo_update(p, o, b, lp, None, k, policy=policy, settings=settings,
                                                        optimizer=optimizer))
    up = update.lower(params, opt_state, batch, old, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    for compiled, kernels in ((lp, 1), (up, 3)):
        hlo = compiled.as_text()
        assert hlo.count('custom_call_target="tpu_custom_call"') >= kernels and "splash" in hlo
        assert "1024,1024" not in hlo

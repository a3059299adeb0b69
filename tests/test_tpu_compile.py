"""Programs built by the real TPU compiler (libtpu, on this CPU host: no TPU is needed): the slice
topologies, the collectives read from the optimized HLO against the sizes of explicit collectives, loop
trip counts, and Mosaic (Pallas) kernels."""
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu's lock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ruscarl_jax.plan import hlo, topology

pytest.importorskip("libtpu", reason="the TPU compiler (libtpu) is not installed")


def _sds(shape, dtype, mesh, spec=P()):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def test_slice_topologies():
    assert topology.tpu_topology("v5p-64").topology_name == "v5p:2x4x4"
    assert topology.tpu_topology("v5p-128").shape == (4, 4, 4)
    assert topology.tpu_topology("v4-8").chip_config_name == "megacore"
    t = topology.tpu_topology("v6e-64")
    assert (t.topology_name, t.chips, t.chip_config_name) == ("v6e:8x8", 64, "default")
    with pytest.raises(ValueError, match="two per chip"):
        topology.tpu_topology("v5p-6")
    with pytest.raises(ValueError, match="not a TPU slice"):
        topology.tpu_topology("h100-8")
    mesh = topology.tpu_mesh("v5p-8", {"fsdp": 2, "tensor": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    assert {d.platform for d in mesh.devices.flat} == {"tpu"} and mesh.devices.size == 4


def test_collectives_per_loop_iteration_match_the_explicit_ones():
    """A 7-step loop (a fori_loop from 3 to 10) of explicit collectives over 4 chips: the bytes read from
    the optimized HLO per iteration are the sizes of the arrays each collective is given."""
    mesh = topology.tpu_mesh("v5p-8", {"fsdp": -1})
    n = mesh.shape["fsdp"]

    def per_device(x, y):
        def body(i, carry):
            x, y, acc = carry
            gathered = jax.lax.all_gather(x, "fsdp", tiled=True)  # [4*128, 256] bf16 result
            reduced = jax.lax.psum(y * i.astype(y.dtype), "fsdp")  # [64, 128] f32 operand
            shifted = jax.lax.ppermute(x, "fsdp", [(j, (j + 1) % n) for j in range(n)])  # [128, 256] bf16
            return shifted + gathered[:128], reduced, acc + gathered.sum(dtype=jnp.float32)
        return jax.lax.fori_loop(3, 10, body, (x, y, jnp.float32(0)))

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("fsdp"), P("fsdp")),
                              out_specs=(P("fsdp"), P("fsdp"), P()), check_vma=False))
    compiled = f.lower(_sds((n * 128, 256), jnp.bfloat16, mesh, P("fsdp")),
                       _sds((n * 64, 128), jnp.float32, mesh, P("fsdp"))).compile()
    summary = hlo.analyze(compiled.as_text(), num_devices=n)
    assert summary.tiled_layouts  # TPU tiled layouts: the TPU compiler built it
    (loop,) = [loop for loop in summary.loops if loop.per_iteration["all-gather"]]
    assert loop.trip_count == 7
    expected = {"all-gather": n * 128 * 256 * 2, "all-reduce": 64 * 128 * 4, "collective-permute": 128 * 256 * 2}
    for kind, size in expected.items():
        assert loop.per_iteration[kind] == size, (kind, loop.per_iteration)
        assert summary.per_step[kind] == 7 * size
    assert summary.per_step["reduce-scatter"] == summary.per_step["all-to-all"] == 0


def test_megablox_is_a_mosaic_kernel_in_the_tpu_program():
    from ruscarl_jax.models import moe

    mesh = topology.tpu_mesh("v5e-1", {})  # one chip: a Mosaic kernel is not partitioned by the compiler
    assert moe.default_gmm_impl("tpu") == "megablox"
    f = jax.jit(lambda x, w, g: moe.grouped_matmul(x, w, g, target="tpu"))
    compiled = f.lower(_sds((512, 256), jnp.bfloat16, mesh), _sds((4, 256, 512), jnp.bfloat16, mesh),
                       _sds((4,), jnp.int32, mesh)).compile()
    summary = hlo.analyze(compiled.as_text(), num_devices=1)
    assert "gmm" in summary.mosaic_kernels
    # the CPU path of the same function has no Mosaic kernel: the check can tell them apart
    cpu = jax.jit(lambda x, w, g: moe.grouped_matmul(x, w, g, target="cpu")).lower(
        np.zeros((512, 256), jnp.bfloat16), np.zeros((4, 256, 512), jnp.bfloat16), np.zeros(4, np.int32)).compile()
    assert hlo.analyze(cpu.as_text()).mosaic_kernels == ()


def test_matmul_flops_match_the_einsum_count():
    """FLOPs read from the TPU HLO (where the compiler writes a batched matmul as a dilated convolution)
    against 2 x M x N x K of each einsum, and against XLA's own cost analysis."""
    mesh = topology.tpu_mesh("v5e-1", {})

    def f(q, k, w, wq):
        x = q.reshape(4, 256, 512)
        return (jnp.einsum("bqhd,bkhd->bhqk", q, k), jnp.einsum("bqe,ef->bqf", x, w),
                jnp.einsum("bte,ehd->bthd", x, wq))  # a head-split projection: a window over padded heads

    compiled = jax.jit(f).lower(_sds((4, 256, 4, 128), jnp.bfloat16, mesh), _sds((4, 256, 4, 128), jnp.bfloat16, mesh),
                                _sds((512, 1024), jnp.bfloat16, mesh), _sds((512, 8, 64), jnp.bfloat16, mesh)).compile()
    # the projection compiles to a convolution with window 1x8 and padding 7_7: counted by its window's
    # size it would read 8x its FLOPs
    assert re.search(r"window=\{size=1x8 pad=0_0x7_7", compiled.as_text())
    expected = 2 * 4 * 4 * 256 * 256 * 128 + 2 * 4 * 256 * 512 * 1024 + 2 * 4 * 256 * 512 * 8 * 64
    summary = hlo.analyze(compiled.as_text())
    assert summary.flops == summary.flops_once == expected
    cost = compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] == pytest.approx(expected, rel=0.01)


def test_hbm_bytes_follow_the_layer_loop():
    """HBM bytes read from the HLO: a 28-layer scan reads each layer's weights once (a slice of the stack,
    not the stack per layer), and its body counted once agrees with XLA's own bytes accessed."""
    mesh = topology.tpu_mesh("v5e-1", {})

    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    compiled = jax.jit(f).lower(_sds((128, 1024), jnp.bfloat16, mesh), _sds((28, 1024, 1024), jnp.bfloat16, mesh)).compile()
    summary = hlo.analyze(compiled.as_text())
    cost = compiled.cost_analysis()
    xla_once = (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]
    assert summary.hbm_bytes_once == pytest.approx(xla_once, rel=0.15)
    weights, activations = 28 * 1024 * 1024 * 2, 28 * 2 * 128 * 1024 * 2
    assert weights + activations <= summary.hbm_bytes <= 1.5 * (weights + activations)  # the stack per layer: 28x


def test_trip_count_and_group_parsing():
    assert hlo.group_size("replica_groups=[2,4]<=[8]", 8) == 4
    assert hlo.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}", 8) == 4
    assert hlo.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 8) == 4
    assert hlo.group_size("replica_groups={}", 8) == 8
    assert hlo.shape_bytes("(s32[], bf16[64,256]{1,0:T(8,128)(2,1)}, f32[3])") == 4 + 64 * 256 * 2 + 12


_MULTILINE_KERNEL = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %k = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"cost_estimate":{"flops":"100"},
"xprof_metadata":"{\\"block_q\\": 256,
}"
}}, metadata={op_name="splash"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]) tuple(%next, %k)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(28)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> (s32[], f32[8]) {
  %a = f32[8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %a)
  ROOT %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
}
"""


def test_a_kernel_config_over_several_lines_keeps_the_loop():
    """A Mosaic kernel's backend_config may span lines, one starting with '}' (splash attention's xprof
    metadata): the loop body it sits in keeps its ROOT, so the layer loop's trip count (28) multiplies its
    FLOPs and kernels. Read line by line, the body ended at '}}' and the loop counted once."""
    summary = hlo.analyze(_MULTILINE_KERNEL)
    (loop,) = summary.loops
    assert (loop.trip_count, loop.exact) == (28, True)
    assert summary.flops == 28 * 100 and summary.flops_once == 100
    assert [(k.name, k.count) for k in summary.kernels if k.mosaic] == [("k", 28)]


# ----------------------------------------------------------------------------- the step's programs for TPU

from configs import tiny, tiny_moe  # noqa: E402
from ruscarl_jax.plan.memory_plan import parse_slice  # noqa: E402
from ruscarl_jax.plan.step_memory import model_config, plan_config  # noqa: E402

DENSE_PROGRAMS = ["rollout prefill", "rollout decode", "log-probs", "GRPO update"]


@pytest.fixture(scope="module")
def tiny_v5p():
    """The tiny config's step compiled by the TPU compiler for a v5p-8 (4 chips, data parallel)."""
    return tiny.get_config(), plan_config(tiny.get_config(), parse_slice("v5p-8"))


@pytest.fixture(scope="module")
def moe_v6e():
    """tiny_moe's step for a v6e-4 (4 chips), experts over an expert axis, with routing replay (so the
    rollout-routing pass runs and is planned)."""
    config = tiny_moe.get_config()
    config.mesh.update(dict(data=2, expert=2))
    config.grpo.routing_replay = True
    return config, plan_config(config, parse_slice("v6e-4"))


def test_tiny_step_compiles_for_v5p(tiny_v5p):
    config, plan = tiny_v5p
    assert plan.backend.startswith("the TPU compiler (libtpu), topology v5p:2x2x1")
    assert [p.name for p in plan.programs] == DENSE_PROGRAMS
    for p in plan.programs:
        assert p.hlo.tiled_layouts, p.name  # TPU tiled layouts: built by the TPU compiler, not for CPU
        assert p.peak > 0 and p.flops > 0
    decode = plan.programs[1]
    loop = hlo.main_loop(decode.hlo)
    # the chunk loop runs at most check_every steps and exits early when every slot is done
    assert (loop.trip_count, loop.exact) == (16, False)
    cfg = model_config(config)
    for p in plan.programs:  # every layer loop (the scan over layers, forward and backward) has its trip count
        layer_loops = [loop for loop in p.hlo.loops if loop.op_name.endswith("Qwen)/while") or
                       loop.op_name.endswith("Qwen/while")]
        assert layer_loops and all(loop.trip_count == cfg.num_layers for loop in layer_loops), (p.name, p.hlo.loops)
    # the update's compiled matmul FLOPs per chip against 6 x parameters x tokens, where the (tied) LM head
    # scores only the response positions; splash attention reports no FLOPs and the tiny config does not
    # remat, so they agree closely. Failed before: every layer loop counted once (0.35 of it), a head-split
    # projection counted by its padded window (1.4 of it)
    update = plan.programs[-1]
    head = cfg.vocab_size * cfg.hidden_size
    rows, response = plan.step.rows, plan.step.response_tokens
    width = plan.step.update_model_flops / (6 * cfg.num_params * rows * int(config.grpo.ppo_epochs))
    reference = 6 * ((cfg.num_params - head) * rows * width + head * rows * response) * int(config.grpo.ppo_epochs)
    assert 0.9 <= update.flops / (reference / plan.step.chips) <= 1.2, (update.flops, reference / plan.step.chips)
    pred = plan.predictions()
    assert pred["step_seconds"] > 0 and pred["rollout_tokens_per_s_per_chip"] > 0 and 0 < pred["update_mfu"] < 1
    text = plan.report()
    assert "compile-time prediction on TPU v5p peaks" in text and "Mosaic (Pallas) kernels:" in text
    assert text.splitlines()[-1] == plan.verdict() and plan.fits


def _decode_bound(cfg, slots, compute_bytes):
    """What one decode step must move per chip at most when each data shard decodes its own slots from its
    own pages in a rollout layout: per layer two activation all-reduces of [slots, hidden] (tensor
    parallelism), the float32 logits of every slot, and 64 KiB of flags and counters. No weights, no pages."""
    return slots * (2 * cfg.num_layers * cfg.hidden_size * compute_bytes + cfg.vocab_size * 4) + 2**16


def test_decode_step_moves_at_most_its_activations(tiny_v5p):
    config, plan = tiny_v5p
    cfg = model_config(config)
    decode = plan.programs[1]
    loop = hlo.main_loop(decode.hlo)
    assert (loop.trip_count, loop.exact) == (16, False)
    slots = int(config.data.batch_size) * int(config.rollout.num_generations)
    bound = _decode_bound(cfg, slots, 4)
    # the bound is below what moving the weights or the KV cache once per step would cost, so it can fail
    assert bound < cfg.num_params * 4
    assert sum(loop.per_iteration.values()) <= bound, loop.per_iteration


def test_update_moves_at_most_three_model_copies_per_minibatch(tiny_v5p):
    """Data parallel: one gradient all-reduce per minibatch (at least the parameters, at most forward and
    backward all-gathers plus the reduction: three float32 copies of the model)."""
    config, plan = tiny_v5p
    cfg = model_config(config)
    update = plan.programs[-1]
    loop = hlo.main_loop(update.hlo)
    assert loop.trip_count == 64 // 32  # rows / ppo_mini_batch_size minibatches
    moved = sum(loop.per_iteration.values())
    assert cfg.num_params * 4 <= moved <= 3 * cfg.num_params * 4, loop.per_iteration


@pytest.mark.timeout(3600)  # five MoE programs with megablox: minutes of TPU compilation on 2 busy cores
def test_moe_step_plans_routing_and_runs_megablox(moe_v6e):
    _, plan = moe_v6e
    names = [p.name for p in plan.programs]
    assert names == ["rollout prefill", "rollout decode", "rollout routing", "log-probs", "GRPO update"]
    assert plan.backend.endswith("topology v6e:2x2") and plan.chip.name == "TPU v6e"
    for p in plan.programs:
        assert p.hlo.tiled_layouts
        assert "gmm" in p.hlo.mosaic_kernels, (p.name, p.hlo.mosaic_kernels)  # megablox, not the CPU block path
    routing = plan.programs[2]
    assert routing.calls >= 1 and routing.peak > 0


def test_pallas_paged_attention_on_one_chip():
    """One page group (one data shard): the decode step runs the Pallas paged-attention kernel."""
    config = tiny.get_config()
    config.data.batch_size = 2
    config.grpo.update(dict(ppo_mini_batch_size=16, ppo_micro_batch_size=16))  # 2 prompts x 8 generations
    config.model.tiny.head_dim = 128  # the TPU kernel's blocks need a 128-lane head dimension (16 fails to lower)
    plan = plan_config(config, parse_slice("v5e-1"))
    decode = plan.programs[1]
    assert any("paged_attention" in k for k in decode.hlo.mosaic_kernels), decode.hlo.mosaic_kernels
    prefill = plan.programs[0].hlo.mosaic_kernels  # the prefill attends over its prompt with splash attention
    assert any("splash" in k for k in prefill) and not any("paged_attention" in k for k in prefill), prefill

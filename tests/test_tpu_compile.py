"""Programs built by the real TPU compiler (libtpu, on this CPU host: no TPU is needed): the slice
topologies, the collectives read from the optimized HLO against the sizes of explicit collectives, loop
trip counts, and Mosaic (Pallas) kernels."""
import os

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


def test_trip_count_and_group_parsing():
    assert hlo.group_size("replica_groups=[2,4]<=[8]", 8) == 4
    assert hlo.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}", 8) == 4
    assert hlo.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 8) == 4
    assert hlo.group_size("replica_groups={}", 8) == 8
    assert hlo.shape_bytes("(s32[], bf16[64,256]{1,0:T(8,128)(2,1)}, f32[3])") == 4 + 64 * 256 * 2 + 12

"""TPU slices as the TPU compiler sees them, on a host without a TPU.

    devices = tpu_devices("v5p-64")                # 32 chips of a v5p-64 (libtpu, no TPU needed)
    mesh = tpu_mesh("v5p-64", {"fsdp": -1})        # a Mesh of them, laid out along the torus
    compiled = jax.jit(f).lower(*abstract_args).compile()   # a real TPU executable

A slice name (``v4-N``, ``v5p-N``: N TensorCores, two per chip; ``v5e-N``, ``v6e-N``: N chips) maps to
the topology Google publishes for it (Cloud TPU docs, "TPU versions" / accelerator types; the same table as
MaxText's ``accelerator_to_spec_map.py``): v4 and v5p are 3-D tori of megacore chips, 4 chips (2x2x1)
per host; v5e and v6e are 2-D, one TensorCore per chip, 2x2 chips per host bound. libtpu takes a
machine-wide lock when it loads; ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (set here) lets several processes
(parallel tests, several planners) load it at once.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

TPU_FAMILIES = ("v4", "v5e", "v5p", "v6e")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# chips -> torus shape, from the published slice shapes (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e)
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8), 768: (8, 8, 12),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    family: str  # v4, v5e, v5p, v6e
    chips: int
    shape: tuple[int, ...]  # chips along each torus axis
    chip_config_name: str  # "megacore" (v4, v5p: two TensorCores as one device) or "default"
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def topology_name(self) -> str:
        return f"{self.family}:{'x'.join(str(d) for d in self.shape)}"


def tpu_topology(name: str) -> TpuTopology:
    """'v5p-64' -> the v5p:2x4x4 torus of 32 megacore chips; 'v6e-8' -> v6e:2x4. A clear error names the
    sizes a family comes in."""
    match = re.fullmatch(r"([a-z0-9]+?)-(\d+)", name.strip().lower())
    family = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if family not in TPU_FAMILIES:
        raise ValueError(f"--slice={name!r}: not a TPU slice; TPU families: {', '.join(f + '-N' for f in TPU_FAMILIES)}")
    count = int(match.group(2))
    if family in ("v4", "v5p"):
        if count % 2 or count // 2 not in _SHAPES_3D:
            sizes = ", ".join(f"{family}-{2 * c}" for c in _SHAPES_3D)
            raise ValueError(f"--slice={name!r}: {family} slices are named by TensorCores (two per chip): {sizes}")
        chips = count // 2
        return TpuTopology(family, chips, _SHAPES_3D[chips], "megacore", (2, 2, 1))
    if count not in _SHAPES_2D:
        raise ValueError(f"--slice={name!r}: {family} slices come in {', '.join(f'{family}-{c}' for c in _SHAPES_2D)}")
    return TpuTopology(family, count, _SHAPES_2D[count], "default", (1, 1, 1) if count == 1 else (2, 2, 1))


def allow_shared_libtpu() -> None:
    """Let this process load libtpu while another holds its lock (before JAX first loads it)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(name: str) -> list[Any]:
    """The chips of a TPU slice as compile-only devices (the TPU compiler, no TPU): platform 'tpu'."""
    allow_shared_libtpu()
    from jax.experimental import topologies

    t = tpu_topology(name)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=t.topology_name,
                                            chip_config_name=t.chip_config_name,
                                            chips_per_host_bounds=t.chips_per_host_bounds, num_slices=1)
    except Exception as err:  # libtpu missing or a topology this libtpu does not know
        raise RuntimeError(f"--slice={name}: the TPU compiler could not describe {t.topology_name} ({err}); "
                           "is libtpu installed (pip install 'ruscarl_jax[tpu]')?") from err
    devices = list(desc.devices)
    if len(devices) != t.chips:
        raise RuntimeError(f"--slice={name}: {t.topology_name} gave {len(devices)} devices, expected {t.chips}")
    return devices


def tpu_mesh(name: str, shape: dict[str, int] | Sequence[tuple[str, int]]) -> Any:
    """A Mesh over a TPU slice's chips with the project's axes (data, fsdp, expert, tensor), laid out along
    the torus where JAX knows how (mesh_utils), else in device order."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from ruscarl_jax.models.sharding import MESH_AXES, make_mesh

    devices = tpu_devices(name)
    mesh = make_mesh(shape, devices)  # validates the axis sizes and resolves -1
    sizes = [mesh.shape[a] for a in MESH_AXES]
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # a shape mesh_utils cannot lay out physically: device order is still a valid mesh
        return mesh
    assert math.prod(grid.shape) == len(devices)
    return Mesh(grid, MESH_AXES)

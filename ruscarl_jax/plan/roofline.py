"""Seconds a compiled program would take on a chip, predicted from what the compiler says about it: the
compiler's own cost model where it reports one, and a roofline from the chip's published peaks.

A prediction, not a measurement: it assumes the program runs at the chip's peak FLOP rate, HBM bandwidth
or interconnect bandwidth, whichever binds (the roofline, a lower bound on time), or at the rate the
compiler's cost model estimates (``optimal_seconds``); no program ran on a chip. Host work, input
feeding, the judge and the Python between programs are not in it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense bfloat16 FLOP/s per chip
    hbm_bytes_per_s: float  # per chip
    ici_bytes_per_s: float  # bidirectional inter-chip interconnect per chip (a chip sends at most half)
    source: str


# One table of published peaks. Sources: Google Cloud TPU documentation, "TPU v4" / "TPU v5e" / "TPU v5p" /
# "TPU v6e" pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), key specifications per chip; v4's ICI
# is not on its page: 6 links x 45 GB/s per direction (the JAX scaling book, jax-ml.github.io/scaling-book/tpus).
# GPUs: NVIDIA H100 SXM and H200 data sheets (dense BF16 Tensor Core, HBM3/HBM3e, NVLink 900 GB/s).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 540e9, "cloud.google.com/tpu/docs/v4; ICI: jax-ml scaling book"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 400e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 1200e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 1638e9, 800e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("H100 SXM", 989e12, 3350e9, 900e9, "NVIDIA H100 Tensor Core GPU data sheet"),
    "h200": Chip("H200 SXM", 989e12, 4800e9, 900e9, "NVIDIA H200 Tensor Core GPU data sheet"),
}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds of one call of a program on one chip (all chips run it in step)."""

    compute_s: float  # FLOPs at peak
    memory_s: float  # HBM bytes at peak bandwidth
    network_s: float  # bytes this chip sends at half its bidirectional ICI bandwidth
    cost_model_s: float  # the compiler's optimal_seconds scaled by the loop trip counts (0: not reported)

    @property
    def roofline_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.network_s)

    @property
    def seconds(self) -> float:
        """The prediction: the slower of the roofline and the compiler's cost model."""
        return max(self.roofline_s, self.cost_model_s)

    @property
    def bound(self) -> str:
        terms = {"compute": self.compute_s, "HBM": self.memory_s, "ICI": self.network_s}
        return max(terms, key=terms.get)


def estimate(chip: Chip, flops: float, hbm_bytes: float, wire_bytes: float, cost_model_s: float = 0.0) -> Estimate:
    return Estimate(flops / chip.bf16_flops, hbm_bytes / chip.hbm_bytes_per_s, wire_bytes / (chip.ici_bytes_per_s / 2),
                    cost_model_s)


def chip_table() -> str:
    """The peaks as a Markdown table (docs/memory_plan.md)."""
    lines = ["| chip | bf16 TFLOP/s | HBM GB/s | ICI GB/s (bidirectional) | source |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.bf16_flops / 1e12:g} | {c.hbm_bytes_per_s / 1e9:g} | {c.ici_bytes_per_s / 1e9:g} | {c.source} |"
              for c in CHIPS.values()]
    return "\n".join(lines)

"""What one instruction of an optimized HLO module costs: its FLOPs (matmuls, convolution-written matmuls
counted by the window taps that land on real input, Mosaic kernels by their own estimate) and the HBM
bytes it reads and writes (as XLA's cost analysis counts them, with sliced operands and in-place
updates counted by what they touch). `plan.hlo.analyze` multiplies them by the loops' trip counts.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ruscarl_jax.plan import hlo_text
from ruscarl_jax.plan.hlo_text import Computation, Instruction, shape_bytes


def flops(inst: Instruction, comp: Computation) -> float:
    """FLOPs of a dot, a convolution (how the TPU compiler writes matmuls) or a Mosaic kernel (its own
    cost estimate); 0 for anything else."""
    if inst.opcode == "custom-call":
        match = re.search(r'"cost_estimate":\{"flops":"(\d+)"', inst.attrs)
        return float(match.group(1)) if match else 0.0
    if inst.opcode not in ("dot", "convolution") or len(inst.operands) < 2:
        return 0.0
    out = math.prod(hlo_text.dims(inst.shape))
    lhs = comp.instructions.get(inst.operands[0])
    rhs = comp.instructions.get(inst.operands[1])
    if inst.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
        if lhs is None or contracting is None:
            return 0.0
        dims = hlo_text.dims(lhs.shape)
        return 2.0 * out * math.prod(dims[int(d)] for d in contracting.group(1).split(",") if d)
    return _convolution_flops(inst, lhs, rhs)


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
    match = re.search(rf"\b{key}=([0-9x]+)", attrs)
    return [int(v) for v in match.group(1).split("x")] if match else [default] * n


def _convolution_flops(inst: Instruction, lhs: Instruction | None, rhs: Instruction | None) -> float:
    """2 x output elements x input features per group x the kernel taps that land on real input, per output
    position. The TPU compiler writes batched and head-split matmuls as convolutions whose window slides
    over padding or an lhs-dilated dimension, where all but one tap multiply zeros; counted as XLA's cost
    analysis counts them (valid window positions per spatial dimension), not as the window's size."""
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S+?)[,\s]", inst.attrs + " ")
    if lhs is None or rhs is None or labels is None:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs_dims, kernel, out_dims = hlo_text.dims(lhs.shape), hlo_text.dims(rhs.shape), hlo_text.dims(inst.shape)
    if "i" not in rhs_labels or rhs_labels.index("i") >= len(kernel):
        return 0.0
    flops = 2.0 * math.prod(out_dims) * kernel[rhs_labels.index("i")]
    spatial = sorted(c for c in lhs_labels if c.isdigit())
    if not spatial:
        return flops
    n = len(spatial)
    size = _window(inst.attrs, "size", n, 1)
    stride = _window(inst.attrs, "stride", n, 1)
    lhs_dilate = _window(inst.attrs, "lhs_dilate", n, 1)
    rhs_dilate = _window(inst.attrs, "rhs_dilate", n, 1)
    pad = re.search(r"\bpad=([0-9_x\-]+)", inst.attrs)
    pads = [tuple(int(v) for v in p.split("_")) for p in pad.group(1).split("x")] if pad else [(0, 0)] * n
    for d, label in enumerate(spatial):
        if label not in out_labels or max(lhs_labels.index(label), out_labels.index(label)) >= min(len(lhs_dims), len(out_dims)):
            return flops
        extent, outputs = lhs_dims[lhs_labels.index(label)], out_dims[out_labels.index(label)]
        o = np.arange(outputs)[:, None]
        k = np.arange(size[d])[None, :]
        pos = o * stride[d] + k * rhs_dilate[d] - pads[d][0]  # in the padded, lhs-dilated input
        valid = (pos >= 0) & (pos <= (extent - 1) * lhs_dilate[d]) & (pos % lhs_dilate[d] == 0)
        flops *= float(valid.sum()) / max(outputs, 1)
    return flops


# instructions that move no HBM bytes of their own: structure, aliases, and control flow (its bodies count)
NO_TRAFFIC = frozenset(("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
                         "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
                         "copy-done", "async-done", "async-update", "all-gather-done", "all-reduce-done",
                         "collective-permute-done", "send-done", "recv-done"))
_SLICING = ("dynamic-slice", "slice", "gather")


def _read_of_parameters(fused: Computation, computations: dict[str, Computation], depth: int = 0
                        ) -> dict[int, int | None]:
    """Per parameter number of a fused computation: the bytes it reads when every use slices it (a layer's
    weights out of the stacked layers, a page out of the pool; through nested fusions), else None (read
    whole)."""
    params = {i.name: int(i.args) for i in fused.instructions.values()
              if i.opcode == "parameter" and i.args.strip().isdigit()}
    reads: dict[int, int | None] = {}
    for inst in fused.instructions.values():
        nested = None
        if inst.opcode == "fusion" and depth < 8:
            callee = computations.get(hlo_text.callee(inst.attrs, "calls") or "")
            nested = _read_of_parameters(callee, computations, depth + 1) if callee is not None else {}
        for position, operand in enumerate(inst.operands):
            if operand not in params:
                continue
            number = params[operand]
            if inst.opcode in _SLICING and position == 0:
                part = shape_bytes(inst.shape)
            elif nested is not None and nested.get(position) is not None:
                part = nested[position]
            else:
                part = None
            reads[number] = None if part is None or (number in reads and reads[number] is None) \
                else (reads.get(number) or 0) + part
    return reads


def traffic(inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> int:
    """HBM bytes of one execution of a top-level instruction: its result and its operands, as XLA's cost
    analysis counts them. An operand only sliced (a layer's weights out of the stacked layers) reads the
    slice; an in-place update (dynamic-update-slice or scatter, alone or at a fusion's root) reads and
    writes the update, not the buffer it aliases."""
    if inst.opcode == "custom-call" and "AllocateBuffer" in inst.attrs:
        return 0
    operands = [shape_bytes(comp.instructions[o].shape) if o in comp.instructions else 0 for o in inst.operands]
    result = shape_bytes(inst.shape)
    if inst.opcode in _SLICING:
        return 2 * result + sum(operands[1:])
    root = inst
    if inst.opcode == "fusion":
        fused = computations.get(hlo_text.callee(inst.attrs, "calls") or "")
        if fused is not None:
            reads = _read_of_parameters(fused, computations)
            operands = [o if reads.get(i) is None else min(o, reads[i]) for i, o in enumerate(operands)]
            root = fused.root or inst
    if root.opcode in ("dynamic-update-slice", "scatter"):
        return 2 * sum(o for o in operands if o < result)
    return result + sum(operands)

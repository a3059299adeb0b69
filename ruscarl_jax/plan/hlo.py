"""What a compiled program moves between chips, and which kernels it runs, read from its optimized HLO.

    summary = analyze(compiled.as_text(), num_devices=mesh.size)
    summary.per_step            # {"all-gather": bytes, ...} per device for one call of the program
    summary.loops               # each while loop: trip count, bytes per iteration by kind
    summary.kernels             # Mosaic (Pallas) kernels and other custom calls
    summary.flops, .hbm_bytes   # per device per call, loops multiplied out (each instruction's: plan.hlo_cost)

Bytes are per device, of the buffer each collective works on: the result of an all-gather (what each
device ends up holding), the operand of an all-reduce, a reduce-scatter, an all-to-all and a
collective-permute (what each device contributes). `wire_bytes` turns them into what a ring or a
direct exchange sends over the links: (n-1)/n of the buffer, twice for an all-reduce.

Collectives are attributed to the while loops that contain them, with the loop's trip count read from
the compiler's `known_trip_count` or, where the TPU compiler leaves it out, from the loop itself (its
induction variable's start, step and bound), so figures "per decode step" or "per micro-batch" are those
of one iteration. Collectives the TPU compiler fuses (an all-reduce followed by a slice, fused as an
"all-reduce-scatter") are counted as the reduce-scatter they are.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ruscarl_jax.plan import hlo_cost
from ruscarl_jax.plan import hlo_text
from ruscarl_jax.plan.hlo_text import Computation, Instruction, parse, shape_bytes  # noqa: F401  (the readers' API)

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE_KIND = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
    "collective-broadcast": "collective-permute",
}
MOSAIC = "tpu_custom_call"  # the custom-call target of a Pallas TPU (Mosaic) kernel


def group_size(attrs: str, num_devices: int) -> int:
    """Devices in each replica group of a collective (all of them when the groups are left empty)."""
    if "source_target_pairs=" in attrs:
        return 2
    match = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)  # iota form [groups, size]<=[...]
    if match:
        dims = [int(d) for d in match.group(1).split(",")]
        return math.prod(dims[1:]) if len(dims) > 1 else dims[0]
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh form: axes named
    if match:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", match.group(2))) or 1
    match = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if match:
        return len([d for d in match.group(1).split(",") if d.strip()])
    return num_devices


_PASS_THROUGH = ("copy", "convert", "bitcast", "reshape", "broadcast", "bitcast-convert")


def _linear(comp: Computation, name: str, env: dict[int, tuple[Computation, str, Any]] | None,
            computations: dict[str, Computation], depth: int = 0) -> tuple[int | None, int] | None:
    """`name` as (tuple index of the loop state, offset): element[index] + offset, or (None, c) for a constant
    c; seen through copies, converts, adds of constants and fusion parameters; None if it is neither."""
    inst = comp.instructions.get(name)
    if inst is None or depth > 16:
        return None
    op = inst.opcode
    if op == "constant":
        return (None, int(inst.args)) if re.fullmatch(r"\s*-?\d+\s*", inst.args) else None
    if op == "parameter":
        number = int(inst.args) if inst.args.strip().isdigit() else -1
        if env is not None and number in env:
            outer, outer_name, outer_env = env[number]
            return _linear(outer, outer_name, outer_env, computations, depth + 1)
        return None
    if op == "get-tuple-element":
        source = comp.instructions.get(inst.operands[0]) if inst.operands else None
        index = re.search(r"index=(\d+)", inst.attrs)
        if source is not None and source.opcode == "parameter" and index and (env is None or not env):
            return (int(index.group(1)), 0)
        return None
    if op in _PASS_THROUGH and inst.operands:
        return _linear(comp, inst.operands[0], env, computations, depth + 1)
    if op in ("add", "subtract") and len(inst.operands) == 2:
        a = _linear(comp, inst.operands[0], env, computations, depth + 1)
        b = _linear(comp, inst.operands[1], env, computations, depth + 1)
        if a is None or b is None:
            return None
        sign = 1 if op == "add" else -1
        if b[0] is None:
            return (a[0], a[1] + sign * b[1])
        if a[0] is None and op == "add":
            return (b[0], a[1] + b[1])
        return None
    if op == "fusion":
        fused = computations.get(hlo_text.callee(inst.attrs, "calls") or "")
        if fused is None or fused.root is None:
            return None
        inner_env = {i: (comp, o, env) for i, o in enumerate(inst.operands)}
        return _linear(fused, fused.root.name, inner_env, computations, depth + 1)
    return None


def _compares(comp: Computation, name: str, env: Any, computations: dict[str, Computation], depth: int = 0):
    """The compare instructions a loop condition's value is the conjunction of: (direction, lhs, rhs, env)."""
    inst = comp.instructions.get(name)
    if inst is None or depth > 16:
        return [("", comp, (), env)]  # a term that is no comparison: the loop may end otherwise too
    if inst.opcode == "compare" and len(inst.operands) == 2:
        direction = re.search(r"direction=(\w+)", inst.attrs)
        return [(direction.group(1) if direction else "", comp, inst.operands, env)]
    if inst.opcode == "and":
        return [c for o in inst.operands for c in _compares(comp, o, env, computations, depth + 1)]
    if inst.opcode in _PASS_THROUGH and inst.operands:
        return _compares(comp, inst.operands[0], env, computations, depth + 1)
    if inst.opcode == "fusion":
        fused = computations.get(hlo_text.callee(inst.attrs, "calls") or "")
        if fused is not None and fused.root is not None:
            inner_env = {i: (comp, o, env) for i, o in enumerate(inst.operands)}
            return _compares(fused, fused.root.name, inner_env, computations, depth + 1)
    return [("", comp, (), env)]


def _iterations(op: str, start: int, step: int, bound: int) -> int | None:
    if op == "LT" and step > 0:
        return max(0, -(-(bound - start) // step))
    if op == "LE" and step > 0:
        return max(0, (bound - start) // step + 1)
    if op == "GT" and step < 0:
        return max(0, -(-(start - bound) // -step))
    if op == "GE" and step < 0:
        return max(0, (start - bound) // -step + 1)
    if op == "NE" and step and (bound - start) % step == 0 and (bound - start) // step >= 0:
        return (bound - start) // step
    return None


def trip_count(computations: dict[str, Computation], comp: Computation, loop: Instruction) -> tuple[int | None, bool]:
    """(iterations, exact) of while-instruction `loop` in `comp`: the compiler's known_trip_count, else read
    from its condition `i < N` (<=, >, >=, != too), the start value of i and the step its body adds. A
    condition that also tests something else (`i < N and any(active)`) gives N as an upper bound
    (exact=False). (None, False) when it cannot be read."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1)), True
    cond = computations.get(hlo_text.callee(loop.attrs, "condition") or "")
    body = computations.get(hlo_text.callee(loop.attrs, "body") or "")
    init = comp.instructions.get(loop.operands[0]) if loop.operands else None
    if cond is None or body is None or cond.root is None or body.root is None or init is None:
        return None, False
    compares = _compares(cond, cond.root.name, None, computations)
    flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE", "EQ": "EQ"}
    counts = []
    for direction, where, operands, env in compares:
        if len(operands) != 2:
            continue
        a, b = operands
        la, lb = _linear(where, a, env, computations), _linear(where, b, env, computations)
        if la is None or lb is None:
            continue
        if la[0] is not None and lb[0] is None:
            index, bound, op = la[0], lb[1] - la[1], direction
        elif lb[0] is not None and la[0] is None:
            index, bound, op = lb[0], la[1] - lb[1], flip.get(direction, direction)
        else:
            continue
        if init.opcode != "tuple" or index >= len(init.operands) or body.root.opcode != "tuple":
            continue
        start = _linear(comp, init.operands[index], None, computations)
        update = _linear(body, body.root.operands[index], None, computations)
        if start is None or start[0] is not None or update is None or update[0] != index:
            continue
        n = _iterations(op, start[1], update[1], bound)
        if n is not None:
            counts.append(n)
    if not counts:
        return None, False
    return min(counts), len(counts) == len(compares)


# ------------------------------------------------------------------------------------------ the summary

@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # per device: the result of an all-gather, the operand of the others
    group: int  # devices in each group
    name: str  # the instruction
    op_name: str  # the JAX operation it came from (metadata), when given
    loops: tuple[str, ...]  # the while loops it sits in, outermost first

    @property
    def wire_bytes(self) -> float:
        """What one device sends over the links for it (ring / direct exchange)."""
        share = (self.group - 1) / self.group if self.group > 1 else 0.0
        if self.kind == "all-reduce":
            return 2 * share * self.bytes
        if self.kind == "collective-permute":
            return float(self.bytes)
        return share * self.bytes


@dataclasses.dataclass(frozen=True)
class Loop:
    name: str  # the while instruction
    op_name: str  # the JAX operation (e.g. ".../while" of a scan), when given
    trip_count: int | None  # None: not read from the HLO (counted as 1)
    exact: bool  # False: trip_count is an upper bound (the loop may exit early)
    parents: tuple[str, ...]  # enclosing loops, outermost first
    per_iteration: dict[str, int]  # bytes per device by kind in one iteration (nested loops included)


@dataclasses.dataclass(frozen=True)
class Kernel:
    target: str  # custom_call_target
    name: str  # the instruction name without its numeric suffix (a Pallas kernel's name)
    op_name: str
    count: int  # executions per call of the program (trip counts applied)

    @property
    def mosaic(self) -> bool:
        return self.target == MOSAIC


_BOOKKEEPING = ("AllocateBuffer", "AssumeGatherIndicesInBound")  # custom calls that are no kernel


@dataclasses.dataclass(frozen=True)
class HloSummary:
    collectives: tuple[tuple[Collective, int], ...]  # each with its executions per call of the program
    loops: tuple[Loop, ...]
    kernels: tuple[Kernel, ...]
    tiled_layouts: bool  # TPU tiled layouts (":T(8,128)") present: the TPU compiler built it
    flops: float  # matmul / convolution / Mosaic-kernel FLOPs per device, loops multiplied out
    flops_once: float  # the same with every loop body counted once (as XLA's cost analysis counts them)
    hbm_bytes: float = 0.0  # bytes the program's kernels (fusions, matmuls, copies) read and write, loops multiplied out
    hbm_bytes_once: float = 0.0  # the same with every loop body counted once

    @property
    def per_step(self) -> dict[str, int]:
        """Bytes per device by kind for one call of the program (loops multiplied out)."""
        out = {k: 0 for k in KINDS}
        for c, times in self.collectives:
            out[c.kind] += c.bytes * times
        return out

    @property
    def wire_bytes(self) -> float:
        return sum(c.wire_bytes * times for c, times in self.collectives)

    @property
    def loop_scale(self) -> float:
        """How much the loops multiply the program's matmul work: what a cost analysis that counts each loop
        body once must be scaled by."""
        return self.flops / self.flops_once if self.flops_once else 1.0

    @property
    def mosaic_kernels(self) -> tuple[str, ...]:
        return tuple(sorted({k.name for k in self.kernels if k.mosaic}))

    def to_dict(self) -> dict[str, Any]:
        return {"per_step": self.per_step, "wire_bytes": self.wire_bytes, "flops": self.flops,
                "flops_once": self.flops_once, "hbm_bytes": self.hbm_bytes, "hbm_bytes_once": self.hbm_bytes_once,
                "tiled_layouts": self.tiled_layouts,
                "mosaic_kernels": list(self.mosaic_kernels),
                "loops": [dataclasses.asdict(loop) for loop in self.loops],
                "kernels": [{**dataclasses.asdict(k), "mosaic": k.mosaic} for k in self.kernels
                            if k.target not in _BOOKKEEPING],
                "collectives": [{**dataclasses.asdict(c), "times": t} for c, t in self.collectives]}


def _collective_bytes(kind: str, inst: Instruction, comp: Computation) -> int:
    if kind == "all-gather":  # the gathered result (of an -start: the last array of its tuple)
        arrays = hlo_text.arrays(inst.shape)
        return shape_bytes(arrays[-1]) if inst.opcode.endswith("-start") and arrays else shape_bytes(inst.shape)
    operands = [comp.instructions[o].shape for o in inst.operands if o in comp.instructions]
    if operands:
        return sum(shape_bytes(s) for s in operands)
    arrays = hlo_text.arrays(inst.shape)  # operands not in this computation: the first array of the result
    return shape_bytes(arrays[0]) if arrays else 0


_DONE = ("async-done", "async-update", "all-gather-done", "all-reduce-done", "collective-permute-done")


def analyze(text: str, num_devices: int = 1) -> HloSummary:
    """The collectives (per device, by kind, per loop iteration with trip counts), custom-call kernels and
    matmul FLOPs of an optimized HLO module's text. `num_devices`: the group size of collectives with
    empty replica groups."""
    computations = parse(text)
    entry = next((c for c in computations.values() if c.entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    found: list[tuple[Collective, int]] = []
    kernels: dict[tuple[str, str, str], int] = {}
    loops: dict[str, dict[str, Any]] = {}
    flops = [0.0, 0.0]
    memory = [0.0, 0.0]

    def visit(comp: Computation, times: int, stack: tuple[str, ...], as_kind: str | None, depth: int,
              caller_op: str = "", fused: bool = False) -> None:
        if depth > 64:
            return
        for inst in comp.instructions.values():
            if not fused and inst.opcode not in hlo_cost.NO_TRAFFIC:  # a kernel: its operands in, its result out
                moved = hlo_cost.traffic(inst, comp, computations)
                memory[0] += moved * times
                memory[1] += moved
            kind = _OPCODE_KIND.get(inst.opcode)
            if kind is not None:
                if kind == "all-reduce" and as_kind:
                    kind = as_kind
                found.append((Collective(kind, _collective_bytes(kind, inst, comp), group_size(inst.attrs, num_devices),
                                         inst.name, hlo_text.op_name(inst.attrs) or caller_op, stack), times))
            work = hlo_cost.flops(inst, comp)
            flops[0] += work * times
            flops[1] += work
            if inst.opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
                key = (target.group(1) if target else "?", re.sub(r"(\.\d+)+$", "", inst.name), hlo_text.op_name(inst.attrs))
                kernels[key] = kernels.get(key, 0) + times
            if inst.opcode in _DONE:
                continue
            callees = hlo_text.callees(inst)
            if inst.opcode == "while":
                trips, exact = trip_count(computations, comp, inst)
                loops[inst.name] = {"op_name": hlo_text.op_name(inst.attrs), "trip_count": trips, "exact": exact,
                                    "parents": stack}
                for key, name in callees:
                    if key == "body" and name in computations:
                        visit(computations[name], times * (trips if trips is not None else 1), stack + (inst.name,),
                              None, depth + 1)
                continue
            for key, name in callees:
                if name in computations and (key != "to_apply" or inst.opcode == "call"):
                    fused_kind = "reduce-scatter" if inst.opcode == "fusion" and name.startswith("all-reduce-scatter") else as_kind
                    visit(computations[name], times, stack, fused_kind, depth + 1, hlo_text.op_name(inst.attrs) or caller_op,
                          fused or inst.opcode not in ("call", "conditional"))

    visit(entry, 1, (), None, 0)

    trips = {name: (info["trip_count"] if info["trip_count"] is not None else 1) for name, info in loops.items()}
    summaries = []
    for name, info in loops.items():
        per_iteration = {k: 0 for k in KINDS}
        for c, _ in found:
            if name in c.loops:
                inner = c.loops[c.loops.index(name) + 1:]
                per_iteration[c.kind] += c.bytes * math.prod(trips[n] for n in inner)
        summaries.append(Loop(name, info["op_name"], info["trip_count"], info["exact"], info["parents"], per_iteration))
    kernel_list = tuple(Kernel(t, n, o, count) for (t, n, o), count in sorted(kernels.items()))
    return HloSummary(tuple(found), tuple(summaries), kernel_list, ":T(" in text, flops[0], flops[1], memory[0], memory[1])


def main_loop(summary: HloSummary) -> Loop | None:
    """The outermost loop that moves the most bytes per call (the decode chunk's token loop, the update's
    minibatch scan), or None."""
    outer = [loop for loop in summary.loops if not loop.parents]
    if not outer:
        return None
    return max(outer, key=lambda loop: (sum(loop.per_iteration.values()) * (loop.trip_count or 1), loop.trip_count or 0))

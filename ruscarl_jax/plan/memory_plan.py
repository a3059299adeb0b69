"""Will a config fit a slice, and how fast would it run? Compile a step's programs for the mesh, without
running them, and read from each executable its memory per device, what it moves between chips, its
kernels and its cost; set an analytic memory estimate beside it.

Every program a training step runs is lowered with abstract inputs (``jax.ShapeDtypeStruct`` carrying the
config's shardings) and compiled for the config's mesh, which may be made of emulated CPU devices
(``--xla_force_host_platform_device_count=N``): no parameter is ever allocated. For each program the
compiled executable reports, per device, its arguments, outputs, temporaries and the bytes outputs alias
from donated arguments. A program's peak adds what stays resident on the device while it runs without
being one of its arguments (the optimizer state during the rollout, the reference policy during the
update). The step's peak is the largest program peak.

For a TPU slice the programs are built by the TPU compiler itself (libtpu on this host, no TPU needed:
``plan/topology.py``): its buffer assignment, fusions, collectives and Pallas (Mosaic) kernels are the
ones a TPU would run. GPU slices cannot be cross-compiled (XLA needs the GPU to target it): they, and TPU
slices with ``--backend=cpu``, compile on emulated CPU devices, whose buffer assignment stands in for the
accelerator's (it widens bfloat16 arithmetic to float32 in places, so temporaries read high). The analytic
estimate is printed beside the compiled figures and disagreements above ``DISAGREE`` are pointed out.
Times are compile-time predictions (``plan/roofline.py``), not measurements.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2**30
DISAGREE = 0.25  # relative gap between the compiled and the analytic peak that is reported


# ----------------------------------------------------------------------------------------- the slices

@dataclasses.dataclass(frozen=True)
class Family:
    hbm_gib: float  # per device (chip or GPU)
    devices_per_host: int  # in a multi-host slice
    counts_cores: bool  # the slice name counts TensorCores (2 per chip) rather than chips
    single_host_max: int  # the largest slice that is one host


# Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e (HBM per chip, chips per host VM of a multi-host
# slice, and whether the accelerator type counts TensorCores); NVIDIA H100 SXM (80 GB HBM3) and H200
# (141 GB HBM3e) data sheets, 8 GPUs per HGX host.
FAMILIES: dict[str, Family] = {
    "v4": Family(32, 4, True, 4),
    "v5e": Family(16, 4, False, 8),
    "v5p": Family(95, 4, True, 4),
    "v6e": Family(32, 4, False, 8),
    "h100": Family(80, 8, False, 8),
    "h200": Family(141e9 / GiB, 8, False, 8),
}
_ALIASES = {"v5litepod": "v5e", "h100-80gb": "h100"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    devices: int
    hbm_bytes: int  # per device
    devices_per_host: int
    family: str = ""  # v4, v5e, v5p, v6e, h100, h200; "" for a custom slice

    @property
    def tpu(self) -> bool:
        return self.family in ("v4", "v5e", "v5p", "v6e")

    @property
    def hosts(self) -> int:
        return max(1, math.ceil(self.devices / self.devices_per_host))


def parse_slice(name: str) -> Slice:
    """'v5p-64' (64 TensorCores = 32 chips), 'v5e-16', 'v6e-8', 'h100-8', 'h200-16' ... -> Slice.
    An unknown family lists the known ones."""
    match = re.fullmatch(r"([a-z0-9\-]+?)-(\d+)", name.strip().lower())
    family = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if family not in FAMILIES:
        known = ", ".join(f"{f}-N" for f in FAMILIES)
        raise ValueError(f"--slice={name!r}: unknown slice; known families: {known} (e.g. v5p-64, h100-8)")
    f = FAMILIES[family]
    count = int(match.group(2))
    devices = count // 2 if f.counts_cores else count
    if devices < 1 or (f.counts_cores and count % 2):
        raise ValueError(f"--slice={name!r}: {family} slices are named by TensorCores (an even number)")
    per_host = devices if devices <= f.single_host_max else f.devices_per_host
    return Slice(name, devices, int(f.hbm_gib * GiB), per_host, family)


def custom_slice(devices: int, hbm_gb: float) -> Slice:
    """Any accelerator: N devices of `hbm_gb` GiB each."""
    if devices < 1 or hbm_gb <= 0:
        raise ValueError(f"--devices={devices} --hbm-gb={hbm_gb}: both must be positive")
    return Slice(f"{devices} x {hbm_gb:g} GiB", devices, int(hbm_gb * GiB), devices)


# ------------------------------------------------------------------------------------- the measurement

@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Per-device bytes of one compiled program and the analytic estimate of its peak; what it moves
    between chips, its kernels and its cost (per call), and how often a step calls it."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    resident: int  # live on the device during the program without being one of its arguments
    analytic: int
    calls: float = 1.0  # calls per training step
    iterations: float = 0.0  # iterations of its main loop per step where that is the unit (decode steps), else 0
    flops: float = 0.0  # per device per call, loops multiplied out (matmuls and Mosaic kernels from the HLO)
    hbm_bytes: float = 0.0  # per device per call: the HBM bytes its kernels read and write (plan.hlo), loops multiplied out
    cost_model_s: float = 0.0  # the compiler's optimal_seconds per call, loops multiplied out (0: none)
    hlo: Any = None  # plan.hlo.HloSummary of the optimized HLO

    @property
    def peak(self) -> int:
        return self.resident + self.arguments + self.outputs + self.temporaries - self.aliased


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what `jit(...).lower` takes instead of real arrays."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _cost(compiled: Any) -> dict[str, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends report none
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_program(name: str, fn: Callable[..., Any], args: Sequence[Any], *, resident: int, analytic: int,
                    static: dict[str, Any] | None = None, calls: float = 1.0, num_devices: int = 1,
                    ) -> tuple[ProgramMemory, Any]:
    """Lower and compile jitted `fn` on abstract `args`; (its memory, HLO facts and cost, its abstract outputs)."""
    from ruscarl_jax.plan import hlo

    compiled = fn.lower(*args, **(static or {})).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"{name}: this backend reports no memory analysis")
    summary = hlo.analyze(compiled.as_text(), num_devices=num_devices)
    cost = _cost(compiled)
    scale = summary.loop_scale  # XLA's cost analysis counts each loop body once (optimal_seconds < 0: none)
    memory = ProgramMemory(name, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                           int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes), int(resident), int(analytic),
                           calls=calls, flops=summary.flops or float(cost.get("flops", 0.0)),
                           hbm_bytes=summary.hbm_bytes or float(cost.get("bytes accessed", 0.0)) * scale,
                           cost_model_s=max(0.0, float(cost.get("optimal_seconds", 0.0))) * scale, hlo=summary)
    return memory, compiled.out_info


# ------------------------------------------------------------------------------------------ the report

def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < GiB else f"{b / GiB:,.2f} GiB"


def _seconds(t: float) -> str:
    return f"{t * 1e3:,.2f} ms" if t < 1 else f"{t:,.2f} s"


@dataclasses.dataclass(frozen=True)
class StepModel:
    """What a step does, for the time prediction: rows generated, tokens, chips, model FLOPs of the update."""

    rows: int  # responses per step
    response_tokens: int  # per row, at most
    chips: int
    update_model_flops: float  # 6 x active parameters x tokens trained per step (all epochs), whole job
    rollout_programs: tuple[str, ...] = ("rollout prefill", "rollout decode")


@dataclasses.dataclass(frozen=True)
class Plan:
    slice: Slice
    programs: tuple[ProgramMemory, ...]
    analytic_terms: dict[str, int]  # named per-device bytes of the analytic estimate
    advice: tuple[str, ...]  # keys to change when it does not fit
    backend: str = ""  # what compiled the programs (the TPU compiler for a topology, or emulated CPU devices)
    chip: Any = None  # plan.roofline.Chip whose peaks give the time prediction (None: no prediction)
    step: StepModel | None = None

    @property
    def peak(self) -> ProgramMemory:
        return max(self.programs, key=lambda p: p.peak)

    @property
    def fits(self) -> bool:
        return self.peak.peak <= self.slice.hbm_bytes

    def estimate(self, p: ProgramMemory) -> Any:
        """The time of one call of `p` (plan.roofline.Estimate), or None without a chip."""
        from ruscarl_jax.plan import roofline

        if self.chip is None:
            return None
        wire = p.hlo.wire_bytes if p.hlo is not None else 0.0
        return roofline.estimate(self.chip, p.flops, p.hbm_bytes, wire, p.cost_model_s)

    def predictions(self) -> dict[str, float]:
        """Compile-time predictions: seconds per step (and per program), rollout tokens/s per chip, update MFU."""
        if self.chip is None or self.step is None:
            return {}
        per_program = {p.name: self.estimate(p).seconds * p.calls for p in self.programs}
        rollout = sum(v for k, v in per_program.items() if k in self.step.rollout_programs)
        update = per_program.get("GRPO update", 0.0)
        out = {f"seconds[{k}]": v for k, v in per_program.items()}
        out["step_seconds"] = sum(per_program.values())
        out["rollout_seconds"] = rollout
        if rollout:
            out["rollout_tokens_per_s_per_chip"] = self.step.rows * self.step.response_tokens / rollout / self.step.chips
        if update:
            out["update_mfu"] = self.step.update_model_flops / (update * self.step.chips * self.chip.bf16_flops)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (bytes per device, seconds per call unless said per step)."""
        programs = []
        for p in self.programs:
            entry = {k: v for k, v in dataclasses.asdict(p).items() if k != "hlo"}
            entry["peak"] = p.peak
            if p.hlo is not None:
                entry["hlo"] = p.hlo.to_dict()
            est = self.estimate(p)
            if est is not None:
                entry["estimate"] = {**dataclasses.asdict(est), "roofline_s": est.roofline_s, "seconds": est.seconds,
                                     "bound": est.bound}
            programs.append(entry)
        return {"slice": dataclasses.asdict(self.slice), "backend": self.backend, "fits": self.fits,
                "peak_bytes": self.peak.peak, "peak_program": self.peak.name, "verdict": self.verdict(),
                "chip": dataclasses.asdict(self.chip) if self.chip is not None else None,
                "step": dataclasses.asdict(self.step) if self.step is not None else None,
                "predictions": self.predictions(), "programs": programs,
                "analytic_terms": dict(self.analytic_terms), "advice": list(self.advice)}

    def verdict(self) -> str:
        return (f"fits: {'yes' if self.fits else 'no'} (peak {self.peak.peak / GiB:.1f} GiB of "
                f"{self.slice.hbm_bytes / GiB:.1f} GiB per device)")

    def _program_lines(self, p: ProgramMemory) -> list[str]:
        from ruscarl_jax.plan import hlo

        lines = [f"{p.name}:"]
        if p.hlo is not None:
            moved = {k: v for k, v in p.hlo.per_step.items() if v}
            lines.append("  collectives per call: " + (", ".join(f"{k} {_mib(v)}" for k, v in moved.items()) or "none"))
            loop = hlo.main_loop(p.hlo)
            if loop is not None and any(loop.per_iteration.values()):
                trips = "?" if loop.trip_count is None else f"{'' if loop.exact else '<= '}{loop.trip_count}"
                lines.append(f"  per iteration of its loop ({trips} iterations per call): "
                             + ", ".join(f"{k} {_mib(v)}" for k, v in loop.per_iteration.items() if v))
            mosaic = p.hlo.mosaic_kernels
            lines.append("  Mosaic (Pallas) kernels: " + (", ".join(mosaic) if mosaic else "none"))
        est = self.estimate(p)
        if est is not None:
            model = f"cost model {_seconds(est.cost_model_s)}, " if est.cost_model_s else ""
            lines.append(f"  time per call: {model}roofline {_seconds(est.roofline_s)} (compute "
                         f"{_seconds(est.compute_s)}, HBM {_seconds(est.memory_s)}, ICI {_seconds(est.network_s)}: "
                         f"{est.bound}-bound); {p.calls:g} calls per step: {_seconds(est.seconds * p.calls)}")
        return lines

    def report(self) -> str:
        unit, scale = ("GiB", GiB) if self.peak.peak >= GiB / 4 else ("MiB", 2**20)
        gib = lambda b: f"{b / scale:9.2f}"  # noqa: E731
        lines = [f"slice {self.slice.name}: {self.slice.devices} devices, {self.slice.hbm_bytes / GiB:.1f} GiB each, "
                 f"{self.slice.hosts} host(s)"]
        if self.backend:
            lines.append(f"compiled by: {self.backend}")
        lines += ["", f"per device, {unit}   arguments   outputs  temporaries  aliased  resident     peak  analytic"]
        for p in self.programs:
            flag = ""
            if p.analytic and abs(p.peak - p.analytic) > DISAGREE * max(p.peak, p.analytic):
                flag = f"   <- compiled and analytic differ by {abs(p.peak - p.analytic) / scale:.2f} {unit}"
            lines.append(f"{p.name:<16}{gib(p.arguments)} {gib(p.outputs)} {gib(p.temporaries)}   {gib(p.aliased)}"
                         f" {gib(p.resident)} {gib(p.peak)} {gib(p.analytic)}{flag}")
        lines += ["", "analytic terms (per device):"]
        lines += [f"  {name:<28}{gib(value)} {unit}" for name, value in self.analytic_terms.items()]
        lines += ["", "per program, per device:"]
        for p in self.programs:
            lines += self._program_lines(p)
        pred = self.predictions()
        if pred:
            lines += ["", f"compile-time prediction on {self.chip.name} peaks (no chip ran; not a measurement):",
                      f"  step {_seconds(pred['step_seconds'])}, of which rollout {_seconds(pred['rollout_seconds'])}"]
            if "rollout_tokens_per_s_per_chip" in pred:
                lines.append(f"  rollout {pred['rollout_tokens_per_s_per_chip']:,.0f} tokens/s per chip "
                             f"({self.step.rows} rows x up to {self.step.response_tokens} tokens)")
            if "update_mfu" in pred:
                lines.append(f"  update MFU {100 * pred['update_mfu']:.1f}% (6 x active params x tokens trained, "
                             f"at {self.chip.bf16_flops / 1e12:g} TFLOP/s per chip)")
        if self.advice:
            lines += ["", "to fit:"] + [f"  - {a}" for a in self.advice]
        lines += ["", self.verdict()]
        return "\n".join(lines)


def advice(terms: dict[str, int], peak_program: str, budget: int, peak: int, config: Any) -> tuple[str, ...]:
    """The keys most likely to bring `peak` under `budget`: first what drives the program that peaks,
    then the resident state when that is more than a quarter of the budget."""
    if peak <= budget:
        return ()
    g, engine = config.grpo, config.rollout.get("engine", {})
    remat = "" if config.model.get("remat", "none") == "full" else "model.remat='full' and "
    by_program = {
        "rollout prefill": f"rollout.engine.slots (now {engine.get('slots', 0)}, 0 = one per prompt): fewer prompts "
                           "prefilled together (their attention over the prompt is materialised)",
        "rollout decode": "rollout.engine.memory_gb / num_pages (fewer KV pages) or rollout.engine.cache_dtype='bfloat16'",
        "rollout routing": "fewer rows per routing pass (trainer/rollout.py rollout_routing's max_rows)",
        "log-probs": f"grpo.logprob_micro_batch_size (now {g.get('logprob_micro_batch_size') or g.ppo_micro_batch_size}) "
                     f"or grpo.logprob_chunk_size (now {g.logprob_chunk_size})",
        "GRPO update": f"{remat}a smaller grpo.ppo_micro_batch_size (now {g.ppo_micro_batch_size}; a multiple of the "
                       f"data-parallel size) or grpo.logprob_chunk_size (now {g.logprob_chunk_size})",
    }
    if g.get("micro_token_budget"):  # packing: a micro-batch is a token budget per device (rl/packing.py)
        by_program["log-probs"] = (f"grpo.logprob_token_budget (now {g.get('logprob_token_budget') or g.micro_token_budget}; "
                                   f"at least the longest row) or grpo.logprob_chunk_size (now {g.logprob_chunk_size})")
        by_program["GRPO update"] = (f"{remat}a smaller grpo.micro_token_budget (now {g.micro_token_budget}; at least the "
                                     f"longest row) or grpo.logprob_chunk_size (now {g.logprob_chunk_size})")
    out = [by_program[peak_program]] if peak_program in by_program else []
    state = sum(terms.get(k, 0) for k in ("params", "optimizer state", "reference policy", "gradients"))
    if state > budget / 4:
        out.append(f"mesh.fsdp (now {config.mesh.get('fsdp', 1)}): shard parameters and optimizer state over more "
                   "devices (a larger slice), or grpo.ref_in_host_memory=True to keep the reference policy off the device")
    out.append(f"(the peak is in '{peak_program}': {peak / GiB:.1f} GiB needed, {budget / GiB:.1f} GiB available)")
    return tuple(out)


def rows_per_device(rows: int, data_parallel: int) -> int:
    """Rows one device holds of `rows` laid over the data-parallel axes: a share when they divide, else all of
    them (the sharding rules replicate a dimension that an axis does not divide)."""
    return rows // data_parallel if rows % data_parallel == 0 else rows


def dtype_bytes(name: str) -> int:
    return int(np.dtype(jnp.dtype(name)).itemsize)

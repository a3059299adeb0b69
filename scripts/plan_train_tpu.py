"""A config's step compiled by the TPU compiler for a TPU slice (libtpu on this CPU host, no TPU): per program
the peak memory per chip, the Mosaic (Pallas) kernels present, whether any [T, T] attention buffer remains,
and the compiler's FLOPs and predicted seconds (``cost_analysis``).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python scripts/plan_train_tpu.py --config=configs/qwen7b.py --slice=v5p-64
    ... --config.grpo.micro_token_budget=None --config.grpo.logprob_token_budget=None   # unpacked rows

The programs are those of ``plan/step_memory.plan_config`` (rollout prefill and decode, log-prob pass,
GRPO update) compiled on the slice's chips instead of emulated CPU devices. Predicted MFU: the compiler's
FLOPs per chip over (its predicted seconds x the chip's peak bf16 FLOP/s). A packed program's loop runs
its worst case (every micro-batch non-empty): at run time empty micro-batches are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("--slice", default="v5p-64", help="v5p-N (N TensorCores, two per chip)")
_parser.add_argument("--json", help="also write the figures as JSON to this file")
_args, _rest = _parser.parse_known_args()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen7b.py", "the run's config file")
# v5p: 459 TFLOP/s bf16 per chip, 95 GiB HBM (cloud.google.com/tpu/docs/v5p); 3-D tori of megacore chips
_V5P_SHAPES = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}
V5P_PEAK_FLOPS = 459e12


def main(argv: list[str]) -> None:
    del argv
    import time

    from jax.experimental import topologies

    from ruscarl_jax.plan import memory_plan, step_memory

    count = int(_args.slice.split("-")[1])
    chips = count // 2
    if not _args.slice.startswith("v5p-") or chips not in _V5P_SHAPES:
        _parser.error(f"--slice={_args.slice!r}: give a v5p slice, one of {', '.join(f'v5p-{2 * c}' for c in _V5P_SHAPES)}")
    shape = "x".join(str(d) for d in _V5P_SHAPES[chips])
    devices = topologies.get_topology_desc(platform="tpu", topology_name=f"v5p:{shape}", chip_config_name="megacore",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    figures: dict[str, dict] = {}
    original = memory_plan.compile_program

    def compile_and_read(name, fn, args, *, static=None, **kw):
        t0 = time.time()
        compiled = fn.lower(*args, **(static or {})).compile()
        hlo = compiled.as_text()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        seconds = float(cost.get("optimal_seconds", 0.0))
        flops = float(cost.get("flops", 0.0))
        figures[name] = {
            "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
            "splash_attention": "splash" in hlo,
            "flops_per_chip": flops, "predicted_seconds": seconds,
            "predicted_mfu": flops / (seconds * V5P_PEAK_FLOPS) if seconds > 0 else None,
            "compile_seconds": round(time.time() - t0, 1)}
        print(f"compiled {name}: {figures[name]}", flush=True)
        return original(name, _Precompiled(compiled), args, **kw)  # the planner's own memory accounting

    class _Precompiled:
        def __init__(self, compiled):
            self.compiled = compiled

        def lower(self, *a, **k):
            return self

        def compile(self):
            return self.compiled

    step_memory.compile_program = compile_and_read
    target = memory_plan.Slice(_args.slice, chips, 95 * memory_plan.GiB, 4)
    plan = step_memory.plan_config(_CONFIG.value, target, devices=devices)
    print(plan.report())
    for p in plan.programs:
        figures.setdefault(p.name, {})["peak_gib"] = round(p.peak / memory_plan.GiB, 2)
    print(json.dumps(figures, indent=1))
    if _args.json:
        with open(_args.json, "w") as f:
            json.dump({"plan": plan.to_dict(), "tpu": figures}, f, indent=1)


if __name__ == "__main__":
    app.run(main, argv=[sys.argv[0]] + _rest)

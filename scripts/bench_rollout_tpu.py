"""Compile-time prediction of the rollout decode step on a TPU slice, with the TPU compiler on this CPU.

Compiles the config's decode chunk (engine.decode_program: the rollout layout, every slot reading a
full-length page table) for the chips of a v5p / v5e / v6e topology and prints:

* bytes the collectives of the program move per chip (each counted once: an upper bound of one loop
  iteration's), and whether the Mosaic paged-attention kernel is in it;
* a one-step program's (check_every = 1) XLA cost model: bytes accessed and ``optimal_seconds``;
* the HBM roofline of one step in the rollout layout: the chip's replicated weights + its own slots' KV
  pages (read at full length), at the chip's HBM bandwidth; the predicted decode tokens/s per chip from
  the larger of the cost model's time and the roofline time, and the roofline's share of it.

    JAX_PLATFORMS=cpu python scripts/bench_rollout_tpu.py --config=configs/qwen7b.py --topology=v5p:2x4x4
    JAX_PLATFORMS=cpu python scripts/bench_rollout_tpu.py --config=configs/qwen3_30b_a3b.py --topology=v5p:4x4x4

Figures are predictions (nothing runs on a TPU); see BENCHMARKS.md, rollout section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from ruscarl_jax.plan import hlo as hlo_lib  # noqa: E402

from ruscarl_jax.plan.roofline import CHIPS  # noqa: E402  (the one table of chip peaks, with sources)
def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="e.g. v5p:2x4x4 (v5p-64: 32 chips), v5p:4x4x4 (v5p-128)")
    p.add_argument("--json", type=pathlib.Path)
    args = p.parse_args()

    import importlib.util

    from jax.experimental import topologies

    from ruscarl_jax.models.sharding import make_mesh
    from ruscarl_jax.sampler import engine
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.setup import rules_from_config
    from ruscarl_jax.plan.step_memory import model_config

    spec = importlib.util.spec_from_file_location("cfgmod", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    family = args.topology.split(":")[0]
    kw = dict(chip_config_name="megacore") if family == "v5p" else {}
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology, **kw).devices
    chips = len(devices)
    settings = config_lib.validate(config, num_devices=chips, check_paths=False)
    mesh = make_mesh(dict(config.mesh), devices)
    rules = rules_from_config(config)
    cfg = model_config(config)
    s = settings.sampling
    rows = int(config.data.batch_size) * int(config.rollout.num_generations)
    layout = engine.plan(cfg, s, rows=rows, longest_prompt=int(config.data.max_prompt_length), mesh=mesh, rules=rules)
    start = time.perf_counter()
    fn, fargs, static = engine.decode_program(cfg, s, layout, mesh, rules)
    compiled = fn.lower(*fargs, **static).compile()
    hlo = compiled.as_text()
    one = dataclasses.replace(layout, check_every=1)
    fn1, fargs1, static1 = engine.decode_program(cfg, s, one, mesh, rules)
    cost = fn1.lower(*fargs1, **static1).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compile_s = time.perf_counter() - start

    slots_per_chip = layout.slots // layout.local_groups
    weight_bytes = engine.decode_step_hbm_bytes(cfg, layout, context=0)  # the experts its slots route to
    kv_bytes = engine.decode_step_hbm_bytes(cfg, layout, context=layout.pages_per_seq * layout.page_size) - weight_bytes
    bw = CHIPS[family].hbm_bytes_per_s
    roofline_s = (weight_bytes + kv_bytes) / bw
    model_s = max(0.0, float(cost.get("optimal_seconds", 0.0)))  # XLA gives a negative figure for some programs (n/a)
    step_s = max(model_s, roofline_s)
    result = dict(config=args.config, topology=args.topology, chips=chips, slots=layout.slots, slots_per_chip=slots_per_chip,
                  pages_per_chip=layout.pages_per_group, max_seq_len=layout.max_len, check_every=layout.check_every,
                  collective_bytes_per_chip=sum(hlo_lib.analyze(hlo, num_devices=chips).per_step.values()),
                  mosaic_kernel='custom_call_target="tpu_custom_call"' in hlo,
                  cost_bytes_accessed=float(cost.get("bytes accessed", 0.0)), cost_optimal_seconds=model_s,
                  weights_bytes=weight_bytes, own_kv_bytes_full_length=kv_bytes, hbm_gbs=bw / 1e9,
                  roofline_step_s=roofline_s, predicted_step_s=step_s,
                  predicted_tokens_per_s_per_chip=slots_per_chip / step_s, roofline_fraction=roofline_s / step_s,
                  compile_s=compile_s)
    print(f"{args.config} on {args.topology} ({chips} chips): {layout.slots} slots ({slots_per_chip} per chip), "
          f"{layout.pages_per_group} pages of {layout.page_size} per chip, max_seq_len {layout.max_len}")
    print(f"  decode chunk ({layout.check_every} steps): collectives move {result['collective_bytes_per_chip']} bytes per chip "
          f"(each counted once); Mosaic paged-attention kernel: {result['mosaic_kernel']}")
    print(f"  one step: cost model {cost.get('bytes accessed', 0) / 1e9:.2f} GB accessed, optimal {1e3 * model_s:.2f} ms; "
          f"(0 = n/a); roofline (weights {weight_bytes / 1e9:.2f} GB + own KV at full length {kv_bytes / 1e9:.2f} GB at "
          f"{bw / 1e9:.0f} GB/s) {1e3 * roofline_s:.2f} ms")
    print(f"  predicted decode: {result['predicted_tokens_per_s_per_chip']:.0f} tokens/s per chip "
          f"({100 * result['roofline_fraction']:.0f}% of the HBM roofline); compiled in {compile_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

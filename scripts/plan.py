"""Will a config fit a slice, and how fast would it run? Compiles the step's programs for the slice (nothing
is allocated or run) and prints, per program and device: memory against the slice's HBM, the bytes its
collectives move (per loop iteration, with trip counts), its Mosaic (Pallas) kernels and a predicted time;
then the step's predicted seconds, rollout tokens/s per chip and update MFU (compile-time predictions).

    python scripts/plan.py --config=configs/qwen7b.py --slice=v5p-64               # the TPU compiler (libtpu)
    python scripts/plan.py --config=configs/qwen7b.py --slice=v5p-64 --backend=cpu # emulated CPU devices
    python scripts/plan.py --config=configs/qwen7b.py --slice=h100-8               # GPUs: CPU-emulated
    python scripts/plan.py --config=configs/qwen7b.py --devices=8 --hbm-gb=80      # any 8 x 80 GiB devices

TPU slices (v4-N, v5e-N, v5p-N, v6e-N) are compiled by the TPU compiler for the slice's topology on this
host (no TPU needed); GPU slices cannot be cross-compiled and compile on emulated CPU devices. The last
line is `fits: yes|no (peak X.X GiB of Y.Y GiB per device)`; the exit status is 0 either way (2 for bad
arguments); --json=FILE also writes the plan as data. XLA_FLAGS given by the caller are kept (the
figures are those of XLA's default optimisation level). See docs/memory_plan.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# the planner's arguments are read before JAX starts: the device count must be set in XLA_FLAGS first
_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("--slice", help="a named slice: v4-N, v5e-N, v5p-N, v6e-N (TPU), h100-N, h200-N (GPUs)")
_parser.add_argument("--devices", type=int, help="any accelerator: the number of devices (with --hbm-gb)")
_parser.add_argument("--hbm-gb", type=float, help="memory per device in GiB (with --devices)")
_parser.add_argument("--json", help="also write the plan as JSON to this file")
_parser.add_argument("--backend", choices=("auto", "cpu"), default="auto",
                     help="auto: the TPU compiler for TPU slices, emulated CPU devices otherwise; cpu: always emulate")
_args, _rest = _parser.parse_known_args()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ruscarl_jax.plan.memory_plan import custom_slice, parse_slice  # noqa: E402  (imports no JAX backend yet)

try:
    if _args.slice:
        TARGET = parse_slice(_args.slice)
    elif _args.devices and _args.hbm_gb:
        TARGET = custom_slice(_args.devices, _args.hbm_gb)
    else:
        _parser.error("give --slice=NAME or both --devices=N and --hbm-gb=G")
except ValueError as err:
    _parser.error(str(err))

EMULATE = not (TARGET.tpu and _args.backend == "auto")
if EMULATE:  # the slice's devices as emulated CPU devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={TARGET.devices}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on CPU; a TPU slice is only compiled for
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "the run's config file")


def main(argv: list[str]) -> None:
    del argv
    from ruscarl_jax.trainer.config import ConfigError
    from ruscarl_jax.plan.step_memory import plan_config

    try:
        plan = plan_config(_CONFIG.value, TARGET, backend=_args.backend)
    except (ConfigError, ValueError) as err:
        print(f"plan: {err}", file=sys.stderr)
        sys.exit(2)
    print(plan.report())
    if _args.json:
        with open(_args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)


if __name__ == "__main__":
    app.run(main, argv=[sys.argv[0]] + _rest)

"""Export a training run's checkpoint as a Hugging Face directory (safetensors + config + tokenizer)
that transformers and vLLM load.

    python scripts/export.py --config=configs/tiny.py --workdir=runs/tiny --out=exports/tiny [--step=N] [--dtype=bfloat16]

The config must be the run's (it says how the policy and tokenizer were built); the parameters come
from the run's latest checkpoint, or --step.
"""
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (default: config.workdir).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Weight dtype (default: the run's param_dtype).")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax
    import orbax.checkpoint as ocp

    from ruscarl_jax.models import hf_io
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    config = _CONFIG.value
    settings = config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = config_lib.resolve_path(_WORKDIR.value or config.workdir, pathlib.Path.cwd())
    mesh, rules = mesh_from_config(config), rules_from_config(config)
    examples = load_data(config, "train_path") + load_data(config, "val_path")[: int(config.data.get("val_examples", 0)) or None]
    cfg, params, tokenizer = load_policy(config, mesh, rules, examples, settings.scaffold)
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = _STEP.value or manager.latest_step()
    if step is None:
        print(f"export: no checkpoint under {workdir / 'checkpoints'}", file=sys.stderr)
        return 2
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
        partial_restore=True)))
    out = config_lib.resolve_path(_OUT.value, pathlib.Path.cwd())
    hf_io.save_checkpoint(out, restored["state"]["params"], cfg, tokenizer, dtype=_DTYPE.value)
    print(f"exported step {step} of {workdir} -> {out}")
    return 0


if __name__ == "__main__":
    app.run(main)

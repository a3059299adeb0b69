"""Export a training run's checkpoint as a Hugging Face directory (safetensors + config + tokenizer)
that transformers and vLLM load.

    python scripts/export.py --workdir=runs/tiny --out=exports/tiny [--step=N] [--dtype=bfloat16]

Everything comes from the workdir (a local path or gs://...): the run's config and tokenizer from its
snapshot (config.json, tokenizer/), the parameters from its latest checkpoint, or --step. --out may be
a storage URL too. --config is only for runs written before snapshots existed.

A LoRA run (config.model.lora.rank > 0) checkpoints its adapters only: the base is rebuilt from the model
source, the adapters restored and merged into it (an int8 base is dequantized first, so the export is
the model that was trained), and --adapter_out also writes them as a PEFT adapter for the float base:

    python scripts/export.py --workdir=runs/tiny_lora --out=exports/tiny_lora --adapter_out=exports/tiny_lora_adapter
"""
import logging
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (default: the workdir's snapshot).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory or URL.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory for the Hugging Face checkpoint.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ADAPTER = flags.DEFINE_string("adapter_out", None, "LoRA runs: also write the adapters as a PEFT adapter directory.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Weight dtype (default: the run's param_dtype).")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax
    import orbax.checkpoint as ocp

    from ruscarl_jax.models import hf_io, lora, peft_io, qwen
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer import snapshot, storage
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    try:
        storage.check_url(_WORKDIR.value, "--workdir")
        storage.check_url(_OUT.value, "--out")
    except storage.StorageError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    workdir = config_lib.resolve_path(_WORKDIR.value, pathlib.Path.cwd())
    out = config_lib.resolve_path(_OUT.value, pathlib.Path.cwd())
    config = _CONFIG.value or snapshot.load_config(workdir)
    if config is None:
        print(f"export: {workdir} has no {snapshot.CONFIG_FILE} (not a run directory?); pass the run's --config",
              file=sys.stderr)
        return 2
    mesh, rules = mesh_from_config(config), rules_from_config(config)
    tokenizer = snapshot.load_tokenizer(workdir)  # the data files are not needed then (nor checked)
    examples, scaffold = [], None
    if tokenizer is None:  # a run from before snapshots: rebuild its tokenizer from its data, as training did
        scaffold = config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count()).scaffold
        examples = load_data(config, "train_path") + load_data(config, "val_path")[
            : int(config.data.get("val_examples", 0)) or None]
    cfg, params, tokenizer = load_policy(config, mesh, rules, examples, scaffold, tokenizer=tokenizer)
    lora_settings = lora.LoraSettings(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in dict(config.model.get("lora") or {}).items()})
    if lora_settings.enabled:  # the checkpoint holds the adapters; the base comes from the model source
        params = lora.make_sharded_state(params, lora_settings, qwen.param_logical_axes(cfg), mesh, rules)
    elif _ADAPTER.value:
        print("export: --adapter_out needs a LoRA run (config.model.lora.rank > 0)", file=sys.stderr)
        return 2
    trainable, frozen = lora.split(params)
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = _STEP.value or manager.latest_step()
    if step is None:
        print(f"export: no checkpoint under {workdir / 'checkpoints'}", file=sys.stderr)
        return 2
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
        partial_restore=True)))
    params = lora.join(restored["state"]["params"], frozen)
    if _ADAPTER.value:
        peft_io.save_adapter(config_lib.resolve_path(_ADAPTER.value, pathlib.Path.cwd()), params, cfg, lora_settings,
                             base_model=str(config.model.get("checkpoint_dir") or ""))
    params = lora.merge(params, "float32")  # a LoRA state: adapters folded into its base (in float32: no rounding)
    if storage.is_url(str(out)):  # safetensors and save_pretrained write local files: stage, then copy up
        with tempfile.TemporaryDirectory(prefix="ruscarl_export_") as local:
            hf_io.save_checkpoint(local, params, cfg, tokenizer, dtype=_DTYPE.value)
            storage.upload_tree(local, out)
    else:
        hf_io.save_checkpoint(out, params, cfg, tokenizer, dtype=_DTYPE.value)
    print(f"exported step {step} of {workdir} -> {out}")
    return 0


if __name__ == "__main__":
    app.run(main)

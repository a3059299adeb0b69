"""Train a policy with RuscaRL.

    python scripts/train.py --config=configs/tiny.py [--config.trainer.total_steps=20] [--workdir=runs/x]

With no --config the embedded default (configs/tiny.py) runs on the CPU in a few minutes.
"""
import logging
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory or URL (gs://BUCKET/PATH; default: config.workdir). "
                                "An existing one is resumed.")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax

    from ruscarl_jax.evaluation.run_summary import summarize
    from ruscarl_jax.trainer import storage
    from ruscarl_jax.trainer.config import ConfigError
    from ruscarl_jax.trainer.loop import train

    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir  # a local path (relative to here) or a URL, e.g. gs://bucket/run
    try:
        last = train(config, workdir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if last and "fits" in last:  # trainer.plan_only: the plan was printed; nothing was trained
        return 0
    if last:
        print(f"done: step {last['step']} reward_mean={last.get('reward_mean'):.4f} -> {workdir}")
    run_dir = storage.resolve_path(workdir, base=os.getcwd())
    if jax.process_index() == 0 and (run_dir / "metrics.jsonl").exists():
        print(summarize(run_dir))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app.run(main)

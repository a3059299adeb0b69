"""The exploration-bottleneck experiment (issue 8): plain GRPO against RuscaRL on the synthetic key-word task.

    python scripts/experiments/exploration_bottleneck.py [--seeds 0,1,2] [--steps 200] [--out docs]

1. Warm start: the tiny Qwen model of configs/tiny.py, fine-tuned with the framework's SFT step on
   scaffolded demonstrations about topics disjoint from the task (it learns to write the key words a
   system message lists, not any topic's hidden words); saved as a Hugging Face checkpoint.
2. Both arms start from it, with the same steps, batch and seeds, by `train()`:
   plain GRPO (scaffold rule 'binary', full_reveal_count 0: no sample ever sees the rubric) and
   RuscaRL (rule 'step_sigmoid'). Every few steps the trainer scores greedy answers to held-out
   prompts (new wordings) without a scaffold.
3. The final policies answer the held-out prompts N times (temperature 1) for Best-of-N.
4. Writes <out>/<name>.csv (curves), <name>.png (mean and min-max over seeds) and the results table
   into <out>/exploration_bottleneck.md between the <name> results markers (and on stdout).

The task is data/tiny's (same seed and sizes) written into the workdir, by default with the format
item added to every rubric; --no-format-item is the first version of the experiment, which had a
loophole (see docs/exploration_bottleneck.md).

Runs and the warm start live in --workdir; finished runs are reused when the command is repeated
with the same settings (a different setting needs a new --workdir). --quick is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ARMS = {"grpo": "plain GRPO", "ruscarl": "RuscaRL (step_sigmoid)"}
# A short scaffold wording: the task's criteria are one line each, and a short prompt keeps the runs fast.
WORDING = dict(base_message="", opening="", include_header="Include:", include_item="{criterion}",
               avoid_header="Avoid:", avoid_item="{criterion}", closing="")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    p.add_argument("--steps", type=int, default=200, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--test-freq", type=int, default=10, help="held-out evaluation every N steps")
    p.add_argument("--warm-start-steps", type=int, default=1000)
    p.add_argument("--warm-start-examples", type=int, default=256, help="x 8 scaffolded demonstrations each")
    p.add_argument("--best-of", type=int, default=8, help="samples per held-out prompt for Best-of-N (0: skip)")
    p.add_argument("--format-item", action=argparse.BooleanOptionalAction, default=True,
                   help="give every rubric the format item ('Notes:' and at most three words)")
    p.add_argument("--workdir", default="runs/exploration_bottleneck")
    p.add_argument("--out", default="docs", help="where the CSV, PNG and results table go")
    p.add_argument("--name", default="exploration_bottleneck", help="stem of the output files and table markers")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny settings, 1 seed, writes to --workdir only")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        if args.workdir == p.get_default("workdir"):
            args.workdir += "_quick"
        args.seeds, args.steps, args.test_freq = args.seeds[:1], 4, 2
        args.warm_start_steps, args.warm_start_examples, args.best_of = 10, 80, 2
        args.out = args.workdir
    return args


def base_config(seed: int, warm_dir: pathlib.Path | None, args: argparse.Namespace):
    """configs/tiny.py with the experiment's settings; the arm's scaffold is set by `arm_config`."""
    from configs.tiny import get_config

    c = get_config()
    c.seed = seed
    c.data.train_path, c.data.val_path = str(args.data_dir / "train.jsonl"), str(args.data_dir / "val.jsonl")
    if warm_dir is not None:
        c.model.source, c.model.checkpoint_dir = "hf", str(warm_dir)
    c.scaffold.wording = dict(WORDING)
    c.scaffold.add_base_when_zero = False  # the paper's setting: an unshown sample gets no system message
    c.data.batch_size, c.data.max_prompt_length = args.batch_size, 128
    c.rollout.num_generations, c.rollout.max_new_tokens, c.rollout.prompt_bucket_min = args.generations, 10, 16
    rows = args.batch_size * args.generations
    c.grpo.ppo_mini_batch_size, c.grpo.ppo_micro_batch_size = rows // 2, rows // 2  # two updates per step
    c.trainer.total_steps, c.trainer.test_freq = args.steps, args.test_freq
    c.trainer.checkpoint_every, c.trainer.keep_checkpoints = 0, 1
    c.trainer.tensorboard, c.trainer.save_rollouts = False, False
    return c


def arm_config(arm: str, seed: int, warm_dir: pathlib.Path, args: argparse.Namespace):
    c = base_config(seed, warm_dir, args)
    if arm == "grpo":
        c.scaffold.rule, c.scaffold.full_reveal_count = "binary", 0  # every sample ratio 0: no scaffold
    else:
        c.scaffold.rule = "step_sigmoid"  # reference defaults: start_point 0.3, steepness 10
    return c


def make_warm_start(directory: pathlib.Path, args: argparse.Namespace) -> dict:
    """Build the tokenizer and model, fine-tune on demonstrations, save as an HF checkpoint."""
    import jax

    from ruscarl_jax.data import synthetic
    from ruscarl_jax.evaluation.warm_start import WarmStartSettings, demonstration_pairs, warm_start
    from ruscarl_jax.models import hf_io
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    start = time.perf_counter()
    c = base_config(0, None, args)
    settings = config_lib.validate(c, num_devices=jax.device_count())
    mesh, rules = mesh_from_config(c), rules_from_config(c)
    demos = synthetic.make_warm_start_examples(args.warm_start_examples, seed=0, with_format=args.format_item)
    task = load_data(c, "train_path") + load_data(c, "val_path")
    cfg, params, tokenizer = load_policy(c, mesh, rules, task + demos, settings.scaffold)
    pairs = demonstration_pairs(demos, tokenizer, settings.scaffold, 8, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    ws = WarmStartSettings(steps=args.warm_start_steps, batch_size=64, micro_batch_size=64, learning_rate=3e-3)
    params, losses = warm_start(params, cfg, pairs, ws, pad_id=tokenizer.pad_token_id, mesh=mesh, rules=rules,
                                bucket_min=16, log_every=100)
    hf_io.save_checkpoint(directory, params, cfg, tokenizer=tokenizer)
    return {"demonstrations": len(pairs), "steps": ws.steps, "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": time.perf_counter() - start}


def evaluate_policy(params, cfg, tokenizer, examples, seen, scaffold, num_samples: int, seed: int, mesh, rules) -> dict:
    """Scores of one policy on the held-out `examples`: greedy without a scaffold, greedy with every
    criterion shown, and Best-of-k of `num_samples` temperature-1 samples without a scaffold; and
    greedy without a scaffold on `seen` training prompts (wordings the runs trained on)."""
    import dataclasses as dc

    import jax

    from ruscarl_jax.evaluation import report as report_lib
    from ruscarl_jax.evaluation.responses import sample_responses
    from ruscarl_jax.judge.judge import Judge
    from ruscarl_jax.judge.settings import JudgeSettings
    from ruscarl_jax.sampler.generate import generate
    from ruscarl_jax.sampler.settings import SamplingSettings
    from ruscarl_jax.scaffold.prompts import build_prompts
    from ruscarl_jax.trainer.setup import stop_token_ids

    sampling = SamplingSettings(max_new_tokens=10, stop_token_ids=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, temperature=1.0, prompt_bucket_min=16)
    greedy = dc.replace(sampling, greedy=True)
    out = {}
    with Judge(JudgeSettings(api_key_env=None)) as judge:
        def score(texts: list[str], exs=examples) -> float:
            return report_lib.build_report(exs, [[g] for g in judge.grade(list(zip(exs, texts)))], [1]).overall["score"]

        plain = sample_responses(params, cfg, tokenizer, examples, 1, greedy, jax.random.key(seed), mesh=mesh, rules=rules)
        out["greedy"] = score([row[0] for row in plain])
        plain = sample_responses(params, cfg, tokenizer, seen, 1, greedy, jax.random.key(seed), mesh=mesh, rules=rules)
        out["greedy_train"] = score([row[0] for row in plain], seen)
        full = build_prompts(examples, 1, None, None, dc.replace(scaffold, rule="linear"), seed, tokenizer)
        sample = generate(params, cfg, [r.sampling_ids for r in full.records], jax.random.key(seed), greedy, mesh=mesh, rules=rules)
        out["greedy_full_scaffold"] = score(tokenizer.batch_decode([t[:n] for t, n in zip(sample.tokens, sample.lengths)],
                                                                   skip_special_tokens=True))
        if num_samples:
            texts = sample_responses(params, cfg, tokenizer, examples, num_samples, sampling, jax.random.key(seed + 1),
                                     mesh=mesh, rules=rules)
            grades = judge.grade([(ex, t) for ex, row in zip(examples, texts) for t in row])
            grades = [grades[i * num_samples:(i + 1) * num_samples] for i in range(len(examples))]
            ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= num_samples]
            out["best_of"] = {k: v["score"] for k, v in report_lib.build_report(examples, grades, ks).best_of.items()}
    return out


def load_final_params(run_dir: pathlib.Path):
    """The parameters of a finished run's last checkpoint."""
    import orbax.checkpoint as ocp

    checkpoints = run_dir.absolute() / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    return ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state")["params"]


def results_table(rows: list[dict], finals: dict, warm: dict, args: argparse.Namespace, seconds: float) -> str:
    """The markdown results table (mean +- std over seeds; per-seed values in brackets)."""
    import numpy as np

    from ruscarl_jax.evaluation import curves

    def fmt(values: list[float]) -> str:
        values = [float(v) for v in values]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f} [{', '.join(f'{v:.2f}' for v in values)}]"

    ks = sorted({k for f in finals.values() for k in f.get("best_of", {})})
    head = ["arm", "held-out, final (greedy)", "held-out, mean over evaluations", "training prompts, final (greedy)",
            "training rollouts without scaffold, last 10 steps", "held-out, all criteria shown (greedy)"]
    head += [f"held-out best-of-{k} (T=1)" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    w = warm["scores"]
    lines.append("| warm start (step 0) | " + " | ".join(
        [f"{w['greedy']:.3f}", "", f"{w['greedy_train']:.3f}", "", f"{w['greedy_full_scaffold']:.3f}"]
        + [f"{w['best_of'][k]:.3f}" for k in ks]) + " |")
    for arm, label in ARMS.items():
        final = curves.final_values(rows, arm, "heldout_score")
        mean_curve = {s: float(np.mean([r["heldout_score"] for r in rows if r["arm"] == arm and r["seed"] == s
                                        and r["step"] > 0 and not np.isnan(r["heldout_score"])])) for s in args.seeds}
        train = curves.last_window_mean(rows, arm, "train_reward_unscaffolded", 10)
        cells = [label, fmt(list(final.values())), fmt(list(mean_curve.values())),
                 fmt([finals[(arm, s)]["greedy_train"] for s in args.seeds]), fmt(list(train.values())),
                 fmt([finals[(arm, s)]["greedy_full_scaffold"] for s in args.seeds])]
        cells += [fmt([finals[(arm, s)]["best_of"][k] for s in args.seeds]) for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.steps} steps x {args.batch_size} prompts "
                 f"x {args.generations} samples per arm; warm start {warm['steps']} SFT steps on {warm['demonstrations']} "
                 f"demonstrations (loss {warm['first_loss']:.2f} -> {warm['final_loss']:.2f}). Compute wall time "
                 f"{seconds / 60:.1f} min (warm start, its evaluation, 2 x {len(args.seeds)} runs with their final "
                 f"evaluations; {os.cpu_count()} CPU cores).")
    return "\n".join(lines)


def write_table(table: str, path: pathlib.Path, name: str) -> bool:
    """Put the table between the `name` results markers of `path`; False when the file or markers are absent."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("exploration_bottleneck")
    import jax

    from ruscarl_jax.data import synthetic
    from ruscarl_jax.evaluation import curves
    from ruscarl_jax.models import hf_io
    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.loop import train
    from ruscarl_jax.trainer.setup import load_data, mesh_from_config, rules_from_config

    started = time.perf_counter()
    workdir = (ROOT / args.workdir) if not pathlib.Path(args.workdir).is_absolute() else pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recorded = {k: v for k, v in vars(args).items() if k not in ("out", "name", "seeds")}
    settings_file = workdir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != recorded:
        print(f"error: {workdir} holds runs with other settings ({settings_file}); use a new --workdir", file=sys.stderr)
        return 2
    settings_file.write_text(json.dumps(recorded, indent=2))
    args.data_dir = workdir / "data"  # the task of data/tiny (same seed and sizes), with or without the format item
    synthetic.write_jsonl(synthetic.make_examples(128, 0, with_format=args.format_item), args.data_dir / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_examples(32, 0, held_out=True, with_format=args.format_item),
                          args.data_dir / "val.jsonl")
    cache = base_config(0, None, args).trainer.compilation_cache_dir
    if cache:
        jax.config.update("jax_compilation_cache_dir", str(config_lib.resolve_path(cache, pathlib.Path.cwd())))

    warm_dir = workdir / "warm_start"
    warm_file = workdir / "warm_start.json"
    if not (warm_dir / "config.json").exists() or not warm_file.exists():
        log.info("warm start: %d SFT steps on demonstrations of %d examples", args.warm_start_steps, args.warm_start_examples)
        warm = make_warm_start(warm_dir, args)
    else:
        warm = json.loads(warm_file.read_text())
        log.info("reusing the warm start in %s", warm_dir)

    c = base_config(0, warm_dir, args)
    mesh, rules = mesh_from_config(c), rules_from_config(c)
    scaffold = config_lib.validate(c, num_devices=jax.device_count()).scaffold
    val = load_data(c, "val_path")[: int(c.data.val_examples)]
    seen = load_data(c, "train_path")[: len(synthetic.TOPICS)]  # one training prompt per topic
    cfg, params = hf_io.load_checkpoint(warm_dir, mesh, rules)
    tokenizer = hf_io.load_tokenizer(warm_dir)
    if "scores" not in warm:
        t0 = time.perf_counter()
        warm["scores"] = evaluate_policy(params, cfg, tokenizer, val, seen, scaffold, args.best_of, 0, mesh, rules)
        warm["eval_seconds"] = time.perf_counter() - t0
        warm_file.write_text(json.dumps(warm, indent=2))
    log.info("warm start held-out scores: %s", warm["scores"])

    rows, finals = [], {}
    for seed in args.seeds:
        for arm in ARMS:
            run_dir = workdir / f"{arm}_seed{seed}"
            final_file = run_dir / "final_eval.json"
            if not final_file.exists():
                log.info("training %s, seed %d -> %s", arm, seed, run_dir)
                t0 = time.perf_counter()
                train(arm_config(arm, seed, warm_dir, args), run_dir)
                result = evaluate_policy(load_final_params(run_dir), cfg, tokenizer, val, seen, scaffold, args.best_of, seed,
                                         mesh, rules)
                result["train_seconds"] = time.perf_counter() - t0
                final_file.write_text(json.dumps(result, indent=2))
            finals[(arm, seed)] = {**json.loads(final_file.read_text())}
            finals[(arm, seed)]["best_of"] = {int(k): v for k, v in finals[(arm, seed)].get("best_of", {}).items()}
            rows.append({"arm": arm, "seed": seed, "step": 0, "heldout_score": warm["scores"]["greedy"],
                         **{k: float("nan") for k in curves.METRIC_KEYS if k != "heldout_score"}})
            rows += curves.read_run(run_dir / "metrics.jsonl", arm, seed)
    warm["scores"]["best_of"] = {int(k): v for k, v in warm["scores"].get("best_of", {}).items()}

    out = (ROOT / args.out) if not pathlib.Path(args.out).is_absolute() else pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves.write_csv(rows, out / f"{args.name}.csv")
    task = "with" if args.format_item else "without"
    curves.plot(rows, list(ARMS), ARMS, out / f"{args.name}.png", title=f"Synthetic key-word task ({task} the format item): "
                f"plain GRPO vs RuscaRL, {len(args.seeds)} seeds, mean and min-max")
    seconds = warm["seconds"] + warm["eval_seconds"] + sum(f["train_seconds"] for f in finals.values())
    table = results_table(rows, finals, warm, args, seconds)
    print(table)
    if write_table(table, out / "exploration_bottleneck.md", args.name):
        print(f"\nwrote the table into {out / 'exploration_bottleneck.md'}")
    print(f"wrote {out / f'{args.name}.csv'} and {out / f'{args.name}.png'} (this invocation "
          f"{(time.perf_counter() - started) / 60:.1f} min; runs in {workdir})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

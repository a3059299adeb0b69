"""The exploration-bottleneck experiment (issue 16): plain GRPO, RuscaRL and RuscaRL without step decay
on the synthetic kind-rubric task of data/tiny (ruscarl_jax/data/synthetic.py).

    python scripts/experiments/exploration_bottleneck.py [--seeds 0,1,2,3,4] [--out docs]

1. Warm start: configs/tiny.py's (SFT on data/tiny/warm_start.jsonl), built into --workdir.
2. Base rates of the warm start per rubric item type on the held-out prompts, over --base-rate-samples
   temperature-1 samples per prompt: without a scaffold and with every criterion shown.
3. Each arm x seed is `train()` on configs/tiny.py unchanged except the arm's scaffold rule and the seed:
   plain_grpo (rule 'binary', full_reveal_count 0: no sample ever sees the rubric), ruscarl (the
   config's step_sigmoid, reference defaults) and ruscarl_no_step_decay (rule 'linear': in-group decay
   only). The trainer scores greedy held-out answers without a scaffold every test_freq steps.
4. Final policies: held-out greedy (the primary measure), training-prompt greedy, held-out greedy with
   every criterion shown, Best-of-k of --best-of temperature-1 samples on held-out prompts.
5. Writes <out>/exploration_bottleneck.{csv,png,json} and the results table into
   <out>/exploration_bottleneck.md between the results markers.

Finished runs in --workdir are reused when the command is repeated (a changed setting needs a new
--workdir). --quick is a smoke test (few steps, 1 seed, writes to its workdir only).
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
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

ARMS = {"plain_grpo": "plain GRPO", "ruscarl": "RuscaRL (step_sigmoid)",
        "ruscarl_no_step_decay": "RuscaRL, no step decay (linear)"}
PRIMARY_MEASURE = ("held-out unscaffolded greedy score at the final step: HealthBench-style clipped mean over the 32 "
                   "held-out prompts (unseen topics, unseen wordings), per seed; arms compared by the mean over seeds "
                   "0-4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run seeds")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (0: configs/tiny.py's)")
    p.add_argument("--warm-start-steps", type=int, default=0, help="SFT steps of the warm start (0: configs/tiny.py's)")
    p.add_argument("--best-of", type=int, default=8, help="samples per held-out prompt for Best-of-N (0: skip)")
    p.add_argument("--base-rate-samples", type=int, default=64, help="samples per held-out prompt for the base rates")
    p.add_argument("--workdir", default="runs/exploration_bottleneck_v2")
    p.add_argument("--out", default="docs", help="where the CSV, PNG, JSON and results table go")
    p.add_argument("--name", default="exploration_bottleneck", help="stem of the output files and table markers")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 steps, 1 seed, writes to --workdir only")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        if args.workdir == p.get_default("workdir"):
            args.workdir += "_quick"
        args.seeds, args.steps, args.best_of, args.base_rate_samples = args.seeds[:1], 4, 2, 4
        args.out = args.workdir
    return args


def run_config(arm: str | None, seed: int, args: argparse.Namespace):
    """configs/tiny.py with the arm's scaffold rule, the seed, and the warm start cached in the workdir."""
    from configs.tiny import get_config

    c = get_config()
    c.seed = seed
    c.warm_start.cache_dir = str(args.workdir / "warm_start")
    if args.steps:
        c.trainer.total_steps = args.steps
    if args.warm_start_steps:
        c.warm_start.steps = args.warm_start_steps
    if args.quick:
        c.warm_start.steps = 10
    c.trainer.checkpoint_every, c.trainer.keep_checkpoints = 0, 1
    c.trainer.tensorboard, c.trainer.save_rollouts = False, False
    if arm == "plain_grpo":
        c.scaffold.rule, c.scaffold.full_reveal_count = "binary", 0  # every sample ratio 0: no scaffold
    elif arm == "ruscarl_no_step_decay":
        c.scaffold.rule = "linear"
    elif arm not in (None, "ruscarl"):
        raise ValueError(f"unknown arm {arm!r}")
    return c


def _texts(tokenizer, sample) -> list[str]:
    return tokenizer.batch_decode([t[:n] for t, n in zip(sample.tokens, sample.lengths)], skip_special_tokens=True)


def evaluate_policy(params, cfg, tokenizer, examples, seen, scaffold, num_samples: int, seed: int, mesh, rules) -> dict:
    """Held-out greedy without and with the full scaffold, Best-of-k of temperature-1 samples, and greedy
    on `seen` training prompts."""
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
        out["greedy_answers"] = sorted({row[0] for row in plain})
        plain = sample_responses(params, cfg, tokenizer, seen, 1, greedy, jax.random.key(seed), mesh=mesh, rules=rules)
        out["greedy_train"] = score([row[0] for row in plain], seen)
        full = build_prompts(examples, 1, None, None, dc.replace(scaffold, rule="linear"), seed, tokenizer)
        sample = generate(params, cfg, [r.sampling_ids for r in full.records], jax.random.key(seed), greedy, mesh=mesh, rules=rules)
        out["greedy_full_scaffold"] = score(_texts(tokenizer, sample))
        if num_samples:
            texts = sample_responses(params, cfg, tokenizer, examples, num_samples, sampling, jax.random.key(seed + 1),
                                     mesh=mesh, rules=rules)
            grades = judge.grade([(ex, t) for ex, row in zip(examples, texts) for t in row])
            grades = [grades[i * num_samples:(i + 1) * num_samples] for i in range(len(examples))]
            ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= num_samples]
            out["best_of"] = {k: v["score"] for k, v in report_lib.build_report(examples, grades, ks).best_of.items()}
    return out


def base_rates(params, cfg, tokenizer, examples, scaffold, num_samples: int, seed: int, mesh, rules) -> dict:
    """Per rubric item type, the fraction of (temperature-1 sample, item) pairs whose item is met, on
    `examples` without a scaffold and with every criterion shown; and the samples counted."""
    import dataclasses as dc

    import jax

    from ruscarl_jax.data import synthetic
    from ruscarl_jax.evaluation.responses import prompt_ids
    from ruscarl_jax.judge.verifiers import check_rule
    from ruscarl_jax.sampler.generate import generate
    from ruscarl_jax.sampler.settings import SamplingSettings
    from ruscarl_jax.scaffold.prompts import build_prompts
    from ruscarl_jax.trainer.setup import stop_token_ids

    sampling = SamplingSettings(max_new_tokens=10, stop_token_ids=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, temperature=1.0, prompt_bucket_min=16)
    full = build_prompts(examples, 1, None, None, dc.replace(scaffold, rule="linear"), seed, tokenizer)  # G=1: all shown
    modes = {"unscaffolded": prompt_ids(tokenizer, examples), "scaffolded": [r.sampling_ids for r in full.records]}
    out: dict = {}
    for mode, ids in modes.items():
        prompts = [p for p in ids for _ in range(num_samples)]
        sample = generate(params, cfg, prompts, jax.random.key(seed + 7), sampling, mesh=mesh, rules=rules)
        texts = _texts(tokenizer, sample)
        met: dict[str, list[bool]] = {}
        for i, text in enumerate(texts):
            for item in examples[i // num_samples].rubric:
                met.setdefault(synthetic.item_type(item), []).append(bool(check_rule(item, text)))
        for kind, values in met.items():
            out.setdefault(kind, {})[mode] = sum(values) / len(values)
        out.setdefault("_samples", {})[mode] = len(texts)
    return out


def load_final_params(run_dir: pathlib.Path):
    import orbax.checkpoint as ocp

    checkpoints = run_dir.absolute() / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    return ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state")["params"]


def _fmt(values: list[float]) -> str:
    import numpy as np

    values = [float(v) for v in values]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} [{', '.join(f'{v:.2f}' for v in values)}]"


def arm_results(rows: list[dict], finals: dict, seeds: list[int]) -> dict:
    """The JSON `arms` section: one value per seed for every measure."""
    import curves

    out = {}
    for arm in ARMS:
        final = curves.final_values(rows, arm, "heldout_score")
        kl = curves.last_window_mean(rows, arm, "kl", 10)
        out[arm] = {
            "seeds": seeds,
            "heldout_final": [final[s] for s in seeds],
            "train_prompts_final": [finals[(arm, s)]["greedy_train"] for s in seeds],
            "heldout_full_scaffold": [finals[(arm, s)]["greedy_full_scaffold"] for s in seeds],
            "train_reward_unscaffolded_last10": list(curves.last_window_mean(rows, arm, "train_reward_unscaffolded", 10).values()),
            "kl_last10": [kl[s] for s in seeds],
            "best_of": {str(k): [finals[(arm, s)]["best_of"][k] for s in seeds]
                        for k in sorted(finals[(arm, seeds[0])].get("best_of", {}))},
            "distinct_heldout_answers": [len(finals[(arm, s)]["greedy_answers"]) for s in seeds],
        }
    return out


def results_table(arms: dict, warm: dict) -> str:
    """The markdown results table (mean ± std over seeds; per-seed values in brackets)."""
    ks = sorted(int(k) for k in next(iter(arms.values()))["best_of"])
    head = ["arm", "held-out, final (greedy) [primary]", "training prompts, final (greedy)",
            "training rollouts without scaffold, last 10 steps", "held-out, all criteria shown (greedy)", "KL, last 10 steps"]
    head += [f"held-out best-of-{k} (T=1)" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    w = warm["scores"]
    lines.append("| warm start (step 0) | " + " | ".join(
        [f"{w['greedy']:.3f}", f"{w['greedy_train']:.3f}", "", f"{w['greedy_full_scaffold']:.3f}", ""]
        + [f"{w['best_of'][str(k)]:.3f}" for k in ks]) + " |")
    for arm, r in arms.items():
        cells = [ARMS[arm], _fmt(r["heldout_final"]), _fmt(r["train_prompts_final"]),
                 _fmt(r["train_reward_unscaffolded_last10"]), _fmt(r["heldout_full_scaffold"]), _fmt(r["kl_last10"])]
        cells += [_fmt(r["best_of"][str(k)]) for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
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
    import curves
    import jax

    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.loop import train
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    started = time.perf_counter()
    workdir = pathlib.Path(args.workdir)
    args.workdir = workdir = workdir if workdir.is_absolute() else ROOT / workdir
    workdir.mkdir(parents=True, exist_ok=True)
    recorded = {k: v for k, v in vars(args).items() if k not in ("out", "name", "seeds", "workdir")}
    settings_file = workdir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != recorded:
        print(f"error: {workdir} holds runs with other settings ({settings_file}); use a new --workdir", file=sys.stderr)
        return 2
    settings_file.write_text(json.dumps(recorded, indent=2))
    c = run_config(None, 0, args)
    if c.trainer.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(config_lib.resolve_path(c.trainer.compilation_cache_dir)))
    settings = config_lib.validate(c, num_devices=jax.device_count())
    mesh, rules = mesh_from_config(c), rules_from_config(c)
    train_examples, val = load_data(c, "train_path"), load_data(c, "val_path")[: int(c.data.val_examples)]
    seen = train_examples[:32]  # 32 training prompts (8 per kind)

    warm_file = workdir / "warm_start_eval.json"
    cfg, params, tokenizer = load_policy(c, mesh, rules, train_examples + val, settings.scaffold)  # builds it once
    if not warm_file.exists():
        info = next((workdir / "warm_start").glob("*/warm_start.json"))
        warm = json.loads(info.read_text())
        warm["build_seconds"] = warm.pop("seconds")  # the SFT itself, timed when the cache was built
        t0 = time.perf_counter()
        warm["scores"] = evaluate_policy(params, cfg, tokenizer, val, seen, settings.scaffold, args.best_of, 0, mesh, rules)
        warm["base_rates"] = base_rates(params, cfg, tokenizer, val, settings.scaffold, args.base_rate_samples, 0, mesh, rules)
        warm["eval_seconds"] = time.perf_counter() - t0
        warm_file.write_text(json.dumps(warm, indent=2))
    warm = json.loads(warm_file.read_text())
    log.info("warm start: scores %s, base rates %s", warm["scores"], warm["base_rates"])

    rows, finals = [], {}
    for seed in args.seeds:
        for arm in ARMS:
            run_dir = workdir / f"{arm}_seed{seed}"
            final_file = run_dir / "final_eval.json"
            if not final_file.exists():
                log.info("training %s, seed %d -> %s", arm, seed, run_dir)
                t0 = time.perf_counter()
                train(run_config(arm, seed, args), run_dir)
                result = evaluate_policy(load_final_params(run_dir), cfg, tokenizer, val, seen, settings.scaffold,
                                         args.best_of, seed, mesh, rules)
                result["train_seconds"] = time.perf_counter() - t0
                final_file.write_text(json.dumps(result, indent=2))
            finals[(arm, seed)] = json.loads(final_file.read_text())
            finals[(arm, seed)]["best_of"] = {int(k): v for k, v in finals[(arm, seed)].get("best_of", {}).items()}
            rows.append({"arm": arm, "seed": seed, "step": 0, "heldout_score": warm["scores"]["greedy"],
                         **{k: float("nan") for k in curves.METRIC_KEYS if k != "heldout_score"}})
            rows += curves.read_run(run_dir / "metrics.jsonl", arm, seed)

    out = pathlib.Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    curves.write_csv(rows, out / f"{args.name}.csv")
    curves.plot(rows, list(ARMS), ARMS, out / f"{args.name}.png",
                title=f"Kind-rubric task: rare words behind an exploration bottleneck, {len(args.seeds)} seeds, mean and min-max")
    arms = arm_results(rows, finals, args.seeds)
    compute = warm["build_seconds"] + warm["eval_seconds"] + sum(f["train_seconds"] for f in finals.values())
    rates = {k: v for k, v in warm["base_rates"].items() if not k.startswith("_")}
    result = {"primary_measure": PRIMARY_MEASURE, "arms": arms, "base_rates": rates,
              "base_rate_samples": warm["base_rates"]["_samples"],
              "warm_start": {k: warm[k] for k in ("steps", "demonstrations", "first_loss", "final_loss")} | {
                  "heldout_greedy": warm["scores"]["greedy"], "train_prompts_greedy": warm["scores"]["greedy_train"],
                  "heldout_full_scaffold": warm["scores"]["greedy_full_scaffold"],
                  "best_of": warm["scores"].get("best_of", {})},
              "steps": int(run_config(None, 0, args).trainer.total_steps), "compute_minutes": round(compute / 60, 2),
              "cpu_count": os.cpu_count()}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = results_table(arms, warm)
    table += ("\n\nBase rates of the warm start on the held-out prompts (fraction of samples meeting each item type, "
              f"{warm['base_rates']['_samples']['unscaffolded']} temperature-1 samples per mode): "
              + "; ".join(f"{k}: {v['unscaffolded']:.4f} without a scaffold, {v['scaffolded']:.4f} with every criterion shown"
                          for k, v in rates.items())
              + f".\n\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {result['steps']} steps per run; warm "
              f"start {warm['steps']} SFT steps on {warm['demonstrations']} demonstrations (loss {warm['first_loss']:.2f} -> "
              f"{warm['final_loss']:.2f}). Compute wall time {compute / 60:.1f} min ({os.cpu_count()} CPU cores, shared).")
    print(table)
    if write_table(table, out / f"{args.name}.md", args.name):
        print(f"\nwrote the table into {out / f'{args.name}.md'}")
    print(f"wrote {out / f'{args.name}.csv'}, .png and .json (this invocation "
          f"{(time.perf_counter() - started) / 60:.1f} min; runs in {workdir})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

"""The exploration-bottleneck experiment (issues 16 and 24): plain GRPO, RuscaRL and RuscaRL without step
decay on the synthetic kind-rubric task of data/tiny (ruscarl_jax/data/synthetic.py), 20 seeds per arm,
under two numerics (docs/exploration_bottleneck.md has the pre-registration).

    nice -n 10 python scripts/experiments/exploration_bottleneck.py [--seeds 0-19] [--workers 2] [--out docs]

1. Per numerics (`NUMERICS`), a warm start: configs/tiny.py's (SFT on data/tiny/warm_start.jsonl) with the
   numerics' overrides, built into --workdir/<numerics>/, scored and measured for base rates.
2. Each numerics x arm x seed is `train()` on configs/tiny.py unchanged except the arm's scaffold rule, the
   seed and the numerics' overrides: plain_grpo (rule 'binary', full_reveal_count 0: no sample ever sees
   the rubric), ruscarl (step_sigmoid, reference defaults) and ruscarl_no_step_decay (rule 'linear').
3. Final policies: held-out greedy (the primary measure is the trainer's own final held-out score),
   their rare words, training-prompt greedy, held-out greedy with every criterion shown, Best-of-k.
4. Writes <out>/<name>.{csv,png,json} and the results block of <out>/<name>.md (bottleneck_report.py,
   from the JSON alone: `--report-only` redraws it from a committed JSON).

Runs go to --workers processes (each takes jobs in turn; a job is claimed by creating its claim file)
and are cached: a finished run keeps its final_eval.json, so repeating the command skips it and only
redraws. --quick is a smoke test (1 seed, few steps; writes to its workdir only).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

ARMS = {"plain_grpo": "plain GRPO", "ruscarl": "RuscaRL (step_sigmoid)",
        "ruscarl_no_step_decay": "RuscaRL, no step decay (linear)"}
# numerics name -> (description, config overrides as dotted keys)
NUMERICS: dict[str, tuple[str, dict]] = {
    "a": ("A: as the code is (continuous engine; warm-start SFT in one micro-batch of 64)", {}),
    "b": ("B: warm-start SFT over two micro-batches of 32; static sampler schedule",
          {"warm_start.micro_batch_size": 32, "rollout.engine.schedule": "static"}),
}
PRIMARY_MEASURE = ("held-out unscaffolded greedy score at the final step: HealthBench-style clipped mean over the 32 "
                   "held-out prompts (unseen topics, unseen wordings), per seed")
CRITERION = ("per numerics: mean over seeds of (RuscaRL - plain GRPO) of the primary measure, paired by seed, with a "
             "95% percentile bootstrap interval (10,000 resamples of the seeds, numpy default_rng(0)); beats if the "
             "interval is above 0, loses if below, else inconclusive; numerics A gives the verdict, robust to "
             "numerics if B's interval excludes 0 on the same side")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-19", help="run seeds: a comma-separated list of numbers and ranges a-b")
    p.add_argument("--numerics", default=",".join(NUMERICS), help=f"comma-separated, of {', '.join(NUMERICS)}")
    p.add_argument("--workers", type=int, default=2, help="parallel run processes")
    p.add_argument("--steps", type=int, default=0, help="training steps of every run (0: configs/tiny.py's)")
    p.add_argument("--warm-start-steps", type=int, default=0, help="SFT steps of the warm start (0: configs/tiny.py's)")
    p.add_argument("--best-of", type=int, default=8, help="samples per held-out prompt for Best-of-N (0: skip)")
    p.add_argument("--base-rate-samples", type=int, default=64, help="samples per held-out prompt for the base rates")
    p.add_argument("--workdir", default="runs/exploration_bottleneck_v3")
    p.add_argument("--out", default="docs", help="where the CSV, PNG, JSON and results block go")
    p.add_argument("--name", default="exploration_bottleneck", help="stem of the output files and block markers")
    p.add_argument("--report-only", action="store_true", help="redraw the doc block from <out>/<name>.json only")
    p.add_argument("--no-run", action="store_true", help="start no run: write the outputs from the finished runs")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps, writes to --workdir only")
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seeds = _seeds(args.seeds)
    args.numerics = [n.strip() for n in args.numerics.split(",") if n.strip()]
    unknown = [n for n in args.numerics if n not in NUMERICS]
    if unknown or not args.seeds or args.workers < 1:
        p.error(f"unknown numerics {unknown}" if unknown else "--seeds must name a seed and --workers be >= 1")
    if args.quick:
        if args.workdir == p.get_default("workdir"):
            args.workdir += "_quick"
        args.seeds, args.steps, args.warm_start_steps, args.best_of, args.base_rate_samples = args.seeds[:1], 4, 10, 2, 4
        args.out = args.workdir
    workdir = pathlib.Path(args.workdir)
    args.workdir = workdir if workdir.is_absolute() else ROOT / workdir
    out = pathlib.Path(args.out)
    args.out = out if out.is_absolute() else ROOT / out
    return args


def run_config(numerics: str, arm: str | None, seed: int, args: argparse.Namespace):
    """configs/tiny.py with the numerics' overrides, the arm's scaffold rule, the seed, and the warm start
    cached in the numerics' workdir."""
    from configs.tiny import get_config

    c = get_config()
    c.seed = seed
    c.warm_start.cache_dir = str(args.workdir / numerics / "warm_start")
    if args.steps:
        c.trainer.total_steps = args.steps
    if args.warm_start_steps:
        c.warm_start.steps = args.warm_start_steps
    for key, value in NUMERICS[numerics][1].items():
        section, *path = key.split(".")
        node = c[section]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    c.trainer.checkpoint_every, c.trainer.keep_checkpoints = 0, 1
    c.trainer.tensorboard, c.trainer.save_rollouts = False, False
    if arm == "plain_grpo":
        c.scaffold.rule, c.scaffold.full_reveal_count = "binary", 0  # every sample ratio 0: no scaffold
    elif arm == "ruscarl_no_step_decay":
        c.scaffold.rule = "linear"
    elif arm not in (None, "ruscarl"):
        raise ValueError(f"unknown arm {arm!r}")
    return c


def jobs(args: argparse.Namespace, first: str | None = None) -> list[tuple[str, str | None, int]]:
    """(numerics, arm, seed) in the order a worker takes them: the warm start (arm None) of numerics
    `first`, then per numerics in order its warm start and its runs, seeds in order. So the workers build
    the warm starts in parallel and then share the runs of the first numerics (the verdict's) first."""
    warm = [(first, None, 0)] if first else []
    return warm + [job for n in args.numerics for job in [(n, None, 0)] * (n != first) + [(n, a, s) for s in args.seeds
                                                                                         for a in ARMS]]


def job_dir(args: argparse.Namespace, job: tuple[str, str | None, int]) -> pathlib.Path:
    numerics, arm, seed = job
    return args.workdir / numerics / (f"{arm}_seed{seed}" if arm else "warm_start_eval")


def _claim(directory: pathlib.Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(directory / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker(args: argparse.Namespace) -> int:
    """Take unclaimed, unfinished jobs in turn until none is left."""
    import bottleneck_eval as evaluation
    import jax

    from ruscarl_jax.trainer import config as config_lib
    from ruscarl_jax.trainer.loop import train
    from ruscarl_jax.trainer.setup import load_data, load_policy, mesh_from_config, rules_from_config

    log = logging.getLogger(f"exploration_bottleneck.worker{args.worker}")
    contexts: dict[str, dict] = {}

    def context(numerics: str) -> dict:
        if numerics not in contexts:
            c = run_config(numerics, None, 0, args)
            if c.trainer.compilation_cache_dir:
                jax.config.update("jax_compilation_cache_dir", str(config_lib.resolve_path(c.trainer.compilation_cache_dir)))
            settings = config_lib.validate(c, num_devices=jax.device_count())
            mesh, rules = mesh_from_config(c), rules_from_config(c)
            train_examples, val = load_data(c, "train_path"), load_data(c, "val_path")[: int(c.data.val_examples)]
            t0 = time.perf_counter()
            cfg, params, tokenizer = load_policy(c, mesh, rules, train_examples + val, settings.scaffold)  # builds once
            contexts[numerics] = dict(settings=settings, mesh=mesh, rules=rules, val=val, seen=train_examples[:32],
                                      cfg=cfg, params=params, tokenizer=tokenizer, load_seconds=time.perf_counter() - t0)
        return contexts[numerics]

    first = args.numerics[args.worker % len(args.numerics)]
    for job in jobs(args, first):
        directory = job_dir(args, job)
        if (directory / "result.json").exists() or not _claim(directory):
            continue
        numerics, arm, seed = job
        while arm is not None and not (job_dir(args, (numerics, None, 0)) / "result.json").exists():
            time.sleep(5)  # another worker is building this numerics' warm start
        t0 = time.perf_counter()
        ctx = context(numerics)
        common = (ctx["cfg"], ctx["tokenizer"], ctx["val"], ctx["settings"], ctx["mesh"], ctx["rules"])
        if arm is None:
            info = next((args.workdir / numerics / "warm_start").glob("*/warm_start.json"))
            result = json.loads(info.read_text())
            result["build_seconds"] = result.pop("seconds")  # the SFT itself, timed when the cache was built
            result["scores"] = evaluation.evaluate_policy(ctx["params"], *common, ctx["seen"], args.best_of, 0)
            result["base_rates"] = evaluation.base_rates(ctx["params"], *common, args.base_rate_samples, 0)
        else:
            if not (directory / "trained").exists():  # a run killed half way starts again
                log.info("training %s, %s, seed %d -> %s", numerics, arm, seed, directory)
                shutil.rmtree(directory / "checkpoints", ignore_errors=True)
                (directory / "metrics.jsonl").unlink(missing_ok=True)
                config = run_config(numerics, arm, seed, args)
                last = train(config, directory)
                if last.get("step") != int(config.trainer.total_steps):  # stopped by a signal: not a finished run
                    log.warning("%s stopped at step %s: left unfinished", directory, last.get("step"))
                    return 1
                (directory / "trained").write_text(f"{time.perf_counter() - t0:.1f}\n")
            result = evaluation.evaluate_policy(evaluation.load_final_params(directory), *common, ctx["seen"], args.best_of, seed)
        result["seconds"] = time.perf_counter() - t0
        (directory / "result.json").write_text(json.dumps(result, indent=2))
        log.info("done %s in %.0f s", directory.name, result["seconds"])
    return 0


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_workers(args: argparse.Namespace, argv: list[str], record) -> tuple[float, list[str]]:
    """Run the pending jobs in args.workers processes, calling record(wall seconds so far) at every poll
    (so a killed invocation still leaves its time); returns the wall seconds and failed workers' log tails."""
    log = logging.getLogger("exploration_bottleneck")
    all_jobs = jobs(args)
    for job in all_jobs:  # claims of runs that never finished belong to a dead invocation
        claim = job_dir(args, job) / "claim"
        if claim.exists() and not (claim.parent / "result.json").exists():
            claim.unlink()
    pending = [j for j in all_jobs if not (job_dir(args, j) / "result.json").exists()]
    if not pending:
        return 0.0, []
    log.info("%d jobs to run in %d processes (load average %s)", len(pending), min(args.workers, len(pending)), _load_average())
    start, procs = time.perf_counter(), []
    for i in range(min(args.workers, len(pending))):
        logfile = open(args.workdir / f"worker{i}.log", "a")
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}  # no accelerator probing
        procs.append((subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i)], stdout=logfile,
                                       stderr=subprocess.STDOUT, cwd=ROOT, env=env), logfile))
    while any(p.poll() is None for p, _ in procs):
        time.sleep(20)
        if any(p.poll() for p, _ in procs):  # one failed: stop the others (a rerun resumes)
            for p, _ in procs:
                if p.poll() is None:
                    p.terminate()
        record(time.perf_counter() - start)
        done = sum((job_dir(args, j) / "result.json").exists() for j in all_jobs)
        log.info("%d/%d jobs done, %.1f min, load average %s", done, len(all_jobs), (time.perf_counter() - start) / 60,
                 _load_average())
    failed = []
    for i, (p, logfile) in enumerate(procs):
        logfile.close()
        if p.returncode:
            tail = (args.workdir / f"worker{i}.log").read_text(errors="replace")[-3000:]
            failed.append(f"worker {i} exited {p.returncode}; the end of {args.workdir / f'worker{i}.log'}:\n{tail}")
    return time.perf_counter() - start, failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import bottleneck_report

    if args.worker >= 0:
        return worker(args)
    json_path, doc = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    if args.report_only:
        block = bottleneck_report.render(json.loads(json_path.read_text()))
        print(block)
        return 0 if bottleneck_report.write_block(block, doc, args.name) else 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    recorded = {k: v for k, v in vars(args).items() if k in ("steps", "warm_start_steps", "best_of", "base_rate_samples", "quick")}
    settings_file = args.workdir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != recorded:
        print(f"error: {args.workdir} holds runs with other settings ({settings_file}); use a new --workdir", file=sys.stderr)
        return 2
    settings_file.write_text(json.dumps(recorded, indent=2))
    load_before, wall_file = _load_average(), args.workdir / "wall.json"
    wall = json.loads(wall_file.read_text()) if wall_file.exists() else {"seconds": 0.0, "invocations": []}
    previous = wall["seconds"]

    def record(seconds: float) -> None:  # this invocation's entry, rewritten as it goes
        entry = {"seconds": round(seconds, 1), "workers": args.workers, "load_before": load_before,
                 "load_after": _load_average(), "cpu_count": os.cpu_count(), "started": started}
        wall["invocations"] = [i for i in wall["invocations"] if i.get("started") != started] + [entry]
        wall["seconds"] = previous + seconds
        wall_file.write_text(json.dumps(wall, indent=2))

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    seconds, failed = (0.0, []) if args.no_run else run_workers(args, argv, record)
    if seconds:
        record(seconds)
    if failed:
        print("\n\n".join(failed), file=sys.stderr)
        print("some runs failed; the finished ones are kept: run the command again to retry the rest", file=sys.stderr)
        return 1
    result, rows = bottleneck_report.collect(args, ARMS, NUMERICS, jobs(args), job_dir, wall)
    result |= {"primary_measure": PRIMARY_MEASURE, "criterion": CRITERION}
    args.out.mkdir(parents=True, exist_ok=True)
    import curves
    curves.write_csv(rows, args.out / f"{args.name}.csv")
    curves.plot(rows, list(ARMS), ARMS, args.out / f"{args.name}.png",
                numerics={n: NUMERICS[n][0].split(":")[0] for n in result["numerics"] if result["numerics"][n]["seeds"]},
                title="Kind-rubric task: mean over seeds and 95% bootstrap band of the mean (seeds in the legends)")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    block = bottleneck_report.render(result)
    print(block)
    if bottleneck_report.write_block(block, doc, args.name):
        print(f"\nwrote the results block into {doc}")
    print(f"wrote {args.out / args.name}.csv, .png and .json (runs in {args.workdir})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

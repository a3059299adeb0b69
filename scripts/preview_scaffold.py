"""Preview what each sample of each example will see under a scaffold schedule, before a real run.

Prints one JSON line per (example, sample) with example_id, sample_index, ratio, shown_indices (0-based
positions in the example's rubric) and system_message (null when no scaffold). With --plot it also
draws each sample index's ratio over training steps 1..--total-steps.

    python scripts/preview_scaffold.py --data ../shared/healthbench/healthbench_val400.jsonl \
        --rule step_sigmoid --num-generations 8 --step 10 --total-steps 350 \
        --start-point 0.2 --steepness 125 --limit 2 --plot schedule.png
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ruscarl_jax.data.loaders import BAD_ROW_POLICIES, FORMATS, load_examples  # noqa: E402
from ruscarl_jax.scaffold.plan import plan_example  # noqa: E402
from ruscarl_jax.scaffold.ratio import ratio_schedule  # noqa: E402
from ruscarl_jax.scaffold.settings import GROUP_DECAYS, RULES, ScaffoldSettings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ScaffoldSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="HealthBench JSONL, verl parquet or plain JSONL file")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--on-bad-row", default="fail", choices=BAD_ROW_POLICIES)
    p.add_argument("--rule", default=d.rule, choices=RULES)
    p.add_argument("--group-decay", default=d.group_decay, choices=GROUP_DECAYS)
    p.add_argument("--full-reveal-count", type=int, default=d.full_reveal_count)
    p.add_argument("--power", type=float, default=d.power)
    p.add_argument("--start-point", type=float, default=d.start_point)
    p.add_argument("--steepness", type=float, default=d.steepness)
    p.add_argument("--add-base-when-zero", action=argparse.BooleanOptionalAction, default=d.add_base_when_zero)
    p.add_argument("--evaluation-warning", action=argparse.BooleanOptionalAction,
                   default=d.include_evaluation_warning)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--step", type=int, default=1, help="1-based training step")
    p.add_argument("--total-steps", type=int, default=None, help="unset: no over-training decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--plot", type=pathlib.Path, default=None, help="PNG of each sample index's ratio over steps")
    return p.parse_args(argv)


def plot_schedule(path: pathlib.Path, num_generations: int, total_steps: int, settings: ScaffoldSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = ratio_schedule(num_generations, total_steps, settings)
    steps = range(1, total_steps + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in range(num_generations):
        ax.plot(steps, ratios[:, k], label=f"sample {k}")
    ax.set(xlabel="training step", ylabel="reveal ratio", ylim=(-0.02, 1.02),
           title=f"rule {settings.rule}, n = {num_generations}")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = ScaffoldSettings(
            rule=args.rule, group_decay=args.group_decay, full_reveal_count=args.full_reveal_count,
            power=args.power, start_point=args.start_point, steepness=args.steepness,
            add_base_when_zero=args.add_base_when_zero, include_evaluation_warning=args.evaluation_warning)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.plot is not None and args.total_steps is None:
            raise ValueError("--plot needs --total-steps")
        examples, report = load_examples(args.data, fmt=args.format, on_bad_row=args.on_bad_row)
        if report.num_skipped:
            print(report.summary(), file=sys.stderr)
        for ex in examples[: args.limit]:
            for plan in plan_example(ex, args.num_generations, args.step, args.total_steps, settings, args.seed):
                print(json.dumps(plan.to_json()))
        if args.plot is not None:
            plot_schedule(args.plot, args.num_generations, args.total_steps, settings)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"preview_scaffold: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

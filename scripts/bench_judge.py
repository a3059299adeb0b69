"""Judge throughput: LLM verdicts per second against local fake servers that answer at once.

The servers (`ruscarl_jax.judge.fake_server`, one process each, so they do not share the judge's
interpreter) grade by their deterministic rule; the judge sends every criterion of every response of
the batch as one request, with the given concurrency, exactly as in training. The rubrics are the
real HealthBench ones (../shared/healthbench/) when present, else synthetic ones of the same shape;
the response under grade is a ~1.5 kB text, so prompts have realistic sizes.

    python scripts/bench_judge.py                         # concurrency 256, one server, 3 rounds
    python scripts/bench_judge.py --concurrency 64 --servers 2 --rounds 5 --json out.json

Prints one JSON object: verdicts/s of each round, the best and the median; the CPU milliseconds per
verdict of the judge process and of the server processes (their sum bounds what the machine's cores can
reach: cores / total CPU per verdict); latency percentiles; the load average (the figure is only as
good as the machine is quiet); and counters (every verdict must be graded: ungraded is reported).
"""
from __future__ import annotations

import argparse
import json
import os

import psutil
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ruscarl_jax.data.types import Example, Message, RubricItem  # noqa: E402
from ruscarl_jax.judge.judge import Judge  # noqa: E402
from ruscarl_jax.judge.settings import JudgeSettings  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "healthbench" / "healthbench_val400.jsonl"


def load_examples(path: pathlib.Path, limit: int) -> list[Example]:
    if path.is_file():
        from ruscarl_jax.data.loaders import load_examples as load

        examples, _ = load(path)
        return examples[:limit]
    return [Example(f"synthetic-{i}", (Message("user", f"Question {i}: " + "details " * 60),),
                    tuple(RubricItem(f'Criterion {k} mentions "topic {k}"', 5 - k) for k in range(12)))
            for i in range(limit)]


def response_for(example: Example) -> str:
    text = " ".join(item.criterion for item in example.rubric)
    return (text * (1 + 1500 // max(1, len(text))))[:1500]


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ruscarl_jax.judge.fake_server", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the result here")
    args = parser.parse_args()

    examples = load_examples(args.data, args.examples)
    items = [(ex, response_for(ex)) for ex in examples]
    llm_criteria = sum(1 for ex in examples for item in ex.rubric if not item.is_rule)
    servers = [start_server() for _ in range(args.servers)]
    try:
        settings = JudgeSettings(base_urls=tuple(url for _, url in servers), model="fake-judge", api_key_env=None,
                                 max_concurrency=args.concurrency, max_concurrency_per_endpoint=args.concurrency,
                                 timeout_s=60.0, max_retries=2)
        with Judge(settings) as judge:
            judge.grade(items[: max(1, args.concurrency // 8)])  # warm-up: connections, imports
            rates, cpu, server_cpu = [], [], []
            watched = [psutil.Process(proc.pid) for proc, _ in servers]
            for _ in range(args.rounds):
                server0 = sum(sum(p.cpu_times()[:2]) for p in watched)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                grades = judge.grade(items)
                wall, used = time.perf_counter() - wall0, time.process_time() - cpu0
                rates.append(llm_criteria / wall)
                cpu.append(used / llm_criteria)
                server_cpu.append((sum(sum(p.cpu_times()[:2]) for p in watched) - server0) / llm_criteria)
                assert len(grades) == len(items)
            metrics = judge.metrics()
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)
    result = {
        "verdicts_per_round": llm_criteria, "concurrency": args.concurrency, "servers": args.servers,
        "verdicts_per_s": [round(r, 1) for r in rates], "best_verdicts_per_s": round(max(rates), 1),
        "median_verdicts_per_s": round(statistics.median(rates), 1),
        "judge_cpu_ms_per_verdict": round(1e3 * statistics.median(cpu), 3),
        "server_cpu_ms_per_verdict": round(1e3 * statistics.median(server_cpu), 3),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "latency_p50_s": metrics["latency_p50_s"], "latency_p99_s": metrics["latency_p99_s"],
        "ungraded": metrics["ungraded"], "requests": metrics["requests"], "cpu_count": os.cpu_count(),
        "data": str(args.data) if args.data.is_file() else "synthetic",
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

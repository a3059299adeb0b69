"""Evaluate a checkpoint HealthBench-style: N samples per example, judged, with Best-of-N.

    python scripts/evaluate.py --checkpoint DIR --data FILE [--judge-base-url URL --judge-model NAME]
        [--num-samples N] [--best-of 1,2,4,8,16] [--output DIR]

DIR is a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files), e.g. what
scripts/export.py writes from a training run. FILE is HealthBench JSONL, verl parquet or plain JSONL.
Every example is answered N times from its own conversation (no scaffold) with the in-framework
sampler; the judge grades every criterion (rule-verified criteria need no judge server, so a
rule-only file runs without --judge-base-url). Output: tables on stdout, and in --output
report.json, best_of.png and responses.jsonl (every response with its score and verdicts).
The judge's API key is read from the environment variable --judge-api-key-env names (no key when unset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ruscarl_jax.data.loaders import BAD_ROW_POLICIES, FORMATS  # noqa: E402

DEFAULT_BEST_OF = (1, 2, 4, 8, 16)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return tuple(sorted(set(values)))


def _mesh_shape(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected axis=size pairs such as data=-1,tensor=1, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help="HealthBench JSONL, verl parquet or plain JSONL file")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--on-bad-row", default="fail", choices=BAD_ROW_POLICIES)
    p.add_argument("--max-examples", type=int, default=0, help="evaluate only the first N examples (0: all)")
    p.add_argument("--judge-base-url", action="append", default=[], help="OpenAI-compatible endpoint (repeatable)")
    p.add_argument("--judge-model", default="", help="judge model name (required with --judge-base-url)")
    p.add_argument("--judge-api-key-env", default="RUSCARL_JUDGE_API_KEY")
    p.add_argument("--judge-concurrency", type=int, default=64)
    p.add_argument("--judge-timeout", type=float, default=120.0)
    p.add_argument("--judge-max-retries", type=int, default=4)
    p.add_argument("--judge-cache", default="", help="SQLite verdict cache file (off when empty)")
    p.add_argument("--ungraded-policy", default="drop_group", choices=("drop_group", "graded_only"))
    p.add_argument("--num-samples", type=int, default=1, help="responses per example (N)")
    p.add_argument("--best-of", type=_int_list, default=None,
                   help="k values of Best-of-k (default 1,2,4,8,16 up to N; each must be <= N)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--greedy", action="store_true", help="arg-max decoding (then N > 1 repeats one answer)")
    p.add_argument("--max-prompt-length", type=int, default=0, help="error for longer prompts (0: no limit)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--mesh", type=_mesh_shape, default={"data": -1}, help="mesh axis sizes, e.g. data=-1,tensor=1")
    p.add_argument("--num-bootstrap", type=int, default=1000)
    p.add_argument("--output", default="eval", help="directory for report.json, best_of.png, responses.jsonl")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.best_of is None:
        args.best_of = tuple(k for k in DEFAULT_BEST_OF if k <= args.num_samples)
    elif max(args.best_of) > args.num_samples:
        p.error(f"--best-of {max(args.best_of)} exceeds --num-samples {args.num_samples}")
    if args.judge_base_url and not args.judge_model:
        p.error("--judge-model is required with --judge-base-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "httpx", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return evaluate(args)
    except (FileNotFoundError, ValueError) as err:  # bad data rows, checkpoints, settings: the message names them
        print(f"error: {err}", file=sys.stderr)
        return 2


def evaluate(args: argparse.Namespace) -> int:
    """Sample, judge, aggregate and write the report (see the module docstring)."""
    import jax

    from ruscarl_jax.data.loaders import load_examples
    from ruscarl_jax.evaluation import report as report_lib
    from ruscarl_jax.evaluation.responses import sample_responses
    from ruscarl_jax.judge.judge import Judge
    from ruscarl_jax.judge.settings import JudgeSettings
    from ruscarl_jax.models import hf_io
    from ruscarl_jax.models.sharding import DEFAULT_RULES, make_mesh
    from ruscarl_jax.sampler.settings import SamplingSettings
    from ruscarl_jax.trainer.setup import stop_token_ids

    checkpoint = pathlib.Path(args.checkpoint)
    examples, _ = load_examples(args.data, fmt=args.format, on_bad_row=args.on_bad_row)
    if args.max_examples:
        examples = examples[:args.max_examples]
    key_env = args.judge_api_key_env if os.environ.get(args.judge_api_key_env) else None
    if args.judge_base_url and key_env is None:
        logging.getLogger("evaluate").info("$%s is unset: judge requests carry no API key", args.judge_api_key_env)
    judge_settings = JudgeSettings(base_urls=tuple(args.judge_base_url), model=args.judge_model, api_key_env=key_env,
                                   max_concurrency=args.judge_concurrency, timeout_s=args.judge_timeout,
                                   max_retries=args.judge_max_retries, cache_path=args.judge_cache or None,
                                   ungraded_policy=args.ungraded_policy)
    llm_graded = next((ex for ex in examples if any(not item.is_rule for item in ex.rubric)), None)
    if llm_graded is not None and not judge_settings.base_urls:  # fail before loading the model and sampling
        raise ValueError(f"example {llm_graded.id!r} of {args.data} has criteria graded by an LLM judge; "
                         "pass --judge-base-url and --judge-model")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint: {checkpoint} is not a directory")
    mesh = make_mesh(args.mesh)
    cfg, params = hf_io.load_checkpoint(checkpoint, mesh, DEFAULT_RULES, dtype=args.dtype)  # CheckpointError: a ValueError
    tokenizer = hf_io.load_tokenizer(checkpoint)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, stop_token_ids=stops, pad_token_id=pad,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, greedy=args.greedy)

    start = time.perf_counter()
    with Judge(judge_settings) as judge:
        responses = sample_responses(params, cfg, tokenizer, examples, args.num_samples, sampling,
                                     jax.random.key(args.seed), batch_size=args.batch_size,
                                     max_prompt_length=args.max_prompt_length or None, mesh=mesh, rules=DEFAULT_RULES)
        sample_seconds = time.perf_counter() - start
        graded = judge.grade([(ex, text) for ex, row in zip(examples, responses) for text in row])
        judge_metrics = judge.metrics()
    n = args.num_samples
    grades = [graded[i * n:(i + 1) * n] for i in range(len(examples))]
    report = report_lib.build_report(examples, grades, args.best_of, num_bootstrap=args.num_bootstrap, seed=args.seed)

    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    context = {"checkpoint": str(checkpoint), "data": str(args.data), "sampling": dataclasses.asdict(sampling),
               "judge": {"base_urls": list(judge_settings.base_urls), "model": judge_settings.model,
                         "ungraded_policy": judge_settings.ungraded_policy},
               "judge_metrics": judge_metrics, "sample_seconds": sample_seconds,
               "total_seconds": time.perf_counter() - start}
    report_lib.save_json(report, out / "report.json", **context)
    report_lib.plot_best_of(report, out / "best_of.png", title=f"Best-of-N: {checkpoint.name} on {pathlib.Path(args.data).name}")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for ex, row, grade_row in zip(examples, responses, grades):
            for k, (text, grade) in enumerate(zip(row, grade_row)):
                f.write(json.dumps({"example_id": ex.id, "sample_index": k, "response": text, "score": grade.score,
                                    "met": [c.met for c in grade.criteria]}, ensure_ascii=False) + "\n")
    print(report_lib.format_report(report))
    print(f"\nwrote {out / 'report.json'}, {out / 'best_of.png'}, {out / 'responses.jsonl'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

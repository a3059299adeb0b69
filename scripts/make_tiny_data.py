"""Regenerate data/tiny/ (the synthetic rule-verified rubric task of configs/tiny.py) from its seed.

    python scripts/make_tiny_data.py [--seed 0] [--train 128] [--val 32] [--warm-start 256] [--out data/tiny]

Writes train.jsonl and val.jsonl (ruscarl_jax/data/synthetic.py's task; val has unseen topics and
wordings) and warm_start.jsonl: the demonstrations of configs/tiny.py's warm start. Each warm-start
example (other topics, a fresh random rubric) is scaffolded 8 times with configs/tiny.py's scaffold
wording at the in-group linear reveal ratios 1 .. 0, exactly as a rollout would be, and answered by
`synthetic.demonstration` (the shown words to include, common words otherwise).
"""
import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.tiny import get_config  # noqa: E402
from ruscarl_jax.data import synthetic  # noqa: E402
from ruscarl_jax.scaffold.plan import plan_example  # noqa: E402
from ruscarl_jax.scaffold.settings import ScaffoldSettings  # noqa: E402

GROUP = 8  # reveal ratios 1, 6/7, ..., 0 per warm-start example


def demonstration_rows(examples, scaffold: ScaffoldSettings, seed: int = 0) -> list[dict]:
    """GROUP {"prompt", "response"} rows per example: linear in-group reveal, no step decay, nothing
    added to a prompt that shows no criterion."""
    scaffold = ScaffoldSettings(**{**scaffold.__dict__, "rule": "linear", "add_base_when_zero": False})
    rng = np.random.default_rng([seed, 3])
    rows = []
    for ex in examples:
        for plan in plan_example(ex, GROUP, None, None, scaffold, seed):
            rows.append({"prompt": [m.to_dict() for m in plan.messages],
                         "response": synthetic.demonstration(ex, plan.shown_indices, rng)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--warm-start", type=int, default=256, help="warm-start examples (x 8 demonstrations)")
    parser.add_argument("--out", default=str(ROOT / "data" / "tiny"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    synthetic.write_jsonl(synthetic.make_examples(args.train, args.seed), out / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_examples(args.val, args.seed, held_out=True), out / "val.jsonl")
    c = get_config().scaffold.to_dict()
    scaffold = ScaffoldSettings(**{k: v for k, v in c.items()})
    rows = demonstration_rows(synthetic.make_warm_start_examples(args.warm_start, args.seed), scaffold, args.seed)
    with (out / "warm_start.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {args.train} + {args.val} examples and {len(rows)} demonstrations to {out}")


if __name__ == "__main__":
    main()

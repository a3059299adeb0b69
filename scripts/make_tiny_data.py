"""Regenerate data/tiny/ (the synthetic rule-verified rubric task of configs/tiny.py) from its seed.

    python scripts/make_tiny_data.py [--seed 0] [--train 128] [--val 32] [--out data/tiny]
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ruscarl_jax.data import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--out", default="data/tiny")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    synthetic.write_jsonl(synthetic.make_examples(args.train, args.seed), out / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_examples(args.val, args.seed, held_out=True), out / "val.jsonl")
    print(f"wrote {args.train} + {args.val} examples to {out}")


if __name__ == "__main__":
    main()

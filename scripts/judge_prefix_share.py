"""How much of a response's judge prompts a serving engine's prefix cache can reuse, and requests per response.

For each example of the HealthBench file, the LLM criteria of one fixed response (~2.6 kB) are rendered
with the grader template; the shared prefix of a response is the longest common prefix of its prompts,
and its share is (prompts x prefix length) / (total prompt characters): the fraction of the text a
prefix cache computes once per response instead of once per criterion. Reported for the current
template (rubric item last) and for the previous order (rubric item before the instructions, same
wording). Then the judge grades every example against the local fake server, per-criterion and batched,
and the requests per response are counted on the server.

    python scripts/judge_prefix_share.py --data ../shared/healthbench/healthbench_val400.jsonl [--examples 400] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ruscarl_jax.data.loaders import load_examples  # noqa: E402
from ruscarl_jax.data.types import Example  # noqa: E402
from ruscarl_jax.judge import grader  # noqa: E402
from ruscarl_jax.judge.fake_server import FakeJudgeServer  # noqa: E402
from ruscarl_jax.judge.judge import Judge  # noqa: E402
from ruscarl_jax.judge.settings import JudgeSettings  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "healthbench" / "healthbench_val400.jsonl"
RESPONSE = ("It is understandable to be worried about these symptoms. Based on what you describe, the most likely "
            "causes are common and manageable, but a few warning signs need prompt medical attention. ") * 14
RESPONSE = RESPONSE[:2600]


def legacy_prompt(messages, response, item) -> str:
    """The previous order, same wording: intro, conversation, rubric item, then the instructions."""
    cut = grader.INSTRUCTIONS.index("\n# How to answer")
    intro, rules = grader.INSTRUCTIONS[:cut], grader.INSTRUCTIONS[cut:]
    return (intro + "\n\n# Conversation\n" + grader.render_conversation(messages, response) + "\n\n# Rubric item\n"
            + grader.render_rubric_item(item) + "\n" + rules + "\n# Final instruction\nReply with the JSON object only.")


def prefix_share(examples: list[Example], render) -> dict[str, float]:
    shared = total = 0
    per_response = []
    for ex in examples:
        prompts = [render(ex.messages, RESPONSE, item) for item in ex.rubric if not item.is_rule]
        if len(prompts) < 2:
            continue
        prefix = len(os.path.commonprefix(prompts))
        chars = sum(len(p) for p in prompts)
        shared += prefix * len(prompts)
        total += chars
        per_response.append(prefix * len(prompts) / chars)
    return {"share": shared / total, "share_mean_per_response": sum(per_response) / len(per_response),
            "mean_prompt_chars": total / sum(len([i for i in ex.rubric if not i.is_rule]) for ex in examples)}


def requests_per_response(examples: list[Example], batched: bool) -> dict[str, float]:
    items = [(ex, RESPONSE) for ex in examples]
    with FakeJudgeServer() as server:
        settings = JudgeSettings(base_urls=(server.base_url,), model="fake-judge", api_key_env=None,
                                 batch_criteria=batched, max_concurrency=64)
        with Judge(settings) as judge:
            grades = judge.grade(items)
            counters = judge.metrics()
    return {"requests_per_response": server.requests / len(items), "ungraded": sum(g.ungraded_count for g in grades),
            "batch_fallbacks": counters["batch_fallbacks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"--data: file not found: {args.data}")
    examples, _ = load_examples(args.data)
    examples = examples[: args.examples]
    out = {
        "data": str(args.data), "examples": len(examples), "response_chars": len(RESPONSE),
        "criteria_per_response": sum(len(ex.rubric) for ex in examples) / len(examples),
        "prefix_item_last": prefix_share(examples, grader.grader_prompt),
        "prefix_item_first_legacy": prefix_share(examples, legacy_prompt),
        "per_criterion": requests_per_response(examples, batched=False),
        "batched": requests_per_response(examples, batched=True),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

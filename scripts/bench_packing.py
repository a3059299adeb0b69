"""Packing on a length-skewed batch: the fraction of the tokens the update computes that are real, and the
update's throughput packed / unpacked, measured in the same run.

The batch (seeded): --rows rows of a prompt of uniform(32, P) real tokens left-padded to P, and a response
padded to R: --tail (default 25%) of the rows are truncated at R (finish reason 'length'), the others are
uniform(16, --short-max) tokens: most responses a few hundred tokens or less, a tail at the limit, as RL
responses are. Unpacked: micro-batches of --micro rows of width P + R. Packed: micro-batches of one buffer of
--budget tokens per device (GRPOSettings.micro_token_budget), empty ones skipped.

Reported: the real-token fraction of each (real tokens / tokens computed by the forward and backward
passes), the median seconds of --repeats runs of one jitted grpo_update (one minibatch = the whole batch;
log-prob pass excluded), and packed / unpacked real tokens per second; the load average before and after
(the machine may be shared).

    python scripts/bench_packing.py                      # CPU, a 2-layer Qwen shape
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ruscarl_jax.models.qwen import QwenConfig, init_params  # noqa: E402
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer  # noqa: E402
from ruscarl_jax.rl.policy import qwen_policy  # noqa: E402
from ruscarl_jax.rl.settings import GRPOSettings  # noqa: E402
from ruscarl_jax.rl.train_step import grpo_update  # noqa: E402


def skewed_batch(rows: int, prompt: int, response: int, short_max: int, tail: float, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, prompt + response), np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros((rows, response), np.int32)
    long_rows = rng.permutation(rows)[: int(round(tail * rows))]
    for i in range(rows):
        p = int(rng.integers(32, prompt + 1))
        r = response if i in long_rows else int(rng.integers(16, short_max + 1))
        attn[i, prompt - p: prompt + r] = 1
        ids[i, prompt - p: prompt + r] = rng.integers(1, vocab, p + r)
        resp[i, :r] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "rewards": rng.random(rows).astype(np.float32), "group_ids": np.arange(rows) // 8}


def fractions(args: argparse.Namespace) -> None:
    """Real tokens over computed tokens of the update, unpacked (every row at P + R, micro-batches of --micro
    rows) and packed (the update's own packing of each minibatch into --dp buffers of --budget tokens per
    micro-batch; empty micro-batches skipped)."""
    from ruscarl_jax.rl import packing

    width = args.prompt_len + args.response_len
    budget = args.budget or width
    batch = skewed_batch(args.rows, args.prompt_len, args.response_len, args.short_max, args.tail, 1000)
    lengths = batch["attention_mask"].sum(-1)
    resp = batch["response_mask"].sum(-1)
    minibatch = args.minibatch or args.rows
    computed = 0
    for start in range(0, args.rows, minibatch):
        mask = jnp.asarray(batch["attention_mask"][start:start + minibatch])
        nb = packing.num_buffers(minibatch, args.dp)
        lay = packing.layout(mask, jnp.ones(minibatch, bool), nb, budget)
        used = np.unique(np.asarray(lay.buffer)[np.asarray(lay.buffer) >= 0] // args.dp)
        computed += len(used) * args.dp * budget
    print(f"batch: {args.rows} rows, prompts uniform(32, {args.prompt_len}) left-padded to {args.prompt_len}, responses "
          f"padded to {args.response_len}: {int((resp == args.response_len).sum())} at the limit, the rest uniform(16, "
          f"{args.short_max}) (median {int(np.median(resp))}, mean {resp.mean():.0f}); real tokens {int(lengths.sum())}")
    print(f"unpacked: real-token fraction {lengths.sum() / (args.rows * width):.3f} ({args.rows} x {width} computed)")
    print(f"packed:   real-token fraction {lengths.sum() / computed:.3f} ({computed} computed: minibatches of {minibatch} "
          f"rows, micro-batches of {args.dp} x {budget} tokens)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--short-max", type=int, default=192)
    p.add_argument("--tail", type=float, default=0.25)
    p.add_argument("--micro", type=int, default=4, help="rows per unpacked micro-batch")
    p.add_argument("--budget", type=int, default=0, help="tokens per packed buffer (default: the row width)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fraction-only", action="store_true",
                   help="only the real-token fractions (the packing of the update's minibatches; no model, no timing)")
    p.add_argument("--minibatch", type=int, default=0, help="rows per minibatch (default: all rows)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel devices (buffers per packed micro-batch)")
    args = p.parse_args(argv)
    if args.fraction_only:
        return fractions(args)

    cfg = QwenConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64)
    width = args.prompt_len + args.response_len
    budget = args.budget or width
    batch = {k: jnp.asarray(v) for k, v in skewed_batch(args.rows, args.prompt_len, args.response_len,
                                                         args.short_max, args.tail, cfg.vocab_size).items()}
    lengths = np.asarray(batch["attention_mask"]).sum(-1)
    real = int(lengths.sum())
    resp = np.asarray(batch["response_mask"]).sum(-1)
    print(f"batch: {args.rows} rows, prompt {args.prompt_len} + response {args.response_len} padded; response "
          f"lengths: median {int(np.median(resp))}, mean {resp.mean():.0f}, {int((resp == args.response_len).sum())} "
          f"at the limit; real tokens {real} of {lengths.size * width} padded")
    params = init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-5))
    opt_state = optimizer.init(params)
    policy = qwen_policy(cfg)
    base = GRPOSettings(ppo_mini_batch_size=args.rows, ppo_micro_batch_size=args.micro, use_kl_loss=False,
                        logprob_chunk_size=256)
    old = jnp.zeros(batch["response_mask"].shape, jnp.float32)
    print(f"load average before: {os.getloadavg()}")
    results = {}
    for name, settings in (("unpacked", base), ("packed", dataclasses.replace(base, micro_token_budget=budget))):
        fn = jax.jit(lambda p, o, b, k, s=settings: grpo_update(p, o, b, old, None, k, policy=policy, settings=s,
                                                                  optimizer=optimizer))
        out = fn(params, opt_state, batch, jax.random.key(1))
        jax.block_until_ready(out)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, opt_state, batch, jax.random.key(1)))
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        fraction = float(out[2].get("packed_token_fraction", real / (lengths.size * width)))
        results[name] = (sec, fraction, float(out[2]["loss"]))
        print(f"{name:9s}: real-token fraction {fraction:.3f}, update {sec:.2f} s (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times)}), {real / sec:,.0f} real tokens/s, loss {float(out[2]['loss']):.6f}")
    print(f"load average after: {os.getloadavg()}")
    speed = results["unpacked"][0] / results["packed"][0]
    print(f"packed / unpacked throughput: {speed:.2f}x (budget {budget} tokens per buffer, unpacked micro-batches of "
          f"{args.micro} rows); loss difference {abs(results['packed'][2] - results['unpacked'][2]):.2e}")


if __name__ == "__main__":
    main()

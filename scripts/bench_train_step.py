"""Throughput of the GRPO training step (log-probs + backward + AdamW update) against PyTorch, same run.

JAX side: one `grpo_update` over one minibatch of `--batch` rows of `--prompt-len` + `--response-len`
tokens (chunked response log-probs, clipped policy loss, gradient, global-norm clip, AdamW). Peer: a
transformers Qwen2ForCausalLM of the same shape, the same token ids, forward with logits for the
response positions only, the same token-mean policy-gradient loss, backward, clip_grad_norm_, AdamW.

Reported per framework: tokens/s (all P + R positions of every row) and model FLOPs utilisation:
  FLOPs = 6 * N_body * tokens + 6 * E * V * response_tokens + 12 * L * H * D * T * tokens
(N_body: parameters outside the embedding and output matrices; the attention term is PaLM's, without a
causal discount) over the peak, which is MEASURED here as the best rate of a large jitted matmul in the
compute dtype on the same device (--peak-tflops overrides it with a datasheet figure).

    python scripts/bench_train_step.py                                  # CPU: small Qwen shape, 2k tokens
    python scripts/bench_train_step.py --preset qwen2.5-0.5b --remat full
    python scripts/bench_train_step.py --preset qwen2.5-1.5b --dtype bfloat16 --batch 8   # a GPU
"""
from __future__ import annotations

import argparse
import functools
import json
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

# Qwen2-shaped architectures (the same presets as bench_sampler.py).
PRESETS = {
    "cpu-small": dict(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=64),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=1, help="rows in the minibatch (one micro-batch)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="JAX remat policy; the peer uses gradient checkpointing unless 'none'")
    p.add_argument("--chunk", type=int, default=256, help="logprob_chunk_size")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up (median reported)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--peak-tflops", type=float, help="use this peak instead of the measured matmul rate")
    p.add_argument("--json", type=pathlib.Path, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def measured_peak_flops(dtype: str, n: int) -> float:
    """Best FLOP/s of an n x n x n jitted matmul in `dtype` on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops(cfg: QwenConfig, batch: int, prompt: int, response: int) -> float:
    e, v, t = cfg.hidden_size, cfg.vocab_size, prompt + response
    body = cfg.num_params - e * v * (1 if cfg.tie_word_embeddings else 2)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t
    return batch * (6 * body * t + 6 * e * v * response + attention * t)


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, t = args.batch, args.prompt_len + args.response_len
    return {"input_ids": rng.integers(0, vocab, (n, t)).astype(np.int32),
            "attention_mask": np.ones((n, t), np.int32),
            "response_mask": np.ones((n, args.response_len), np.int32),
            "rewards": rng.random(n).astype(np.float32), "group_ids": np.arange(n, dtype=np.int32)}


def time_steps(step, repeats: int) -> list[float]:
    step()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def bench_jax(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> list[float]:
    cfg = QwenConfig(**PRESETS[args.preset], tie_word_embeddings=True, dtype=args.dtype, remat=args.remat)
    settings = GRPOSettings(ppo_mini_batch_size=args.batch, ppo_micro_batch_size=args.batch, kl_coef=0.0,
                            logprob_chunk_size=args.chunk, compute_dtype=args.dtype)
    optimizer = make_optimizer(OptimizerSettings(learning_rate=1e-6))
    update = jax.jit(functools.partial(grpo_update, policy=qwen_policy(cfg), settings=settings, optimizer=optimizer),
                     donate_argnums=(0, 1))
    state = {"params": init_params(cfg, jax.random.key(0))}
    state["opt"] = optimizer.init(state["params"])
    dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    old = jnp.full(batch["response_mask"].shape, -10.0, jnp.float32)

    def step():
        state["params"], state["opt"], metrics = update(state["params"], state["opt"], dev_batch, old, None,
                                                        jax.random.key(0))
        jax.block_until_ready(metrics)

    return time_steps(step, args.repeats)


def bench_torch(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> list[float]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = Qwen2Config(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                         intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
                         head_dim=spec["head_dim"], tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf_cfg).to(device)  # float32 master weights
    if args.remat != "none":
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    ids = torch.as_tensor(batch["input_ids"], device=device, dtype=torch.long)
    attn = torch.as_tensor(batch["attention_mask"], device=device)
    adv = torch.as_tensor(batch["rewards"], device=device)[:, None]
    r = args.response_len
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=r + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -r:, None])[..., 0]
        loss = -(adv * torch.exp(logp - logp.detach())).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return time_steps(step, args.repeats)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = QwenConfig(**PRESETS[args.preset], tie_word_embeddings=True)
    device = jax.devices()[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(
        args.dtype, 4096 if device.platform != "cpu" else 2048)
    batch = make_batch(args, cfg.vocab_size)
    tokens = args.batch * (args.prompt_len + args.response_len)
    flops = model_flops(cfg, args.batch, args.prompt_len, args.response_len)
    print(f"device: {device.device_kind} ({device.platform}); peak {peak / 1e12:.3f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'measured matmul'}, {args.dtype})")
    print(f"model {args.preset}: {cfg.num_params / 1e6:.1f}M params; {args.batch} x ({args.prompt_len}+"
          f"{args.response_len}) = {tokens} tokens; {flops / 1e12:.2f} model TFLOPs per step; remat {args.remat}")
    result = {"preset": args.preset, "device": device.device_kind, "platform": device.platform,
              "dtype": args.dtype, "remat": args.remat, "tokens": tokens, "model_tflops_per_step": flops / 1e12,
              "peak_tflops": peak / 1e12, "peak_source": "given" if args.peak_tflops else "measured matmul"}
    runs = [("jax", bench_jax)] + ([] if args.no_torch else [("torch", bench_torch)])
    for name, fn in runs:
        times = fn(args, batch)
        sec = statistics.median(times)
        result[name] = {"step_s": sec, "all_s": times, "tokens_per_s": tokens / sec, "mfu": flops / sec / peak}
        print(f"{name:>5}: {sec:8.3f} s/step  {tokens / sec:10.1f} tokens/s  MFU {100 * flops / sec / peak:5.1f}%"
              f"  (steps: {', '.join(f'{t:.3f}' for t in times)})")
    if "torch" in result:
        result["jax_over_torch"] = result["torch"]["step_s"] / result["jax"]["step_s"]
        print(f"JAX / PyTorch throughput: {result['jax_over_torch']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

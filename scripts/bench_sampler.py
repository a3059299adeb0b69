"""Decode throughput of the in-framework sampler against `transformers` generate, in the same run.

Both sample from the same random-weight Qwen2-shaped model (built with transformers, converted to our
params through a safetensors checkpoint), the same batch of prompts, the same prompt and output
lengths (fixed length: no stop tokens, HF with min_new_tokens = max_new_tokens), greedy unless
--sample. Prints tokens/s of each and their ratio; on a GPU also the fraction of the HBM-bandwidth
roofline of one decode step: (parameter bytes + KV-cache bytes read per step) / step time / peak.
The sampler's decode step attends over the whole static cache (S = P + R slots), so all of it is read.

    python scripts/bench_sampler.py                                   # CPU, ~39M params, batch 16
    python scripts/bench_sampler.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 64 --peak-bw-gbs 3350
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ruscarl_jax.models import hf_io, qwen  # noqa: E402
from ruscarl_jax.sampler.generate import generate  # noqa: E402
from ruscarl_jax.sampler.settings import SamplingSettings  # noqa: E402

# Qwen2-shaped architectures (transformers Qwen2Config keyword arguments).
PRESETS = {
    "cpu-39m": dict(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen2.5-0.5B's depth (24 layers) and head_dim (64), narrowed to 27M parameters
    "cpu-27m-24l": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=24,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-39m", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    p.add_argument("--sample", action="store_true", help="temperature 0.7, top-p 0.8, top-k 20 instead of greedy")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (random params are made in JAX)")
    p.add_argument("--peak-bw-gbs", type=float, default=3350.0, help="peak HBM bandwidth for the roofline (H100 SXM: 3350)")
    p.add_argument("--json", type=pathlib.Path, help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=str, default=None,
                   help="pin the process to these CPU ids (e.g. '0' or '0,1') and give PyTorch as many threads; "
                        "steadier figures on a shared machine")
    return p.parse_args(argv)


def _seconds(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _hf_can_run_here() -> bool:
    """transformers runs where the sampler runs: on the CPU, or on a GPU that PyTorch also sees."""
    if jax.default_backend() == "cpu":
        return True
    import torch

    return jax.default_backend() == "gpu" and torch.cuda.is_available()


def build_models(args: argparse.Namespace):
    """(cfg, params, hf_model or None): the same random weights on both sides."""
    if args.no_hf or not _hf_can_run_here():
        if not args.no_hf:
            print("note: PyTorch has no CUDA device here, so transformers generate is skipped on this accelerator")
        k = PRESETS[args.preset]
        cfg = qwen.QwenConfig(vocab_size=k["vocab_size"], hidden_size=k["hidden_size"], intermediate_size=k["intermediate_size"],
                              num_layers=k["num_hidden_layers"], num_heads=k["num_attention_heads"],
                              num_kv_heads=k["num_key_value_heads"], head_dim=k["hidden_size"] // k["num_attention_heads"],
                              tie_word_embeddings=k["tie_word_embeddings"], dtype=args.dtype, param_dtype=args.dtype)
        params = jax.jit(qwen.init_params, static_argnums=0)(cfg, jax.random.key(args.seed))
        return cfg, params, None
    import torch
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.Qwen2Config(rope_theta=1_000_000.0, rms_norm_eps=1e-6, **PRESETS[args.preset])
    model = transformers.Qwen2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        cfg, params = hf_io.load_checkpoint(directory, dtype=args.dtype)
    model = model.to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    if jax.default_backend() == "gpu":
        model = model.cuda()
    return cfg, params, model


def ours_runners(args, cfg, params, prompts) -> dict:
    """Callables for a full-length run and a prefill-only run (R = 1), compiled and checked once."""
    common = dict(stop_token_ids=(), pad_token_id=0, prompt_bucket_min=args.prompt_len)
    sampling = dict(temperature=0.7, top_p=0.8, top_k=20) if args.sample else dict(greedy=True)
    full = SamplingSettings(max_new_tokens=args.new_tokens, **common, **sampling)
    first = SamplingSettings(max_new_tokens=1, **common, **sampling)
    key = jax.random.key(args.seed)
    out = generate(params, cfg, prompts, key, full)
    assert out.tokens.shape == (args.batch, args.new_tokens) and out.num_steps == args.new_tokens
    generate(params, cfg, prompts, key, first)
    return dict(full=lambda: generate(params, cfg, prompts, key, full), first=lambda: generate(params, cfg, prompts, key, first))


def hf_runner(args, model, prompts):
    """A callable that runs transformers generate on the same prompts (warmed up once)."""
    import torch
    import transformers

    device = next(model.parameters()).device
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=0, eos_token_id=None)
    kwargs.update(dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20) if args.sample else dict(do_sample=False))
    model.generation_config = transformers.GenerationConfig()

    def run():
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    assert run().shape == (args.batch, args.prompt_len + args.new_tokens)
    return run


def roofline(args, cfg, step_s: float) -> dict:
    width = 2 if args.dtype == "bfloat16" else 4
    param_bytes = cfg.num_params * width
    cache_bytes = 2 * cfg.num_layers * args.batch * (args.prompt_len + args.new_tokens) * cfg.num_kv_heads * cfg.head_dim * width
    achieved = (param_bytes + cache_bytes) / step_s / 1e9
    return dict(param_bytes=param_bytes, kv_cache_bytes=cache_bytes, achieved_gbs=achieved, peak_gbs=args.peak_bw_gbs,
                fraction_of_roofline=achieved / args.peak_bw_gbs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.cpus:
        import torch

        cpus = {int(c) for c in args.cpus.split(",")}
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    cfg, params, model = build_models(args)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
    result = dict(preset=args.preset, params=cfg.num_params, batch=args.batch, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, dtype=args.dtype, mode="sample" if args.sample else "greedy",
                  backend=jax.default_backend(), device=str(jax.devices()[0].device_kind), cpus=args.cpus,
                  load_average_before=os.getloadavg())
    compile_start = time.perf_counter()
    ours = ours_runners(args, cfg, params, prompts)
    result["compile_and_first_runs_s"] = time.perf_counter() - compile_start
    hf = hf_runner(args, model, prompts) if model is not None else None
    # interleaved, so that both see the same machine load; medians over the repeats. CPU seconds are
    # reported too: on a shared machine they move less than wall time (with one thread per side, --cpus 0).
    runs: dict[str, list[tuple[float, float]]] = {"full": [], "first": [], "hf": []}
    for _ in range(args.repeats):
        runs["full"].append(_seconds(ours["full"]))
        runs["first"].append(_seconds(ours["first"]))
        if hf is not None:
            runs["hf"].append(_seconds(hf))
    tokens = args.batch * args.new_tokens

    def summary(name: str) -> dict:
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        return dict(seconds=wall, cpu_seconds=cpu, tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu,
                    runs_wall_s=[w for w, _ in runs[name]], runs_cpu_s=[c for _, c in runs[name]])

    full, first = summary("full"), summary("first")
    result["ours"] = dict(full, prefill_s=first["seconds"],
                          decode_step_s=(full["seconds"] - first["seconds"]) / max(1, args.new_tokens - 1))
    o = result["ours"]
    print(f"{args.preset} ({cfg.num_params / 1e6:.1f}M params, {args.dtype}) batch {args.batch}, prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}, {result['mode']}, backend {result['backend']}, median of {args.repeats}")
    print(f"  ruscarl_jax sampler: {o['tokens_per_s']:9.1f} tokens/s wall, {o['tokens_per_cpu_s']:9.1f} per CPU-s  "
          f"({o['seconds']:.3f} s; prefill {o['prefill_s']:.3f} s, decode step {1e3 * o['decode_step_s']:.2f} ms)")
    if hf is not None:
        result["hf"] = h = summary("hf")
        result["ratio"] = o["tokens_per_s"] / h["tokens_per_s"]
        result["ratio_cpu_time"] = o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"]
        where = next(model.parameters()).device.type
        print(f"  transformers generate ({where}): {h['tokens_per_s']:9.1f} tokens/s wall, {h['tokens_per_cpu_s']:9.1f} per CPU-s  "
              f"({h['seconds']:.3f} s)")
        print(f"  ratio (ours / transformers): {result['ratio']:.2f}x wall, {result['ratio_cpu_time']:.2f}x CPU time")
    result["roofline"] = r = roofline(args, cfg, o["decode_step_s"])
    line = (f"  decode step reads {(r['param_bytes'] + r['kv_cache_bytes']) / 1e9:.3f} GB (parameters + whole static KV cache): "
            f"{r['achieved_gbs']:.1f} GB/s")
    if result["backend"] == "gpu":
        line += f" = {100 * r['fraction_of_roofline']:.1f}% of the {r['peak_gbs']:.0f} GB/s HBM roofline"
    else:
        del r["peak_gbs"], r["fraction_of_roofline"]  # the HBM peak means nothing here
    print(line)
    result["load_average_after"] = os.getloadavg()
    print(f"  load average before / after: {result['load_average_before'][0]:.2f} / {result['load_average_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

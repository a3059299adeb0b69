"""Throughput of the Qwen3-MoE sparse block (forward + backward) against two peers, same run.

Ours: ``models.moe.sparse_mlp`` (router, top-k, tokens sorted by expert, grouped matmuls with
``jax.lax.ragged_dot``, scatter back), jitted, gradient w.r.t. the input and every weight.
Peer 1: transformers' ``Qwen3MoeSparseMoeBlock`` (PyTorch, its per-hit-expert loop) with the same
weights, forward + backward of the same loss. Peer 2: a dense all-experts JAX reference (every token
through every expert, then the top-k weights mask the unused ones), i.e. X / K times the FLOPs.
The three outputs are checked to agree before timing. The loss is sum(out * cotangent) with a fixed
random cotangent. Median over --repeats rounds, the three alternating so machine load hits all alike.

    python scripts/bench_moe.py                         # CPU: 2048 tokens, hidden 512, 16 experts top-4
    python scripts/bench_moe.py --preset qwen3-30b-a3b --tokens 4096   # a GPU: the real layer shape
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ruscarl_jax.models import moe  # noqa: E402

PRESETS = {
    "cpu-small": dict(hidden=512, moe_intermediate=256, experts=16, top_k=4),
    "cpu-wide": dict(hidden=512, moe_intermediate=256, experts=64, top_k=8),
    "qwen3-30b-a3b": dict(hidden=2048, moe_intermediate=768, experts=128, top_k=8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the transformers peer (e.g. on a GPU host without it)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense all-experts reference (it needs X/K x memory)")
    return p.parse_args(argv)


def dense_all_experts(p: dict, y: jax.Array, cfg) -> jax.Array:
    """Every token through every expert ([N, X, F] intermediates), weighted by the top-k router weights."""
    probs, _, ids, w = moe.route(y, p["router"], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    dense_w = jnp.sum(jax.nn.one_hot(ids, probs.shape[-1], dtype=y.dtype) * w[..., None].astype(y.dtype), axis=-2)
    h = jax.nn.silu(jnp.einsum("bte,xef->btxf", y, p["gate_proj"])) * jnp.einsum("bte,xef->btxf", y, p["up_proj"])
    return jnp.einsum("btxf,xfe,btx->bte", h, p["down_proj"], dense_w)


def _time(fn, repeats_out: list[float]) -> None:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    repeats_out.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = PRESETS[args.preset]
    e, f, x, k = shape["hidden"], shape["moe_intermediate"], shape["experts"], shape["top_k"]
    cfg = types.SimpleNamespace(dtype="float32", num_experts_per_tok=k, norm_topk_prob=True)
    rng = np.random.default_rng(0)
    params = {"router": rng.normal(0, 0.5, (e, x)), "gate_proj": rng.normal(0, 0.02, (x, e, f)),
              "up_proj": rng.normal(0, 0.02, (x, e, f)), "down_proj": rng.normal(0, 0.02, (x, f, e))}
    params = {name: np.asarray(v, np.float32) for name, v in params.items()}
    y = rng.normal(size=(1, args.tokens, e)).astype(np.float32)
    cot = rng.normal(size=y.shape).astype(np.float32)

    def make(block):
        def loss(p, y):
            return jnp.sum(block(p, y) * cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    ours = make(lambda p, y: moe.sparse_mlp(p, y, cfg)[0])
    runners = {"ours": lambda: ours(params, y)}
    outputs = {"ours": np.asarray(jax.jit(lambda p, y: moe.sparse_mlp(p, y, cfg)[0])(params, y))}
    if not args.no_dense:
        dense = make(lambda p, y: dense_all_experts(p, y, cfg))
        runners["dense_all_experts"] = lambda: dense(params, y)
        outputs["dense_all_experts"] = np.asarray(jax.jit(lambda p, y: dense_all_experts(p, y, cfg))(params, y))
    if not args.no_torch:
        import torch
        import transformers

        hf_cfg = transformers.Qwen3MoeConfig(hidden_size=e, moe_intermediate_size=f, num_experts=x,
                                             num_experts_per_tok=k, norm_topk_prob=True)
        block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(hf_cfg)
        with torch.no_grad():
            block.gate.weight.copy_(torch.from_numpy(params["router"].T.copy()))
            gate_up = np.concatenate([params["gate_proj"], params["up_proj"]], axis=-1).transpose(0, 2, 1)
            block.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
            block.experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(params["down_proj"].transpose(0, 2, 1))))
        ty, tcot = torch.from_numpy(y), torch.from_numpy(cot)

        def torch_step():
            block.zero_grad(set_to_none=True)
            inp = ty.clone().requires_grad_(True)
            out = block(inp)
            (out * tcot).sum().backward()
            return jnp.zeros(())

        runners["transformers"] = torch_step
        with torch.no_grad():
            outputs["transformers"] = block(ty).numpy()
    for name, out in outputs.items():
        err = float(np.abs(out - outputs["ours"]).max())
        if err > 1e-4 * max(1.0, float(np.abs(outputs["ours"]).max())):
            raise SystemExit(f"{name} disagrees with ours: max |diff| = {err}")

    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():  # warm-up / compile
        jax.block_until_ready(run())
    for _ in range(args.repeats):
        for name, run in runners.items():
            _time(run, times[name])
    tps = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    result = {"preset": args.preset, "tokens": args.tokens, "backend": jax.default_backend(),
              "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
              "ratios": {f"ours/{n}": round(tps["ours"] / v, 2) for n, v in tps.items() if n != "ours"}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

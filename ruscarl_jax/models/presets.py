"""Architectures of the public Qwen checkpoints, as their Hugging Face ``config.json`` would give them.

They let the memory planner (``plan/memory_plan.py``) build the real model shapes of a paper config
without the weights on disk. Values are the published config.json fields of each model on the hub.
"""
from __future__ import annotations

from typing import Any

_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}

PRESETS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B-Instruct": {**_QWEN25, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                              "tie_word_embeddings": True},
    "Qwen2.5-1.5B-Instruct": {**_QWEN25, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                              "tie_word_embeddings": True},
    "Qwen2.5-7B-Instruct": {**_QWEN25, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                            "tie_word_embeddings": False},
    "Qwen3-30B-A3B-Instruct-2507": {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                                    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 10_000_000.0,
                                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                                    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
}


def preset(name: str) -> dict[str, Any]:
    """The config.json dict of a known checkpoint; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown architecture preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])

"""Tiny random Qwen2 / Qwen3 models built with transformers + PyTorch in the tests (no downloads)."""
from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

SHAPES = {
    # name: (family, kwargs)
    "qwen2_gqa2_untied": ("qwen2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_mha_tied": ("qwen2", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2_gqa4_tied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_odd_head_dim": ("qwen3", dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)),
    "qwen3_tied_gqa4": ("qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}


_MOE_COMMON = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8)
MOE_SHAPES = {
    # Qwen3-MoE: (family, kwargs), as SHAPES
    "moe_top2of6_norm_untied": ("qwen3_moe", dict(_MOE_COMMON, num_hidden_layers=2, num_experts=6, num_experts_per_tok=2,
                                                  norm_topk_prob=True, tie_word_embeddings=False)),
    "moe_top3of8_tied": ("qwen3_moe", dict(_MOE_COMMON, num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
                                           norm_topk_prob=False, tie_word_embeddings=True)),
    "moe_dense_layer_untied": ("qwen3_moe", dict(_MOE_COMMON, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                                 norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
}
_CLASSES = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}


def make_hf_model(name: str, vocab_size: int = 101, seed: int = 0) -> transformers.PreTrainedModel:
    family, kwargs = {**SHAPES, **MOE_SHAPES}[name]
    torch.manual_seed(seed)
    config_cls, model_cls = _CLASSES[family]
    config = config_cls(vocab_size=vocab_size, rope_theta=10000.0, rms_norm_eps=1e-6, **kwargs)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so parity covers them
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            elif pname.endswith("mlp.gate.weight"):  # a sharp router, so top-k choices are far from ties
                param.normal_(0.0, 0.5)
    return model


def save_hf_model(model: transformers.PreTrainedModel, directory: pathlib.Path, **kwargs) -> pathlib.Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, T] and mask [B, T] for rows of the given lengths, left padded with id 0."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.integers(1, vocab_size, n)
        mask[row, width - n:] = 1
    return tokens, mask


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    position_ids = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()

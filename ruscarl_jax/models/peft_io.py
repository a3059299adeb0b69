"""A LoRA state's adapters as a PEFT-format adapter directory (adapter_config.json +
adapter_model.safetensors), which ``peft.PeftModel.from_pretrained(base_model, directory)`` and vLLM's
LoRA loader read on top of the Hugging Face base checkpoint.

Our adapter of a projection is a: [L, *in, r], b: [L, r, *out] with delta kernel = scale * a @ b; PEFT's is
lora_A.weight [r, in], lora_B.weight [out, r] with delta W = (lora_alpha / r) * B @ A on torch's
[out, in] weight, so per layer A = a.reshape(in, r).T and B = b.reshape(r, out).T (the head axes of q,
k, v and o flatten in the order models/hf_io.py uses for the kernels). A quantized base is not part
of the adapter: load it onto the float base checkpoint the run started from (the int8 rounding of the
base is then not reproduced; scripts/export.py's merged directory reproduces it exactly).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from ruscarl_jax.models import lora, qwen

_HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_tensors(state: lora.Params, cfg: qwen.QwenConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """PEFT's tensor name -> array for every adapted projection of every layer."""
    first = {name: start for name, start, _, _ in cfg.layer_segments}
    out: dict[str, np.ndarray] = {}
    for stack, modules in state["lora"].items():
        for module, ab in modules.items():
            a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
            rank = a.shape[-1]
            for i in range(a.shape[0]):
                prefix = f"base_model.model.model.layers.{first[stack] + i}.{_HF_MODULE[module]}"
                out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T).astype(dtype)
                out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T).astype(dtype)
    return out


def save_adapter(directory: str | os.PathLike, state: lora.Params, cfg: qwen.QwenConfig, settings: lora.LoraSettings,
                 base_model: str = "", dtype: str = "float32") -> pathlib.Path:
    """Write `state`'s adapters as a PEFT LoRA adapter under `directory` (created); returns it."""
    from safetensors.numpy import save_file

    if not lora.is_adapted(state):
        raise ValueError("save_adapter: the params are not a LoRA state (config.model.lora.rank is 0)")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(state, cfg, dtype)
    modules = sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in tensors})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "target_modules": modules,
        "base_model_name_or_path": base_model or None, "modules_to_save": None,
    }
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory

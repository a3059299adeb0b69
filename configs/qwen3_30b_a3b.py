"""Qwen3-30B-A3B (mixture of experts), the paper's 61.1 HealthBench variant.

Not supported yet: the policy implements dense Qwen2 / 2.5 / 3 only. Running this config stops with
a message saying so (config.model.checkpoint_dir names a Qwen3MoeForCausalLM checkpoint).
"""
import os

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.workdir = "runs/qwen3_30b_a3b"
    c.model.checkpoint_dir = os.environ.get("QWEN3_30B_A3B_DIR", "")
    c.model.architecture = "Qwen3MoeForCausalLM"  # checked before anything loads
    c.mesh.update(dict(data=1, fsdp=-1, tensor=4))
    return c

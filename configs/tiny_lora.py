"""The tiny task with LoRA: rank-8 adapters on every projection of the warm-started tiny model, the base
frozen, the KL reference the base with the adapters off (no reference copy), checkpoints of the adapters
only. Trains on a laptop CPU in the time of configs/tiny.py; the held-out score rises (run_summary).

    python scripts/train.py --config=configs/tiny_lora.py [--config.model.lora.quantize=int8]
"""
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.workdir = "runs/tiny_lora"
    c.model.lora.update(dict(rank=8, alpha=16.0))
    c.optim.update(dict(learning_rate=2e-3))  # the adapters move W by about scale * sqrt(rank) * |a| * lr a step: ~1.4x full FT
    return c

"""Qwen2.5-0.5B-Instruct on HealthBench: the paper's recipe scaled to one GPU or a small TPU slice.

Built on configs/qwen7b.py (so on the faithful base: no warm start, the full scaffold wording) and
differs from the reference run in everything configs/qwen7b.py lists, plus: the model (0.5B, not 7B),
16 prompts a step (not 64), prompts up to 2048 tokens and responses up to 1024 (not 4096 + 4096),
minibatches of 64 rows = 8 prompts (not 32 prompts), 200 steps (not 350), selective remat ("dots").

    QWEN0_5B_DIR=/models/Qwen2.5-0.5B-Instruct JUDGE_BASE_URL=http://localhost:8000/v1 JUDGE_MODEL=... \
        python scripts/train.py --config=configs/qwen0_5b.py
"""
import os

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.workdir = "runs/qwen0_5b"
    c.model.checkpoint_dir = os.environ.get("QWEN0_5B_DIR", "")
    c.model.preset = "Qwen2.5-0.5B-Instruct"  # the architecture, for scripts/plan.py without the weights
    c.model.remat = "dots"
    c.data.update(dict(batch_size=16, max_prompt_length=2048))
    c.rollout.update(dict(max_new_tokens=1024))
    c.grpo.update(dict(ppo_mini_batch_size=64, ppo_micro_batch_size=16))
    c.trainer.update(dict(total_steps=200, checkpoint_every=20))
    return c

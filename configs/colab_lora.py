"""Qwen2.5-1.5B-Instruct with LoRA (rank 16 on every projection) on HealthBench, sized for one 16 GB
accelerator: a Colab TPU v5e-1 or a 16 GB GPU (T4, V100-16GB). The base is frozen in bfloat16 (no float32
master copy, no optimizer state for it) and is the KL reference with the adapters off (no reference copy);
only the adapters are trained and checkpointed. The paper's HealthBench recipe scaled down: 8 prompts x 8
samples a step, 1024 prompt + 512 response tokens. `--config.model.lora.quantize=int8` stores the base
kernels int8 (QLoRA). Planned with `python scripts/plan.py --config=configs/colab_lora.py --slice=v5e-1`.

    COLAB_MODEL_DIR=/content/Qwen2.5-1.5B-Instruct JUDGE_BASE_URL=... JUDGE_MODEL=... \
        HEALTHBENCH_TRAIN_PATH=... python scripts/train.py --config=configs/colab_lora.py
"""
import os

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.workdir = "runs/colab_lora"
    c.model.checkpoint_dir = os.environ.get("COLAB_MODEL_DIR", "")
    c.model.preset = "Qwen2.5-1.5B-Instruct"  # the architecture, for scripts/plan.py without the weights
    c.model.update(dict(dtype="bfloat16", param_dtype="bfloat16", remat="full"))  # the frozen base in bfloat16
    c.model.lora.update(dict(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"), quantize="none"))
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.data.update(dict(batch_size=8, max_prompt_length=1024))
    c.rollout.update(dict(max_new_tokens=512, prompt_bucket_min=256))
    c.rollout.engine.update(dict(slots=16, page_size=16, memory_gb=2.0, max_seq_len=1536, check_every=32,
                                 cache_dtype="bfloat16"))
    c.judge.update(dict(max_concurrency=64))
    c.grpo.update(dict(ppo_mini_batch_size=32, ppo_micro_batch_size=4, logprob_micro_batch_size=4,
                       logprob_chunk_size=128, compute_dtype="bfloat16"))
    c.optim.update(dict(learning_rate=1e-5, weight_decay=0.0))  # LoRA's usual rate: the adapters start at zero
    c.trainer.update(dict(total_steps=100, checkpoint_every=10, test_freq=10))
    c.data.val_examples = 50
    return c

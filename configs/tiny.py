"""The embedded default: a tiny Qwen-shaped model and tokenizer built by the project, the synthetic
rule-verified rubric task in data/tiny/ (ruscarl_jax/data/synthetic.py), no judge server. The model is
first warm-started by SFT on data/tiny/warm_start.jsonl (built once, about 1 min on 2 cores, then cached in
warm_start.cache_dir); `--config.warm_start.path=` starts RL from the random model instead (tests do).
Runs on a laptop CPU in a few minutes.

Built on configs/base.py (the library defaults); this file holds only what the toy task changes.

    python scripts/train.py --config=configs/tiny.py [--config.trainer.total_steps=10] [--workdir=DIR]
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workdir = "runs/tiny"

    c.model.source = "tiny"
    c.model.tiny = ml_collections.ConfigDict(dict(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        rope_theta=10000.0, tie_word_embeddings=True, vocab_size=1024,
        # Qwen3-MoE (configs/tiny_moe.py): num_experts=0 is a dense model
        num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=()))

    c.data.update(dict(train_path="data/tiny/train.jsonl", val_path="data/tiny/val.jsonl", batch_size=8,
                       max_prompt_length=128, val_examples=32))
    c.scaffold.update(dict(rule="step_sigmoid", add_base_when_zero=False, include_evaluation_warning=False))
    # terse, one criterion per line: short prompts; data/tiny/warm_start.jsonl is written with it
    c.scaffold.wording.update(dict(base_message="", opening="", include_header="Include:", include_item="{criterion}",
                                   avoid_header="Avoid:", avoid_item="{criterion}", closing=""))
    c.warm_start.update(dict(path="data/tiny/warm_start.jsonl", steps=600))

    c.rollout.update(dict(max_new_tokens=10, prompt_bucket_min=16))
    c.rollout.engine.check_every = 16
    c.grpo.update(dict(ppo_mini_batch_size=32, ppo_micro_batch_size=32, logprob_chunk_size=16))
    c.optim.update(dict(learning_rate=1e-3, weight_decay=0.0))
    return c

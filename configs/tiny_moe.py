"""The tiny config with a Qwen3-MoE policy (4 experts, top-2, one dense layer) on an expert x data mesh,
rows split over data x fsdp x expert, and routing replay: the code path of configs/qwen3_30b_a3b.py at
laptop size.

    python scripts/train.py --config=configs/tiny_moe.py
"""
from configs import tiny
from ruscarl_jax.models.sharding import rows_over_expert


def get_config():
    c = tiny.get_config()
    c.workdir = "runs/tiny_moe"
    c.model.tiny.update(dict(num_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             norm_topk_prob=True, mlp_only_layers=(1,), qk_norm=True, qkv_bias=False))  # Qwen3-MoE attention
    c.mesh.update(dict(data=-1, fsdp=1, expert=2, tensor=1))
    c.sharding_rules = rows_over_expert(c.sharding_rules)  # as configs/qwen3_30b_a3b.py
    c.grpo.update(dict(routing_replay=True, router_aux_loss_coef=0.0))
    return c

"""The paper configs against the reference run, key by key.

Every key of the resolved configs/qwen7b.py and configs/qwen3_30b_a3b.py is compared with the tables
below, written here from the paper (arXiv 2508.16949) and the reference implementation's settings
(DESIGN.md section 2), NOT read from the configs. A key added to the configs (e.g. a new settings
dataclass field, which appears in every config at its default) fails this test until the table says
what the reference run uses for it.
"""
import dataclasses
from typing import Any

import ml_collections
import pytest

from configs import base, qwen3_30b_a3b, qwen7b, tiny
from ruscarl_jax.data.types import RubricItem
from ruscarl_jax.scaffold.message import scaffold_text
from ruscarl_jax.trainer import config as config_lib
from ruscarl_jax.trainer.defaults import section

ENV = ("QWEN7B_DIR", "QWEN3_30B_A3B_DIR", "HEALTHBENCH_TRAIN_PATH", "HEALTHBENCH_VAL_PATH", "JUDGE_BASE_URL", "JUDGE_MODEL")

# The reference run (Qwen2.5-7B-Instruct, HealthBench): the paper's settings and, where the paper is
# silent, the reference implementation's (verl's) defaults.
REFERENCE: dict[str, Any] = {
    # rollout: n = 8, temperature 0.7, top-p 0.8, top-k 20, 4096 response tokens; validation samples alike
    "rollout.num_generations": 8, "rollout.temperature": 0.7, "rollout.top_p": 0.8, "rollout.top_k": 20,
    "rollout.greedy": False, "rollout.max_new_tokens": 4096,
    "rollout.validation.temperature": 0.7, "rollout.validation.top_p": 0.8, "rollout.validation.top_k": 20,
    "rollout.validation.greedy": False,
    # data: 64 prompts a step, prompts up to 4096 tokens (longer ones filtered out), reshuffled every epoch
    "data.batch_size": 64, "data.max_prompt_length": 4096, "data.length_policy": "drop", "data.shuffle": True,
    "data.num_epochs": None,
    "data.val_path": "../shared/healthbench/healthbench_val400.jsonl", "data.val_examples": 0,  # all 400
    # scaffolding: step_sigmoid, start 0.20, steepness 125, no base message; the reference's other defaults
    "scaffold.rule": "step_sigmoid", "scaffold.start_point": 0.2, "scaffold.steepness": 125.0,
    "scaffold.add_base_when_zero": False, "scaffold.group_decay": "linear", "scaffold.full_reveal_count": 1,
    "scaffold.power": 1.0, "scaffold.include_evaluation_warning": True, "scaffold.participate_training": False,
    # the scaffold message's parts (our sentences; "Criterion i: ... (worth P points)", "(penalty: P points)")
    "scaffold.wording.base_message": "You are a helpful medical assistant.",
    "scaffold.wording.opening": "{base_message} Before you answer, take the following evaluation criteria into account.",
    "scaffold.wording.include_header": "Points to include (try to cover each of them):",
    "scaffold.wording.include_item": "Criterion {number}: {criterion} (worth {points} points)",
    "scaffold.wording.avoid_header": "Points to avoid (do not do any of these):",
    "scaffold.wording.avoid_item": "Criterion {number}: {criterion} (penalty: {penalty} points)",
    "scaffold.wording.closing": "Give a thorough, helpful answer to the user's request that follows the guidance above.",
    "scaffold.wording.evaluation_warning": (
        "Do not mention, quote or allude to these criteria or to any grading in your answer, and do not say that "
        "you were given them; write the answer as if you had arrived at it on your own."),
    # no warm start: RL starts from the instruct checkpoint (also the KL reference)
    "warm_start.path": "",
    # GRPO (verl): minibatch 32 prompts = 256 rows, 1 epoch, KL 0.001 low_var_kl, entropy 0, clip 0.2 / 0.2,
    # dual clip 3, token-mean, std-normalised advantages, no correction for the scaffold gap, no filters
    "grpo.ppo_mini_batch_size": 256, "grpo.ppo_epochs": 1, "grpo.shuffle": True,
    "grpo.use_kl_loss": True, "grpo.kl_coef": 0.001, "grpo.kl_estimator": "low_var_kl", "grpo.entropy_coeff": 0.0,
    "grpo.clip_ratio_low": 0.2, "grpo.clip_ratio_high": 0.2, "grpo.clip_ratio_c": 3.0,
    "grpo.loss_agg_mode": "token-mean", "grpo.norm_adv_by_std": True, "grpo.adv_epsilon": 1e-6,
    "grpo.rollout_is": "none", "grpo.rollout_rs": "none",
    "grpo.filter_zero_std_groups": False, "grpo.mask_truncated": False,
    # optimizer (verl's actor): AdamW lr 1e-6 constant, betas 0.9 / 0.999, eps 1e-8, weight decay 0.01, clip 1.0
    "optim.learning_rate": 1e-6, "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.b1": 0.9,
    "optim.b2": 0.999, "optim.eps": 1e-8, "optim.weight_decay": 0.01, "optim.max_grad_norm": 1.0,
    "optim.min_lr_ratio": 0.0, "optim.total_steps": None,
    # 350 steps, validation every 5
    "trainer.total_steps": 350, "trainer.test_freq": 5,
    # the judge samples as the reference's: temperature 0.7, top-p 0.8, top-k 20, presence penalty 1.5,
    # 2048 tokens, thinking off; one request per criterion, points shown, free-text replies
    "judge.temperature": 0.7, "judge.top_p": 0.8, "judge.top_k": 20, "judge.presence_penalty": 1.5,
    "judge.max_tokens": 2048, "judge.extra_body.chat_template_kwargs.enable_thinking": False,
    "judge.batch_criteria": False, "judge.show_points": True, "judge.response_format": "none",
    # the model: Qwen2.5-7B-Instruct from a Hugging Face checkpoint
    "model.source": "hf", "model.preset": "Qwen2.5-7B-Instruct", "model.trust_remote_code": False,
}

# Keys the reference run has no counterpart for (this project's infrastructure), at the values the paper
# config uses. They do not change the update's maths.
INFRASTRUCTURE: dict[str, Any] = {
    "seed": 0, "workdir": "runs/qwen7b",
    "model.checkpoint_dir": "", "model.dtype": "bfloat16", "model.param_dtype": "float32", "model.remat": "full",
    # full fine-tuning as the paper (no adapters)
    "model.lora.rank": 0, "model.lora.alpha": 32.0, "model.lora.targets": ("q", "k", "v", "o", "gate", "up", "down"),
    "model.lora.quantize": "none", "model.lora.seed": 0,
    "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
    "sharding_rules": (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None), ("embed", "fsdp"),
                       ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"),
                       ("vocab", "tensor"), ("layers", None), ("norm", None), ("cache_length", None),
                       ("expert", "expert"), ("expert_mlp", "tensor"), ("router_experts", None)),
    "data.train_path": "", "data.format": "auto", "data.on_bad_row": "fail",
    "rollout.prompt_bucket_min": 512, "rollout.prompt_bucket_steps": 1, "rollout.batch_bucket": 1,
    "rollout.engine.schedule": "continuous", "rollout.engine.slots": 512,  # the whole step at once: 16 per v5p chip (issue 21)
    "rollout.engine.page_size": 16,
    "rollout.engine.num_pages": 0, "rollout.engine.memory_gb": 8.0, "rollout.engine.max_seq_len": 8192,
    "rollout.engine.check_every": 32, "rollout.engine.cache_dtype": "bfloat16", "rollout.engine.attention": "auto",
    "warm_start.steps": 300, "warm_start.batch_size": 64, "warm_start.micro_batch_size": 64,
    "warm_start.learning_rate": 3e-3, "warm_start.seed": 0, "warm_start.cache_dir": "~/.cache/ruscarl_jax/warm_start",
    "grpo.ppo_micro_batch_size": 32, "grpo.logprob_micro_batch_size": None, "grpo.logprob_chunk_size": 512,
    "grpo.compute_dtype": "bfloat16", "grpo.ref_in_host_memory": False,
    "grpo.rollout_is_threshold": 2.0, "grpo.rollout_rs_threshold": 2.0, "grpo.rollout_rs_threshold_lower": None,
    "grpo.rollout_correction_scope": "scaffolded", "grpo.gap_thresholds": (0.1, 1.0),
    "grpo.router_aux_loss_coef": 0.0, "grpo.routing_replay": False,
    "grpo.routing_mismatch_metric": False,
    # ours: packed 8192-token micro-batches (the reference's verl run pads rows; use_remove_padding is the same idea)
    "grpo.micro_token_budget": 8192, "grpo.logprob_token_budget": None,  # no MoE routing metric in the reference (verl); off: no extra forward
    "judge.base_urls": (), "judge.model": "", "judge.api_key_env": "RUSCARL_JUDGE_API_KEY",
    "judge.max_concurrency": 512, "judge.max_concurrency_per_endpoint": 256, "judge.timeout_s": 180.0,
    "judge.max_retries": 6, "judge.backoff_base_s": 0.5, "judge.backoff_max_s": 30.0, "judge.cache_path": None,
    "judge.ungraded_policy": "drop_group", "judge.endpoint_failures_to_down": 3, "judge.endpoint_cooldown_s": 5.0,
    "judge.template_path": None, "judge.regrade_fraction": 0.0, "judge.max_parse_failure_rate": None,
    "judge.met_rate_tag_prefixes": ("axis:",),
    "trainer.checkpoint_every": 25, "trainer.keep_checkpoints": 3, "trainer.overlap_judge": False,
    "trainer.save_rollouts": True, "trainer.tensorboard": True, "trainer.plan_only": False,
    "trainer.preemption_grace_s": 25.0,  # ours (the reference has no preemption handling): a TPU VM's notice, less a margin
    "trainer.wandb.enabled": False, "trainer.wandb.project": "ruscarl_jax", "trainer.wandb.entity": "",
    "trainer.wandb.name": "", "trainer.wandb.mode": "",
    "trainer.compilation_cache_dir": "~/.cache/ruscarl_jax/xla",
    "distributed.coordinator_address": "", "distributed.num_processes": 0, "distributed.process_id": -1,
    "distributed.cpu_collectives": "",
}

QWEN7B = {**REFERENCE, **INFRASTRUCTURE}
# Qwen3-30B-A3B (the paper's MoE variant): the same RL settings; experts over an 8-way expert axis with
# rows split over it too, one row per chip on a 64-chip slice; no load-balancing loss, no routing replay
QWEN3_30B_A3B = {
    **QWEN7B, "workdir": "runs/qwen3_30b_a3b", "model.preset": "Qwen3-30B-A3B-Instruct-2507",
    "mesh.data": 1, "mesh.fsdp": -1, "mesh.expert": 8, "mesh.tensor": 1,
    "sharding_rules": (("batch", ("data", "fsdp", "expert")),) + INFRASTRUCTURE["sharding_rules"][1:],
    "grpo.ppo_micro_batch_size": 64, "grpo.micro_token_budget": None, "grpo.router_aux_loss_coef": 0.0, "grpo.routing_replay": False,
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf}; lists as tuples (a config's tuples and lists mean the same)."""
    if isinstance(tree, ml_collections.ConfigDict):
        tree = tree.to_dict()
    if isinstance(tree, dict) and (tree or not prefix):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    def freeze(x):
        return tuple(freeze(v) for v in x) if isinstance(x, (list, tuple)) else x
    return {prefix[:-1]: freeze(tree)}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("module, table", [(qwen7b, QWEN7B), (qwen3_30b_a3b, QWEN3_30B_A3B)], ids=["qwen7b", "qwen3_30b_a3b"])
def test_every_key_is_the_reference_runs(module, table):
    resolved = flatten(module.get_config())
    assert sorted(set(resolved) - set(table)) == [], "keys the reference table does not cover"
    assert sorted(set(table) - set(resolved)) == [], "reference keys the config lacks"
    wrong = {k: (resolved[k], table[k]) for k in table if resolved[k] != table[k] or type(resolved[k]) is not type(table[k])}
    assert wrong == {}, "(config, reference)"


@pytest.mark.parametrize("module, devices", [(qwen7b, 32), (qwen3_30b_a3b, 64)])
def test_paper_configs_validate(module, devices):
    settings = config_lib.validate(module.get_config(), num_devices=devices, check_paths=False)
    assert settings.grpo.temperature == 0.7 and settings.sampling.top_k == 20 and not settings.val_sampling.greedy


def test_paper_scaffold_has_the_references_parts():
    settings = config_lib.validate(qwen7b.get_config(), num_devices=32, check_paths=False).scaffold
    items = [RubricItem("Advises urgent care for chest pain", 7.0), RubricItem("States a dose without the weight", -4.0),
             RubricItem("Asks about allergies", 2.5)]
    text = scaffold_text(items, settings.wording, settings.include_evaluation_warning)
    parts = text.split("\n\n")
    assert parts[0].startswith("You are a helpful medical assistant.") and "criteria" in parts[0]
    assert parts[1].splitlines() == ["Points to include (try to cover each of them):",
                                     "Criterion 1: Advises urgent care for chest pain (worth 7 points)",
                                     "Criterion 2: Asks about allergies (worth 2.5 points)"]
    assert parts[2].splitlines() == ["Points to avoid (do not do any of these):",
                                     "Criterion 1: States a dose without the weight (penalty: 4 points)"]
    assert "answer" in parts[3] and parts[4].startswith("Do not mention") and len(parts) == 5


def test_tiny_keeps_the_toy_task_on_the_library_defaults():
    c, b = tiny.get_config(), base.get_config()
    assert c.warm_start.path == "data/tiny/warm_start.jsonl" and b.warm_start.path == ""
    assert c.scaffold.wording.include_header == "Include:" and b.scaffold.wording.include_header.startswith("Points to include")
    assert set(flatten(b)) <= set(flatten(c)), "tiny drops a key of the base config"


def test_a_new_dataclass_field_is_a_config_key_without_a_second_declaration():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        size: int = 3

    @dataclasses.dataclass(frozen=True)
    class Settings:
        rate: float = 0.5
        limit: int | None = None
        extra: dict | None = None
        names: tuple[str, ...] = ("a",)
        inner: Inner = Inner()
        derived: int = 0

    s = section(Settings, exclude=("derived",))
    assert flatten(s) == {"rate": 0.5, "limit": None, "extra": None, "names": ("a",), "inner.size": 3}
    s.limit = 7  # an optional field is a typed placeholder: settable, and checked
    with pytest.raises(TypeError):
        s.rate = "fast"
    assert Settings(**{**s.to_dict(), "inner": Inner(**s.inner)}).limit == 7
    with pytest.raises(TypeError, match="no default"):
        section(dataclasses.make_dataclass("NoDefault", [("n", int)]))

"""The embedded default: a tiny Qwen-shaped model and tokenizer built by the project, the synthetic
rule-verified rubric task in data/tiny/ (ruscarl_jax/data/synthetic.py), no judge server. The model is
first warm-started by SFT on data/tiny/warm_start.jsonl (built once, about 1 min on 2 cores, then cached in
warm_start.cache_dir); `--config.warm_start.path=` starts RL from the random model instead (tests do).
Runs on a laptop CPU in a few minutes.

    python scripts/train.py --config=configs/tiny.py [--config.trainer.total_steps=10] [--workdir=DIR]
"""
import ml_collections
from ml_collections.config_dict import placeholder

from ruscarl_jax.models.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/tiny"

    c.model = ml_collections.ConfigDict(dict(
        source="tiny",  # tiny: random init + a tokenizer trained on the task | hf: a checkpoint directory
        checkpoint_dir="", trust_remote_code=False,
        preset="",  # with source=hf and no checkpoint at hand: a models/presets.py name (the memory planner uses it)
        dtype="float32", param_dtype="float32", remat="none",
        tiny=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  rope_theta=10000.0, tie_word_embeddings=True, vocab_size=1024,
                  # Qwen3-MoE (configs/tiny_moe.py): num_experts=0 is a dense model
                  num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, norm_topk_prob=False,
                  decoder_sparse_step=1, mlp_only_layers=()),
        # LoRA / QLoRA (ruscarl_jax/models/lora.py; configs/tiny_lora.py): rank 0 = full fine-tuning
        lora=dict(rank=0, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"), quantize="none", seed=0),
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = tuple(DEFAULT_RULES)

    c.data = ml_collections.ConfigDict(dict(
        train_path="data/tiny/train.jsonl", val_path="data/tiny/val.jsonl", format="auto", on_bad_row="fail",
        batch_size=8, shuffle=True, num_epochs=None, max_prompt_length=128, length_policy="drop",
        val_examples=32,
    ))
    c.scaffold = ml_collections.ConfigDict(dict(
        rule="step_sigmoid", group_decay="linear", full_reveal_count=1, power=1.0, start_point=0.3, steepness=10.0,
        add_base_when_zero=False, include_evaluation_warning=False, participate_training=False,
        # terse, one criterion per line: short prompts; data/tiny/warm_start.jsonl is written with it
        wording=dict(base_message="", opening="", include_header="Include:", include_item="{criterion}",
                     avoid_header="Avoid:", avoid_item="{criterion}", closing=""),
    ))
    c.warm_start = ml_collections.ConfigDict(dict(
        path="data/tiny/warm_start.jsonl", steps=600, batch_size=64, micro_batch_size=64, learning_rate=3e-3, seed=0,
        cache_dir="~/.cache/ruscarl_jax/warm_start",
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        num_generations=8, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, greedy=False,
        prompt_bucket_min=16,
        validation=dict(temperature=1.0, top_p=1.0, top_k=0, greedy=True),
        # the rollout engine (sampler/engine.py; README "Rollout engine memory"): 0 = derived
        engine=dict(schedule="continuous", slots=0, page_size=16, num_pages=0, memory_gb=0.0, max_seq_len=0,
                    check_every=16, cache_dtype="", attention="auto"),
    ))
    c.judge = ml_collections.ConfigDict(dict(
        base_urls=(), model="", api_key_env="RUSCARL_JUDGE_API_KEY", ungraded_policy="drop_group",
        batch_criteria=False,  # True: one request grades all criteria of a response (per-criterion fallback)
        template_path="", show_points=True,  # a grader template file with <<placeholders>>; "" = built-in
        regrade_fraction=0.0,  # fraction of LLM verdicts asked twice; judge/regrade_agreement per step
        max_parse_failure_rate=placeholder(float),  # e.g. 0.2: a step with more unparseable replies stops the run
        met_rate_tag_prefixes=("axis:",),  # rubric tags with a judge/met_rate/<tag> metric per step
    ))
    c.grpo = ml_collections.ConfigDict(dict(
        clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean",
        use_kl_loss=True, kl_coef=0.001, kl_estimator="low_var_kl", entropy_coeff=0.0,
        norm_adv_by_std=True, ppo_mini_batch_size=32, ppo_micro_batch_size=32, ppo_epochs=1,
        logprob_micro_batch_size=placeholder(int),  # None: the ppo_micro_batch_size
        logprob_chunk_size=16, compute_dtype="float32",
        # scaffold gap corrections (off = the reference): rollout_is 'none'|'token' (truncated IS at
        # rollout_is_threshold); rollout_rs 'none'|'sequence'|'geometric' (reject rows whose ratio leaves
        # [rollout_rs_threshold_lower or 1/upper, rollout_rs_threshold]); scope 'scaffolded'|'all'
        rollout_is="none", rollout_is_threshold=2.0, rollout_rs="none", rollout_rs_threshold=2.0,
        rollout_rs_threshold_lower=placeholder(float), rollout_correction_scope="scaffolded",
        gap_thresholds=(0.1, 1.0),  # |log-ratio| thresholds of the scaffold_gap/*/frac_abs_gt_* metrics
        filter_zero_std_groups=False, mask_truncated=False,
        router_aux_loss_coef=0.0, routing_replay=False,  # MoE only (see rl/settings.py)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, schedule="constant", warmup_steps=0,
    ))
    c.trainer = ml_collections.ConfigDict(dict(
        total_steps=100, checkpoint_every=50, keep_checkpoints=2, test_freq=10, overlap_judge=False,
        save_rollouts=True, tensorboard=True,
        plan_only=False,  # True: print the memory plan of a step on this job's devices (scripts/plan.py) and exit
        # Weights & Biases beside TensorBoard and metrics.jsonl (pip install 'ruscarl_jax[wandb]'); mode ''
        # follows WANDB_MODE, 'offline' writes workdir/wandb only (upload later with `wandb sync`)
        wandb=dict(enabled=False, project="ruscarl_jax", entity="", name="", mode=""),
        compilation_cache_dir="~/.cache/ruscarl_jax/xla",  # "" = JAX's default (JAX_COMPILATION_CACHE_DIR)
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, cpu_collectives="",
    ))
    return c

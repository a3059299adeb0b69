"""Qwen2.5-7B-Instruct on HealthBench with the paper's settings (arXiv 2508.16949), built on the library
defaults (configs/base.py), never on the toy task: no warm start, the full scaffold wording.

The paper's run: n = 8, lr 1e-6 constant, 64 prompts a step, minibatch 32 prompts, 1 PPO epoch, KL 0.001
low_var_kl, entropy 0, temperature 0.7, top-p 0.8, top-k 20, 4096 prompt + 4096 response tokens, 350
steps, step_sigmoid scaffolding with start 0.20, steepness 125 and no base message when nothing is shown.
Validation on the 400 shared HealthBench examples every 5 steps. The judge samples as the reference's
does: temperature 0.7, top-p 0.8, top-k 20, presence penalty 1.5, 2048 tokens, thinking off (Qwen3 judges).
tests/test_paper_configs.py checks every key of the resolved config against the reference's settings.

Where this config still differs from the reference run:
- grader prompt: the built-in template has HealthBench's structure (conversation, then one rubric item,
  JSON {"explanation", "criteria_met"}) in this project's words; set judge.template_path to a file with
  HealthBench's own grader text (its <<conversation>> / <<rubric_item>> placeholders work as they are)
  for the reference's exact prompt;
- scaffold wording: the reference's parts (an opening with its base message "You are a helpful medical
  assistant.", "Criterion i: ... (worth P points)" under points to include, "(penalty: P points)" under
  points to avoid, a closing request, the do-not-reveal warning) in this project's sentences; the message
  goes through the tokenizer's chat template (the reference pastes Qwen's special tokens by hand);
- criteria shown at 0 < ratio < 1 are chosen with a seeded draw (the reference's draw is unseeded);
- the sampler is this project's engine, not vLLM: the same filters (temperature, top-k, then top-p), a
  bfloat16 paged KV cache, bfloat16 compute over float32 master weights;
- judge failures: up to 6 retries, then the criterion is ungraded and its group leaves the update
  (judge.ungraded_policy 'drop_group'); the judge model is whatever JUDGE_MODEL names;
- prompts over 4096 tokens are dropped (data.length_policy 'drop', like verl's filter_overlong_prompts);
- checkpoints every 25 steps, the last 3 kept, and the micro-batch sizes are this project's choices
  (they change memory, not the update).

Paths and the judge come from the environment (or --config.key=value):
    QWEN7B_DIR              a Hugging Face checkpoint directory of Qwen2.5-7B-Instruct (local on each host)
    HEALTHBENCH_TRAIN_PATH  the training split (required): HealthBench with the val400 examples held out,
                            HealthBench JSONL or verl parquet; a gs:// URL reaches every host of a pod
    HEALTHBENCH_VAL_PATH    the validation set (default ../shared/healthbench/healthbench_val400.jsonl)
    JUDGE_BASE_URL          an OpenAI-compatible endpoint, e.g. http://judge-host:8000/v1 (comma-separated for several)
    JUDGE_MODEL             the judge model name served there
    RUSCARL_JUDGE_API_KEY   its key (read by the judge; never logged)
"""
import os

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/qwen7b"
    c.model.source = "hf"
    c.model.checkpoint_dir = os.environ.get("QWEN7B_DIR", "")
    c.model.preset = "Qwen2.5-7B-Instruct"  # the architecture, for scripts/plan.py without the weights
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # float32 master weights, bfloat16 compute
    c.model.remat = "full"
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.data.update(dict(train_path=os.environ.get("HEALTHBENCH_TRAIN_PATH", ""),
                       val_path=os.environ.get("HEALTHBENCH_VAL_PATH", "../shared/healthbench/healthbench_val400.jsonl"),
                       batch_size=64, max_prompt_length=4096, length_policy="drop", val_examples=0))
    c.scaffold.update(dict(rule="step_sigmoid", start_point=0.2, steepness=125.0, add_base_when_zero=False,
                           include_evaluation_warning=True))
    c.scaffold.wording.base_message = "You are a helpful medical assistant."  # the reference's
    c.warm_start.path = ""  # no warm start: RL from the instruct checkpoint, which is also the KL reference
    c.rollout.update(dict(num_generations=8, max_new_tokens=4096, temperature=0.7, top_p=0.8, top_k=20,
                          prompt_bucket_min=512))
    c.rollout.validation.update(dict(temperature=0.7, top_p=0.8, top_k=20, greedy=False))
    # Rollout layout (sampler/engine.py, rollout_mesh): every chip decodes its own slots from its own pages with
    # a replicated bfloat16 copy of the policy, resharded from the FSDP training layout once per rollout. Chosen
    # from the memory plan: on a v5p chip (95 GiB) the copy is 15.2 GB next to ~3 GB of FSDP training state and
    # the 8 GB KV budget, and no weight moves per token (a tensor-parallel layout would all-reduce every layer's
    # activations per token). The 512 rows of a step all decode at once (16 per chip of a v5p-64): 8 GB of
    # bfloat16 pages per chip = 8.7k pages of 16 tokens, enough for 16 full-length (8192-token) sequences, so no
    # row waits for a slot and the rollout takes as many decode steps as its longest row (no tail of late
    # admissions); sequences are preempted only if a smaller slice runs out of pages. The TPU compiler's plan for a
    # v5p-64 (docs/memory_plan.md): step peak 35.5 GiB per chip (the prefill), 0 bytes between chips per decode step
    c.rollout.engine.update(dict(slots=512, page_size=16, memory_gb=8.0, max_seq_len=8192, check_every=32,
                                 cache_dtype="bfloat16"))
    urls = [u for u in os.environ.get("JUDGE_BASE_URL", "").split(",") if u]
    c.judge.update(dict(base_urls=tuple(urls), model=os.environ.get("JUDGE_MODEL", ""), api_key_env="RUSCARL_JUDGE_API_KEY",
                        max_concurrency=512, timeout_s=180.0, max_retries=6,
                        temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5, max_tokens=2048,
                        extra_body={"chat_template_kwargs": {"enable_thinking": False}}))
    c.grpo.update(dict(kl_coef=0.001, kl_estimator="low_var_kl", entropy_coeff=0.0, ppo_mini_batch_size=256,
                       ppo_micro_batch_size=32, ppo_epochs=1, logprob_chunk_size=512, compute_dtype="bfloat16"))
    # packing (rl/packing.py): each chip's micro-batch is one buffer of 8192 tokens, the longest row (4096 prompt
    # + 4096 response), filled with as many whole rows as fit (first-fit decreasing) instead of one padded row;
    # micro-batches left empty are skipped, so the update and the log-prob pass compute ~real tokens only. 8192
    # is the smallest budget a full-length row allows and keeps the update's activations those of one row per
    # chip (with splash attention, no [T, T] scores); the log-prob pass (no backward) takes the same buffers.
    # ppo_micro_batch_size is unused with packing (it stays a multiple of the data-parallel size for MoE-free
    # runs that turn packing off: one row per chip on a 32-chip slice (v5p-64), 4 per GPU on 8 GPUs).
    c.grpo.update(dict(micro_token_budget=8192))
    c.optim.update(dict(learning_rate=1e-6, weight_decay=0.01, max_grad_norm=1.0, schedule="constant"))
    c.trainer.update(dict(total_steps=350, checkpoint_every=25, keep_checkpoints=3, test_freq=5))
    return c

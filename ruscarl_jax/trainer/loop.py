"""The RuscaRL training loop: data -> scaffold -> sampler -> judge -> advantages -> update, per step.

    train(config, workdir)

Each step t of T: a batch of prompts; G scaffolded prompts per example with reveal ratios from the
step rule at (t, T); one sampled response per scaffolded prompt; the judge grades every criterion;
rewards -> group advantages -> the GRPO update on the unscaffolded training prompts. Metrics go to
metrics.jsonl and TensorBoard, rollouts to rollouts/step_XXXXXX.jsonl, checkpoints to checkpoints/.

Batch sizes are global: data.batch_size prompts per step over all processes; process p samples and
judges its contiguous share of each global batch, so the global row order (and the minibatch
shuffle over it) is the same on any process layout. Counts in the metrics are summed over processes;
the validation set is split across processes and its score computed over all of it.

Resume: a run started on a workdir that has checkpoints continues from the latest one, exactly: the
step keys are fold_in(seed key, step), the data iterator position is restored, and the reference
policy is rebuilt from the model source.

Preemption (SIGTERM, trainer.preemption_grace_s; see trainer/preemption.py): sampling and judging stop
where they are, on every process at the same agreed point, and the last completed step is saved at
once (if it is not saved already) with the rollout already sampled for the next step, so the resumed
run trains exactly what the uninterrupted one would have; then the run returns (exit 0). A stop that
lands during validation keeps the update it follows: that step is logged without its validation
scores and saved.

Overlap (trainer.overlap_judge, off by default): while the judge grades step t's responses the sampler
already generates step t+1's from the parameters before step t's update, so step t+1 trains on
rollouts one update stale. `judge_hidden_seconds` reports the judge time this hid. A checkpoint of
step t also holds that pending rollout (samples, MoE routing, sampling time), so a resumed run trains
on the same stale rollout and reports the same rollout throughput.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ruscarl_jax.data.pipeline import BatchIterator, PipelineSettings
from ruscarl_jax.evaluation import scoring
from ruscarl_jax.judge.judge import Judge
from ruscarl_jax.judge.telemetry import met_rate_tags, step_telemetry
from ruscarl_jax.models import lora, qwen
from ruscarl_jax.models.sharding import global_to_host, host_to_global
from ruscarl_jax.rl.optimizer import init_opt_state, make_optimizer
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.routing import experts_shape, make_routing_pass, routing_needed
from ruscarl_jax.rl.train_step import make_grpo_step, make_reference
from ruscarl_jax.sampler.engine import Interrupted
from ruscarl_jax.sampler.generate import fold_step_key, generate
from ruscarl_jax.scaffold.prompts import build_prompts, render_prompt
from ruscarl_jax.trainer import config as config_lib
from ruscarl_jax.trainer import distributed, snapshot
from ruscarl_jax.trainer.checkpoint import Checkpointer
from ruscarl_jax.trainer.metrics import RunWriter, truncate_metrics
from ruscarl_jax.trainer.preemption import StopSignal, wait_for
from ruscarl_jax.trainer.rollout import (Rollout, across_processes, assemble, collect, gather_records, log_kv_budget,
                                         rollout_from_saved, row_seed, sample_arrays)
from ruscarl_jax.trainer.setup import (filter_long_prompts, filter_long_validation, load_data, load_policy, mesh_from_config,
                                       rules_from_config, stop_token_ids)

logger = logging.getLogger("ruscarl_jax.trainer")


def _rewards(grades: list[Any], generations: int, policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row rewards and validity. Under 'drop_group' a group with an ungraded criterion in any row is
    dropped (all G rows); under 'graded_only' a row keeps the score of its graded criteria (the judge
    computed it so) and only a row without a score (nothing graded) is dropped."""
    rewards = np.asarray([g.score if g.score is not None else 0.0 for g in grades], np.float64)
    if policy == "drop_group":
        bad = np.asarray([g.ungraded_count > 0 or g.score is None for g in grades])
        bad = np.repeat(bad.reshape(-1, generations).any(axis=1), generations)
    elif policy == "graded_only":
        bad = np.asarray([g.score is None for g in grades])
    else:
        raise ValueError(f"unknown ungraded policy {policy!r}")
    return rewards, (~bad).astype(np.float32), int(sum(g.ungraded_count for g in grades))


def _rollout_metrics(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reward / ratio / length statistics over the GLOBAL batch (works across hosts). A row counts as
    scaffolded when its prompt showed at least one criterion (`scaffolded`), not when its ratio is > 0."""
    valid = batch["row_valid"]
    r = batch["rewards"]
    scaffolded = (batch["scaffolded"] > 0) * valid
    plain = (batch["scaffolded"] <= 0) * valid

    def mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    m = mean(r, valid)
    return {
        "reward_mean": m, "reward_std": jnp.sqrt(mean((r - m) ** 2, valid)),
        "reward_scaffolded_mean": jnp.where(scaffolded.sum() > 0, mean(r, scaffolded), jnp.nan),
        "reward_unscaffolded_mean": jnp.where(plain.sum() > 0, mean(r, plain), jnp.nan),
        "reveal_ratio_mean": jnp.mean(batch["ratio"]),
        "shown_criteria_mean": jnp.mean(batch["shown"]),
        "scaffolded_fraction": jnp.mean(batch["scaffolded"]),
        "response_length_mean": jnp.mean(batch["response_mask"].sum(axis=1).astype(jnp.float32)),
        "rows_valid_fraction": jnp.mean(valid),
    }


def _records(rollout: Rollout, grades: list[Any]) -> list[dict[str, Any]]:
    out = []
    for r, text, grade, reason in zip(rollout.prompts.records, rollout.responses, grades, rollout.samples.finish_reason):
        out.append({
            "example_id": r.example_id, "sample_index": r.sample_index, "ratio": r.ratio,
            "shown_indices": list(r.shown_indices), "system_message": r.system_message, "response": text,
            "finish_reason": str(reason), "reward": grade.score, "verdicts": [dataclasses.asdict(v) for v in grade.criteria],
        })
    return out


def _gather_validation(grades: list[Any], examples: list[Any], bounds: list[int]) -> tuple[list[float | None], list[list[bool | None]]]:
    """Every process's validation scores and verdicts, in example order (process p graded the examples
    bounds[p]:bounds[p+1]). Scores travel as float64 (NaN = None), verdicts as int8 (-1 = None)."""
    rows, width = max(b - a for a, b in zip(bounds, bounds[1:])), max((len(ex.rubric) for ex in examples), default=0)
    scores, verdicts = np.full((rows,), np.nan), np.full((rows, width), -1, np.int8)
    for i, g in enumerate(grades):
        scores[i] = np.nan if g.score is None else g.score
        verdicts[i, :len(g.criteria)] = [-1 if c.met is None else int(c.met) for c in g.criteria]
    all_scores, all_verdicts = across_processes(scores), across_processes(verdicts)
    out_scores, out_verdicts = [], []
    for p, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out_scores += [None if np.isnan(x) else float(x) for x in all_scores[p, : b - a]]
        out_verdicts += [[None if v < 0 else bool(v) for v in row[: len(ex.rubric)]]
                         for row, ex in zip(all_verdicts[p, : b - a], examples[a:b])]
    return out_scores, out_verdicts


def validate_policy(params, cfg, tokenizer, examples, judge: Judge, sampling, step: int, seed: int, mesh, rules,
                    stop: StopSignal | None = None, max_prompt_length: int = 0) -> dict[str, Any] | None:
    """HealthBench-style score of unscaffolded greedy/val-sampled responses on the validation set.
    Each process samples and judges a contiguous share; the score is computed over all of them.
    None when `stop` agrees on a stop first. Prompts longer than max_prompt_length (> 0) keep their last
    tokens (the load-time filter, setup.filter_long_validation, dropped them unless length_policy is
    'truncate_left')."""
    count = jax.process_count()
    bounds = [p * len(examples) // count for p in range(count + 1)]
    mine = examples[bounds[jax.process_index()]: bounds[jax.process_index() + 1]]
    prompts = [np.asarray(tokenizer(render_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"], np.int32)
               for ex in mine]
    if max_prompt_length:
        prompts = [ids[-max_prompt_length:] for ids in prompts]
    try:
        out = generate(params, cfg, prompts, fold_step_key(jax.random.key(seed + 1), step), sampling, mesh=mesh, rules=rules,
                       row_seeds=[row_seed(ex.id, 0) for ex in mine], interrupt=None if stop is None else stop.poll)
    except Interrupted:
        return None
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(out.tokens, out.lengths)], skip_special_tokens=True)
    grades = wait_for(judge.submit(list(zip(mine, texts))), stop)
    if grades is None:
        return None
    all_scores, verdicts = _gather_validation(grades, examples, bounds)
    scores = [x for x in all_scores if x is not None]
    metrics = {f"val/{k}": v for k, v in scoring.summarize(scores).items()}
    for tag, s in scoring.tag_breakdown([ex.rubric for ex in examples], verdicts, prefixes=("axis:",)).items():
        metrics[f"val/{tag.replace(':', '_')}"] = s["score"]
    return metrics


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run (or resume) training; returns the last step's metrics."""
    cache_dir = config.trainer.get("compilation_cache_dir", "")
    if cache_dir:  # compiled programs persist across runs and restarts (JAX's persistent cache)
        jax.config.update("jax_compilation_cache_dir", str(config_lib.resolve_path(cache_dir, pathlib.Path.cwd())))
    d = config.distributed
    distributed.initialize(d.coordinator_address or None, d.num_processes or None,
                           d.process_id if d.process_id >= 0 else None, cpu_collectives=d.cpu_collectives or None)
    settings = config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    if config.trainer.get("plan_only", False):  # compile the step's programs, print their memory, train nothing
        from ruscarl_jax.plan.step_memory import local_slice, plan_config

        plan = plan_config(config, local_slice())
        if jax.process_index() == 0:
            print(plan.report(), flush=True)
        return {"fits": plan.fits, "peak_bytes": plan.peak.peak}
    workdir = config_lib.check_storage(os.fspath(workdir), "workdir", base=os.getcwd())
    mesh, rules = mesh_from_config(config), rules_from_config(config)
    generations, total = int(config.rollout.num_generations), int(config.trainer.total_steps)

    train_examples = load_data(config, "train_path")
    val_examples = load_data(config, "val_path")[: int(config.data.get("val_examples", 0)) or None]
    try:  # a resume uses the run's saved tokenizer and refuses a changed config
        resumed = snapshot.check_config(config, workdir)
    except snapshot.SnapshotMismatch as err:
        raise config_lib.ConfigError(str(err)) from None
    cfg, params, tokenizer = load_policy(config, mesh, rules, train_examples + val_examples, settings.scaffold,
                                         tokenizer=snapshot.load_tokenizer(workdir) if resumed else None)
    if not resumed and jax.process_index() == 0:
        snapshot.write(config, tokenizer, workdir)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dataclasses.replace(settings.sampling, stop_token_ids=stops, pad_token_id=pad)
    val_sampling = dataclasses.replace(settings.val_sampling, stop_token_ids=stops, pad_token_id=pad)
    log_kv_budget(cfg, sampling, int(config.data.batch_size) * generations, int(config.data.max_prompt_length), mesh, rules)
    train_examples = filter_long_prompts(train_examples, config, settings.scaffold, tokenizer, generations)
    val_examples = filter_long_validation(val_examples, config, tokenizer)
    rate_tags = met_rate_tags(train_examples, settings.judge.met_rate_tag_prefixes)  # the same list on every process

    data = BatchIterator(train_examples, PipelineSettings(batch_size=int(config.data.batch_size), seed=int(config.seed),  # global
                                                          num_epochs=config.data.num_epochs, shuffle=bool(config.data.shuffle)))
    optimizer = make_optimizer(settings.optim)
    if settings.lora.enabled:  # frozen (maybe int8) base + trainable adapters; the KL reference is the base
        params = lora.make_sharded_state(params, settings.lora, qwen.param_logical_axes(cfg), mesh, rules)
    reference = make_reference(params, settings.grpo)
    opt_state = init_opt_state(optimizer, lora.split(params)[0])  # the trainable part only
    policy = qwen_policy(cfg, mesh, rules)
    step_fn = make_grpo_step(policy, settings.grpo, optimizer)
    routing = make_routing_pass(policy, settings.grpo) if routing_needed(cfg.is_moe, settings.grpo) else None
    base_key = jax.random.key(int(config.seed))

    checkpoints = Checkpointer(workdir / "checkpoints", keep=int(config.trainer.keep_checkpoints) or 1,
                               save_every=int(config.trainer.checkpoint_every))
    start = checkpoints.latest_step() or 0
    overlap = bool(config.trainer.overlap_judge)
    saved_pending = None
    if start:
        state, _, positioned = checkpoints.restore(start, {"params": lora.split(params)[0], "opt_state": opt_state}, data)
        params, opt_state = lora.join(state["params"], lora.split(params)[1]), state["opt_state"]
        if not positioned:  # written by another number of processes: every process consumed `start` batches
            logger.info("checkpoint %d was written by another process layout: skipping %d batches", start, start)
            for _ in range(start):
                next(data)
        if start < total:  # an overlap checkpoint, or one a preemption saved, holds the next step's rollout
            saved_pending = _restore_pending(checkpoints, start, int(config.data.batch_size) * generations,
                                             int(settings.sampling.max_new_tokens), mesh, rules,
                                             experts_shape(cfg, 0, 0) if routing is not None else None, overlap)
        logger.info("resumed from %s at step %d", checkpoints.directory, start)
        if jax.process_index() == 0:
            truncate_metrics(workdir, start)
    writer = RunWriter(workdir, total, start, active=jax.process_index() == 0, tensorboard=bool(config.trainer.tensorboard),
                       wandb=config_lib.wandb_options(config), run_config=config.to_dict())
    judge = Judge(settings.judge)
    stop = StopSignal(float(config.trainer.get("preemption_grace_s", config_lib.PREEMPTION_GRACE_S)))
    stop.install()
    val_length = int(config.data.max_prompt_length) if config.data.length_policy == "truncate_left" else 0
    group_offset = jax.process_index() * (int(config.data.batch_size) // jax.process_count())

    def next_rollout(step: int, saved: dict[str, np.ndarray] | None = None) -> Rollout:
        examples = next(data)
        prompts = build_prompts(examples, generations, step, total, settings.scaffold, int(config.seed), tokenizer,
                                max_prompt_length=int(config.data.max_prompt_length), length_policy=config.data.length_policy)
        if prompts.num_dropped:
            raise RuntimeError(f"step {step}: {prompts.num_dropped} examples exceeded data.max_prompt_length after the load-time filter")
        if saved is not None:  # the pending rollout of an overlap run, from its checkpoint
            return rollout_from_saved(step, prompts, saved, tokenizer, data.get_state())
        return collect(step, prompts, lora.effective_params(params), cfg, tokenizer, sampling, fold_step_key(base_key, step), mesh, rules,
                       data.get_state(), routing=routing, interrupt=stop.poll)

    def stopped(done: int, sampled: Rollout | None, data_state: dict[str, Any], where: str) -> None:
        """A stop agreed mid-step: save step `done` (the last completed one; the parameters in hand are
        its own) unless it is saved already, with `sampled` (step done+1's rollout, fully sampled) as its
        pending rollout. Step 0 is not saved: a restart from scratch is the same run."""
        saved = done > 0 and checkpoints.latest_step() != done
        if saved:
            checkpoints.save(done, {"params": lora.split(params)[0], "opt_state": opt_state}, {"step": done, "total_steps": total},
                             _FixedState(data_state),
                             pending=None if sampled is None else host_to_global(sample_arrays(sampled), mesh, rules))
        what = f"step {done} saved" if saved else f"step {done} already saved" if done else "nothing to save yet"
        stop.report(f"interrupted {where}; {what}" + (f" with step {done + 1}'s rollout" if saved and sampled else ""))

    last: dict[str, Any] = {}
    initial = {}  # the held-out score before training, logged with step 1 (the run summary's "before")
    done_state = data.get_state()  # the data position after the last completed step
    try:
        if val_examples and config.trainer.test_freq and start == 0:
            scores = validate_policy(lora.effective_params(params), cfg, tokenizer, val_examples, judge, val_sampling, 0, int(config.seed),
                                     mesh, rules, stop, val_length)
            if scores is None:
                stopped(0, None, done_state, "during the initial validation")
                return last
            initial = {"val/score_initial": scores["val/score"]}
        pending = None
        if start < total:
            try:
                pending = next_rollout(start + 1, saved_pending)
            except Interrupted:
                stopped(start, None, done_state, f"while sampling step {start + 1}")
                return last
        for step in range(start + 1, total + 1):
            rollout, pending = pending, None
            t0 = time.perf_counter()
            judge_counters = judge.metrics()
            future = judge.submit(rollout.judge_items)
            hidden = 0.0
            if overlap and step < total:
                try:
                    pending = next_rollout(step + 1)  # sampled while the judge works, from pre-update params
                except Interrupted:
                    future.cancel()
                    stopped(step - 1, rollout, done_state, f"while sampling step {step + 1} (judging step {step})")
                    break
                hidden = time.perf_counter() - t0
            grades = wait_for(future, stop)
            if grades is None:
                stopped(step - 1, rollout, done_state, f"while judging step {step}")
                break
            judge_seconds = time.perf_counter() - t0
            judge_metrics = step_telemetry(judge_counters, judge.metrics(), rollout.judge_items, grades, settings.judge,
                                           tags=rate_tags, reduce=lambda v: across_processes(v).sum(axis=0))
            rewards, valid, ungraded = _rewards(grades, generations, settings.judge.ungraded_policy)
            local = assemble(rollout, rewards, valid, group_offset, pad, sampling.prompt_bucket_min)
            batch = host_to_global(local, mesh, rules)
            t1 = time.perf_counter()
            shown = {k: batch.pop(k) for k in ("ratio", "shown")}  # for the metrics only
            params, opt_state, update_metrics = step_fn(params, opt_state, batch, fold_step_key(jax.random.key(int(config.seed) + 2), step), reference)
            metrics = {k: float(v) for k, v in {**jax.device_get(update_metrics),
                                                 **jax.device_get(jax.jit(_rollout_metrics)({**batch, **shown}))}.items()}
            update_seconds = time.perf_counter() - t1
            # counts over all processes; the rollout took as long as its slowest process
            counts = across_processes(np.asarray([np.sum(rollout.samples.lengths), ungraded, np.sum(valid == 0),
                                                  rollout.seconds], np.float64))
            tokens, ungraded, dropped_rows = counts[:, :3].sum(axis=0)
            metrics.update({
                "kl": metrics.get("kl_loss", metrics.get("ppo_kl", 0.0)), "judge_ungraded": int(ungraded),
                "rollout_seconds": rollout.seconds, "judge_seconds": judge_seconds, "update_seconds": update_seconds,
                "tokens_per_second": float(tokens) / max(float(counts[:, 3].max()), 1e-9), "judge_hidden_seconds": hidden,
                "dropped_groups": float(dropped_rows / generations),
            })
            metrics.update(judge_metrics)
            if val_examples and config.trainer.test_freq and (step % int(config.trainer.test_freq) == 0 or step == total):
                scores = validate_policy(lora.effective_params(params), cfg, tokenizer, val_examples, judge, val_sampling, step,
                                         int(config.seed), mesh, rules, stop, val_length)
                if scores is None:
                    logger.warning("step %d: validation interrupted by a stop; the step is logged without it", step)
                metrics.update(scores or {})
            if step == 1:
                metrics.update(initial)
            writer.write_metrics(step, metrics)
            if config.trainer.save_rollouts:  # every process's rows, in the global row order
                writer.write_rollouts(step, gather_records(_records(rollout, grades)))
            last = {"step": step, **metrics}
            done_state = rollout.data_state
            stopping = stop.poll()  # every process, every step
            if checkpoints.should_save(step, total) or stopping:
                checkpoints.save(step, {"params": lora.split(params)[0], "opt_state": opt_state},  # LoRA: the adapters
                                 {"step": step, "total_steps": total}, _FixedState(rollout.data_state),
                                 pending=None if pending is None else host_to_global(sample_arrays(pending), mesh, rules))
            if stopping:
                stop.report(f"step {step} saved" + (f" with step {step + 1}'s rollout" if pending is not None else ""))
                break
            if pending is None and step < total:
                try:
                    pending = next_rollout(step + 1)
                except Interrupted:
                    stopped(step, None, done_state, f"while sampling step {step + 1}")
                    break
    finally:
        stop.restore()
        writer.close()
        judge.close()
        checkpoints.close()
    return last


def _restore_pending(checkpoints: Checkpointer, step: int, rows: int, width: int, mesh, rules,
                     experts: tuple[int, ...] | None, overlap: bool) -> dict[str, np.ndarray] | None:
    """This process's rows of the pending rollout saved with checkpoint `step`, or None if it has none.
    `experts`: the [_, L, _, K] shape of the rollout routing the run records (None: it records none)."""
    local = rows // jax.process_count()
    arrays = {"tokens": np.zeros((local, width), np.int32), "response_mask": np.zeros((local, width), np.int32),
              "logprobs": np.zeros((local, width), np.float32), "stopped": np.zeros((local,), np.int32),
              "seconds": np.zeros((local,), np.float32)}
    if experts is not None:
        arrays["experts"] = np.zeros((local, experts[1], width, experts[3]), np.int32)
    saved = checkpoints.restore_pending(step, host_to_global(arrays, mesh, rules))
    if saved is None:
        if overlap:
            logger.warning("checkpoint %d holds no pending rollout (saved without overlap_judge): sampling step %d "
                           "from the restored parameters", step, step + 1)
        return None
    saved = global_to_host(saved, mesh, rules)
    if experts is not None and "experts" not in saved:
        raise config_lib.ConfigError(f"checkpoint {step} holds a pending rollout without its MoE routing, which this run "
                                     "records (grpo.routing_replay / grpo.routing_mismatch_metric): it was written by an "
                                     "older version; resume from an earlier checkpoint")
    return saved


class _FixedState:
    """An iterator stand-in whose saved state is a given position (the one after the checkpointed step)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def get_state(self) -> dict[str, Any]:
        return self.state

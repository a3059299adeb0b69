"""The RuscaRL training loop: data -> scaffold -> sampler -> judge -> advantages -> update, per step.

    train(config, workdir)

Each step t of T: a batch of prompts; G scaffolded prompts per example with reveal ratios from the
step rule at (t, T); one sampled response per scaffolded prompt; the judge grades every criterion;
rewards -> group advantages -> the GRPO update on the unscaffolded training prompts. Metrics go to
metrics.jsonl and TensorBoard, rollouts to rollouts/step_XXXXXX.jsonl, checkpoints to checkpoints/.

Resume: a run started on a workdir that has checkpoints continues from the latest one, exactly: the
step keys are fold_in(seed key, step), the data iterator position is restored, and the reference
policy is rebuilt from the model source. SIGTERM / SIGINT finish the current step, save a checkpoint
and return (a TPU VM preemption gives SIGTERM).

Overlap (trainer.overlap_judge, off by default): while the judge grades step t's responses the sampler
already generates step t+1's from the parameters before step t's update, so step t+1 trains on
rollouts one update stale. `judge_hidden_seconds` reports the judge time this hid.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ruscarl_jax.data.pipeline import BatchIterator, PipelineSettings
from ruscarl_jax.evaluation import scoring
from ruscarl_jax.judge.judge import Judge
from ruscarl_jax.models import qwen
from ruscarl_jax.models.sharding import host_to_global
from ruscarl_jax.rl.optimizer import init_opt_state, make_optimizer
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.train_step import make_grpo_step, make_reference
from ruscarl_jax.sampler.generate import fold_step_key, generate
from ruscarl_jax.scaffold.prompts import build_prompts, render_prompt
from ruscarl_jax.trainer import config as config_lib
from ruscarl_jax.trainer import distributed
from ruscarl_jax.trainer.checkpoint import Checkpointer
from ruscarl_jax.trainer.metrics import RunWriter, truncate_metrics
from ruscarl_jax.trainer.rollout import Rollout, assemble, collect, row_seed
from ruscarl_jax.trainer.setup import filter_long_prompts, load_data, load_policy, mesh_from_config, rules_from_config, stop_token_ids

logger = logging.getLogger("ruscarl_jax.trainer")


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        logger.warning("received signal %d: finishing this step, saving a checkpoint, then stopping", signum)
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rewards(grades: list[Any], generations: int, policy: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row rewards and validity. Rows of a group with an ungraded criterion are dropped (all G of
    them) under 'drop_group'; under 'graded_only' they are scored over their graded criteria."""
    rewards = np.asarray([g.score if g.score is not None else 0.0 for g in grades], np.float64)
    bad = np.asarray([g.ungraded_count > 0 or g.score is None for g in grades])
    if policy == "drop_group":
        bad = np.repeat(bad.reshape(-1, generations).any(axis=1), generations)
    return rewards, (~bad).astype(np.float32), int(sum(g.ungraded_count for g in grades))


def _rollout_metrics(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reward / ratio / length statistics over the GLOBAL batch (works across hosts)."""
    valid = batch["row_valid"]
    r = batch["rewards"]
    scaffolded = (batch["ratio"] > 0) * valid
    plain = (batch["ratio"] <= 0) * valid

    def mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    m = mean(r, valid)
    return {
        "reward_mean": m, "reward_std": jnp.sqrt(mean((r - m) ** 2, valid)),
        "reward_scaffolded_mean": jnp.where(scaffolded.sum() > 0, mean(r, scaffolded), jnp.nan),
        "reward_unscaffolded_mean": jnp.where(plain.sum() > 0, mean(r, plain), jnp.nan),
        "reveal_ratio_mean": jnp.mean(batch["ratio"]),
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


def validate_policy(params, cfg, tokenizer, examples, judge: Judge, sampling, step: int, seed: int, mesh, rules) -> dict[str, Any]:
    """HealthBench-style score of unscaffolded greedy/val-sampled responses on the validation set."""
    prompts = [np.asarray(tokenizer(render_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"], np.int32)
               for ex in examples]
    out = generate(params, cfg, prompts, fold_step_key(jax.random.key(seed + 1), step), sampling, mesh=mesh, rules=rules,
                   row_seeds=[row_seed(ex.id, 0) for ex in examples])
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(out.tokens, out.lengths)], skip_special_tokens=True)
    grades = judge.grade(list(zip(examples, texts)))
    scores = [g.score for g in grades if g.score is not None]
    metrics = {f"val/{k}": v for k, v in scoring.summarize(scores).items()}
    verdicts = [[c.met for c in g.criteria] for g in grades]
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
        from ruscarl_jax.trainer.step_memory import local_slice, plan_config

        plan = plan_config(config, local_slice())
        if jax.process_index() == 0:
            print(plan.report(), flush=True)
        return {"fits": plan.fits, "peak_bytes": plan.peak.peak}
    workdir = pathlib.Path(workdir)
    mesh, rules = mesh_from_config(config), rules_from_config(config)
    generations, total = int(config.rollout.num_generations), int(config.trainer.total_steps)

    train_examples = load_data(config, "train_path")
    val_examples = load_data(config, "val_path")[: int(config.data.get("val_examples", 0)) or None]
    cfg, params, tokenizer = load_policy(config, mesh, rules, train_examples + val_examples, settings.scaffold)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dataclasses.replace(settings.sampling, stop_token_ids=stops, pad_token_id=pad)
    val_sampling = dataclasses.replace(settings.val_sampling, stop_token_ids=stops, pad_token_id=pad)
    train_examples = filter_long_prompts(train_examples, config, settings.scaffold, tokenizer, generations)

    data = BatchIterator(train_examples, PipelineSettings(batch_size=int(config.data.batch_size), seed=int(config.seed),
                                                          num_epochs=config.data.num_epochs, shuffle=bool(config.data.shuffle)))
    optimizer = make_optimizer(settings.optim)
    reference = make_reference(params, settings.grpo)
    opt_state = init_opt_state(optimizer, params)
    step_fn = make_grpo_step(qwen_policy(cfg, mesh, rules), settings.grpo, optimizer)
    base_key = jax.random.key(int(config.seed))

    checkpoints = Checkpointer(workdir / "checkpoints", keep=int(config.trainer.keep_checkpoints) or 1,
                               save_every=int(config.trainer.checkpoint_every))
    start = checkpoints.latest_step() or 0
    if start:
        state, _, positioned = checkpoints.restore(start, {"params": params, "opt_state": opt_state}, data)
        params, opt_state = state["params"], state["opt_state"]
        if not positioned:  # written by another number of processes: every process consumed `start` batches
            logger.info("checkpoint %d was written by another process layout: skipping %d batches", start, start)
            for _ in range(start):
                next(data)
        logger.info("resumed from %s at step %d", checkpoints.directory, start)
        if jax.process_index() == 0:
            truncate_metrics(workdir, start)
    writer = RunWriter(workdir, total, start, active=jax.process_index() == 0, tensorboard=bool(config.trainer.tensorboard))
    judge = Judge(settings.judge)
    stop = _StopFlag()
    stop.install()
    group_offset = jax.process_index() * int(config.data.batch_size)

    def next_rollout(step: int) -> Rollout:
        examples = next(data)
        prompts = build_prompts(examples, generations, step, total, settings.scaffold, int(config.seed), tokenizer,
                                max_prompt_length=int(config.data.max_prompt_length), length_policy=config.data.length_policy)
        if prompts.num_dropped:
            raise RuntimeError(f"step {step}: {prompts.num_dropped} examples exceeded data.max_prompt_length after the load-time filter")
        return collect(step, prompts, params, cfg, tokenizer, sampling, fold_step_key(base_key, step), mesh, rules, data.get_state())

    last: dict[str, Any] = {}
    overlap = bool(config.trainer.overlap_judge)
    try:
        pending = next_rollout(start + 1) if start < total else None
        for step in range(start + 1, total + 1):
            rollout, pending = pending, None
            t0 = time.perf_counter()
            future = judge.submit(rollout.judge_items)
            hidden = 0.0
            if overlap and step < total:
                pending = next_rollout(step + 1)  # sampled while the judge works, from pre-update params
                hidden = time.perf_counter() - t0
            grades = future.result()
            judge_seconds = time.perf_counter() - t0
            rewards, valid, ungraded = _rewards(grades, generations, settings.judge.ungraded_policy)
            local = assemble(rollout, rewards, valid, group_offset, pad, sampling.prompt_bucket_min)
            batch = host_to_global(local, mesh, rules)
            t1 = time.perf_counter()
            ratio = batch.pop("ratio")
            params, opt_state, update_metrics = step_fn(params, opt_state, batch, fold_step_key(jax.random.key(int(config.seed) + 2), step), reference)
            metrics = {k: float(v) for k, v in {**jax.device_get(update_metrics),
                                                 **jax.device_get(jax.jit(_rollout_metrics)({**batch, "ratio": ratio}))}.items()}
            update_seconds = time.perf_counter() - t1
            tokens = float(np.sum(rollout.samples.lengths)) * jax.process_count()
            metrics.update({
                "kl": metrics.get("kl_loss", metrics.get("ppo_kl", 0.0)), "judge_ungraded": ungraded,
                "rollout_seconds": rollout.seconds, "judge_seconds": judge_seconds, "update_seconds": update_seconds,
                "tokens_per_second": tokens / max(rollout.seconds, 1e-9), "judge_hidden_seconds": hidden,
                "dropped_groups": float(np.sum(valid == 0) / generations),
            })
            if val_examples and config.trainer.test_freq and (step % int(config.trainer.test_freq) == 0 or step == total):
                metrics.update(validate_policy(params, cfg, tokenizer, val_examples, judge, val_sampling, step,
                                               int(config.seed), mesh, rules))
            writer.write_metrics(step, metrics)
            if config.trainer.save_rollouts:
                writer.write_rollouts(step, _records(rollout, grades))
            last = {"step": step, **metrics}
            if checkpoints.should_save(step, total) or stop.signal is not None:
                checkpoints.save(step, {"params": params, "opt_state": opt_state},
                                 {"step": step, "total_steps": total}, _FixedState(rollout.data_state))
            if stop.signal is not None:
                logger.warning("stopped by signal %d after step %d (checkpoint saved)", stop.signal, step)
                break
            if pending is None and step < total:
                pending = next_rollout(step + 1)
    finally:
        stop.restore()
        writer.close()
        judge.close()
        checkpoints.close()
    return last


class _FixedState:
    """An iterator stand-in whose saved state is a given position (the one after the checkpointed step)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def get_state(self) -> dict[str, Any]:
        return self.state

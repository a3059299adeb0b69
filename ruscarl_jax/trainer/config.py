"""The run configuration: validated before anything compiles, turned into each stage's settings.

The ml_collections ConfigDict (configs/*.py) is the only home of hyperparameters. `validate` checks
every section and the cross-section rules, and raises ConfigError naming the offending key
(``config.optim.learning_rate``), so a bad value stops the run in a second, not after a compile.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import ml_collections
from etils import epath

from ruscarl_jax.judge.settings import JudgeSettings
from ruscarl_jax.models import presets
from ruscarl_jax.models.lora import LoraSettings
from ruscarl_jax.models.sharding import MESH_AXES, check_expert_axis
from ruscarl_jax.rl.optimizer import OptimizerSettings
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.sampler.settings import EngineSettings, SamplingSettings, bucket_length
from ruscarl_jax.trainer import storage
from ruscarl_jax.scaffold.message import ScaffoldWording
from ruscarl_jax.scaffold.settings import STEP_RULES, ScaffoldSettings
from ruscarl_jax.trainer.warm_start import WarmStartSettings


PREEMPTION_GRACE_S = 25.0  # trainer.preemption_grace_s's default: a TPU VM's SIGTERM-to-kill time, less a margin
WANDB_KEYS = ("enabled", "project", "entity", "name", "mode")
WANDB_MODES = ("", "online", "offline", "disabled")


TRAIN_SPLIT_HELP = (
    "is required: the training split, a local path or gs:// URL of a JSONL file in HealthBench's shape "
    "({\"prompt_id\", \"prompt\": [messages], \"rubrics\": [{\"criterion\", \"points\", \"tags\"}]} a line) or the "
    "verl/RuscaRL parquet layout (columns prompt, reward_model). For the paper's HealthBench run it is HealthBench "
    "(OpenAI simple-evals, 5000 examples) with the validation examples of healthbench_val400.jsonl held out (match on "
    "prompt_id), as the RuscaRL reference builds it; set it with --config.data.train_path=... or HEALTHBENCH_TRAIN_PATH")


class ConfigError(ValueError):
    """A configuration value that cannot run; the message starts with the key."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    scaffold: ScaffoldSettings
    sampling: SamplingSettings
    val_sampling: SamplingSettings
    judge: JudgeSettings
    grpo: GRPOSettings
    optim: OptimizerSettings
    lora: LoraSettings = LoraSettings()  # config.model.lora (rank 0: full fine-tuning)


def _section(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    if name not in config:
        raise ConfigError(f"config.{name}: missing section")
    value = config[name]
    return dict(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)


def _build(cls: type, values: dict[str, Any], key: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"config.{key}.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        message = str(err)
        for field in sorted(fields, key=len, reverse=True):  # point at the field the message names
            if f"{cls.__name__}.{field}" in message or message.startswith(f"{field}"):
                raise ConfigError(f"config.{key}.{field}: {message}") from None
        raise ConfigError(f"config.{key}: {message}") from None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def wandb_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """trainer.wandb when enabled (the W&B writer's options), else None."""
    options = dict(config.trainer.get("wandb") or {})
    return options if options.pop("enabled", False) else None


def resolve_path(path: str, base: str | os.PathLike | None = None) -> epath.Path:
    """A storage URL (gs://...) as is; a local path with ~ and $VARS expanded, relative ones taken from
    the repository root (or `base`)."""
    return storage.resolve_path(path, base)


def check_storage(path: str, key: str, base: str | os.PathLike | None = None) -> epath.Path:
    """`path` resolved (see resolve_path), after checking that a URL is well formed and its bucket
    answers (ConfigError naming `key` and the URL otherwise)."""
    try:
        storage.check_url(os.path.expandvars(path), f"config.{key}")
    except storage.StorageError as err:
        raise ConfigError(str(err)) from None
    return resolve_path(path, base)


def _checkpoint_experts(directory: pathlib.Path) -> int:
    """num_experts of a Hugging Face checkpoint's config.json (0 for a dense model or no readable config)."""
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return 0  # the loader reports a missing / broken config.json with its own message
    return int(hf.get("num_experts", hf.get("num_local_experts")) or 0) if isinstance(hf, dict) else 0


def _check_engine(sampling: SamplingSettings, max_prompt: int, shards: int) -> None:
    """The engine's slots and pages must hold one sequence of the longest prompt + max_new_tokens."""
    e, r = sampling.engine, sampling.max_new_tokens
    _require(e.slots == 0 or e.slots >= shards, "rollout.engine.slots",
             f"{e.slots} slots for {shards} data-parallel shards: every shard needs at least one slot "
             f"(0 = one slot per prompt)")
    longest = bucket_length(max_prompt, sampling.prompt_bucket_min, sampling.prompt_bucket_steps) if max_prompt else 0
    _require(not e.max_seq_len or not max_prompt or e.max_seq_len >= max_prompt + r, "rollout.engine.max_seq_len",
             f"{e.max_seq_len} cannot hold a prompt of data.max_prompt_length={max_prompt} + max_new_tokens={r}")
    if e.num_pages and e.schedule == "continuous":
        need = math.ceil((e.max_seq_len or longest + r) / e.page_size)
        _require(e.num_pages // shards >= need, "rollout.engine.num_pages",
                 f"{e.num_pages} pages over {shards} data-parallel shard(s) = {e.num_pages // shards} per shard of "
                 f"{e.page_size} tokens; one sequence of up to {e.max_seq_len or longest + r} tokens needs {need}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1,
             check_paths: bool = True) -> RunSettings:
    """Check the whole config; return each stage's frozen settings. Raises ConfigError naming the key.
    check_paths=False skips the checks that files and directories exist (the memory planner's case)."""
    trainer = _section(config, "trainer")
    _require(int(trainer.get("total_steps", 0)) >= 1, "trainer.total_steps", f"must be >= 1, got {trainer.get('total_steps')}")
    for key in ("checkpoint_every", "test_freq", "keep_checkpoints"):
        _require(int(trainer.get(key, 0)) >= 0, f"trainer.{key}", f"must be >= 0, got {trainer.get(key)}")
    grace = trainer.get("preemption_grace_s", PREEMPTION_GRACE_S)
    _require(isinstance(grace, (int, float)) and not isinstance(grace, bool) and grace > 0, "trainer.preemption_grace_s",
             f"must be a number of seconds > 0, got {grace!r}")

    wandb = dict(trainer.get("wandb") or {})
    unknown = sorted(set(wandb) - set(WANDB_KEYS))
    _require(not unknown, f"trainer.wandb.{unknown[0] if unknown else ''}", f"unknown key; valid keys: {', '.join(WANDB_KEYS)}")
    _require(isinstance(wandb.get("enabled", False), bool), "trainer.wandb.enabled", f"must be True or False, got {wandb.get('enabled')!r}")
    _require(wandb.get("mode", "") in WANDB_MODES, "trainer.wandb.mode", f"{wandb.get('mode')!r} is not one of {list(WANDB_MODES)}")

    model = _section(config, "model")
    _require(model.get("source") in ("tiny", "hf"), "model.source", f"{model.get('source')!r} is not one of 'tiny', 'hf'")
    num_experts, experts_key = int((model.get("tiny") or {}).get("num_experts", 0) or 0), "model.tiny.num_experts"
    if model["source"] == "hf":
        _require(not storage.is_url(model.get("checkpoint_dir") or ""), "model.checkpoint_dir",
                 f"must be a local directory (copy the checkpoint to the host first), got {model.get('checkpoint_dir')!r}")
    if model["source"] == "hf" and check_paths:
        directory = resolve_path(model.get("checkpoint_dir") or "")
        _require(bool(model.get("checkpoint_dir")) and directory.is_dir(), "model.checkpoint_dir",
                 f"a Hugging Face checkpoint directory is required with model.source='hf'; got {model.get('checkpoint_dir')!r}")
        num_experts, experts_key = _checkpoint_experts(directory), "model.checkpoint_dir"
    elif model["source"] == "hf" and model.get("preset") in presets.PRESETS:  # the planner, without the weights
        num_experts, experts_key = int(presets.PRESETS[model["preset"]].get("num_experts", 0)), "model.preset"

    lora = _build(LoraSettings, dict(model.get("lora") or {}), "model.lora")
    if "warm_start" in config:  # SFT on demonstrations before RL (trainer/warm_start.py); path "" = off
        warm = _build(WarmStartSettings, _section(config, "warm_start"), "warm_start")
        _require(not warm.path or not check_paths or resolve_path(warm.path).is_file(), "warm_start.path",
                 f"file not found: {resolve_path(warm.path) if warm.path else ''}")

    optim = _section(config, "optim")
    _require(float(optim.get("learning_rate", 0)) > 0, "optim.learning_rate", f"must be > 0, got {optim.get('learning_rate')}")
    optim.setdefault("total_steps", None)

    scaffold = _section(config, "scaffold")
    wording = _build(ScaffoldWording, scaffold.pop("wording", {}) or {}, "scaffold.wording")
    scaffold_settings = _build(ScaffoldSettings, {**scaffold, "wording": wording}, "scaffold")

    rollout = _section(config, "rollout")
    generations = int(rollout.pop("num_generations", 0))
    _require(generations >= 1, "rollout.num_generations", f"must be >= 1, got {generations}")
    _require(not (scaffold_settings.rule in STEP_RULES and generations < 2), "rollout.num_generations",
             f"must be >= 2 with the step rule {scaffold_settings.rule!r} (a group of one sample gets ratio 1 and "
             f"no group advantage), got {generations}")
    val = rollout.pop("validation", {}) or {}
    rollout["engine"] = _build(EngineSettings, dict(rollout.pop("engine", {}) or {}), "rollout.engine")
    sampling = _build(SamplingSettings, rollout, "rollout")
    val_sampling = _build(SamplingSettings, {**rollout, **dict(val)}, "rollout.validation")

    data = _section(config, "data")
    for key in ("train_path", "val_path"):
        if data.get(key) and check_paths:
            path = check_storage(data[key], f"data.{key}")
            _require(path.is_file(), f"data.{key}", f"file not found: {path}")
    _require(bool(data.get("train_path")) or not check_paths, "data.train_path", TRAIN_SPLIT_HELP)
    batch = int(data.get("batch_size", 0))
    _require(batch >= 1, "data.batch_size", f"must be >= 1, got {batch}")

    mesh = _section(config, "mesh")
    unknown = sorted(set(mesh) - set(MESH_AXES))
    _require(not unknown, f"mesh.{unknown[0] if unknown else ''}", f"unknown mesh axis; valid: {list(MESH_AXES)}")
    sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    _require(sum(s == -1 for s in sizes.values()) <= 1 and all(s >= 1 or s == -1 for s in sizes.values()), "mesh",
             f"sizes must be >= 1 with at most one -1, got {sizes}")
    fits = num_devices % fixed == 0 if -1 in sizes.values() else fixed == num_devices
    _require(fits, "mesh", f"{sizes} does not fit {num_devices} devices")
    sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    try:
        check_expert_axis(num_experts, sizes["expert"])
    except ValueError as err:
        raise ConfigError(f"config.mesh.expert: {err} ({experts_key})") from None
    batch_rule = dict((name, axes) for name, axes in config.get("sharding_rules", ())).get("batch", ("data", "fsdp"))
    batch_axes = [] if batch_rule is None else [batch_rule] if isinstance(batch_rule, str) else list(batch_rule)
    data_parallel = math.prod(sizes.get(a, 1) for a in batch_axes)
    _require(data_parallel % process_count == 0, "mesh",
             f"the data-parallel size {data_parallel} (mesh {' x '.join(f'{a}={sizes.get(a, 1)}' for a in batch_axes)}, "
             f"the axes of the 'batch' sharding rule) is not a multiple of the {process_count} processes "
             "(distributed.num_processes): every process must own whole data-parallel shards of the rows it samples")
    _require(batch % process_count == 0, "data.batch_size",
             f"{batch} prompts (the global batch of all processes) do not split over {process_count} processes")
    rows = batch * generations
    _require(rows % data_parallel == 0, "data.batch_size",
             f"{batch} prompts x {generations} generations = {rows} rows (the global batch), "
             f"which do not divide across the {data_parallel} data-parallel devices (mesh {' x '.join(batch_axes)}, "
             "the axes of the 'batch' sharding rule)")

    # the rollout engine shards over every device (sampler/engine.rollout_mesh), whatever the training mesh
    _check_engine(sampling, int(data.get("max_prompt_length", 0)), num_devices)

    grpo = _section(config, "grpo")
    grpo.setdefault("temperature", sampling.temperature)
    _require(float(grpo["temperature"]) == float(sampling.temperature), "grpo.temperature",
             f"must equal rollout.temperature={sampling.temperature} (log-probs are taken at the sampling temperature)")
    grpo_settings = _build(GRPOSettings, grpo, "grpo")
    for key in ("routing_replay", "routing_mismatch_metric"):
        _require(not getattr(grpo_settings, key) or num_experts > 0, f"grpo.{key}",
                 f"needs a mixture-of-experts model ({experts_key} has no experts)")
    if grpo_settings.packed:
        width = bucket_length(int(data.get("max_prompt_length", 0)) or 1, sampling.prompt_bucket_min,
                              sampling.prompt_bucket_steps) + sampling.max_new_tokens
        for key in ("micro_token_budget", "logprob_token_budget"):
            budget = getattr(grpo_settings, key) or grpo_settings.micro_token_budget
            _require(budget >= width, f"grpo.{key}",
                     f"{budget} tokens per packed buffer is below the longest row, {width} (the bucketed "
                     "data.max_prompt_length + rollout.max_new_tokens): each row must fit one buffer")
        _require(num_experts == 0, "grpo.micro_token_budget",
                 f"packing runs dense models; {experts_key} has experts (leave it unset for MoE: padded row micro-batches)")
    try:
        grpo_settings.check_batch_size(rows)
    except ValueError as err:
        key = "logprob_micro_batch_size" if "log-prob" in str(err) else "ppo_mini_batch_size"
        raise ConfigError(f"config.grpo.{key}: {err}") from None
    for key, value in (("ppo_mini_batch_size", grpo_settings.ppo_mini_batch_size),
                       ("ppo_micro_batch_size", grpo_settings.ppo_micro_batch_size),
                       ("logprob_micro_batch_size", grpo_settings.logprob_rows)):
        _require(value % data_parallel == 0, f"grpo.{key}",
                 f"{value} rows (counted over all processes) do not divide across the {data_parallel} "
                 f"data-parallel devices (mesh {' x '.join(batch_axes)})")

    judge = _section(config, "judge")
    judge_settings = _build(JudgeSettings, judge, "judge")
    return RunSettings(scaffold=scaffold_settings, sampling=sampling, val_sampling=val_sampling,
                       judge=judge_settings, grpo=grpo_settings, optim=_build(OptimizerSettings, optim, "optim"), lora=lora)

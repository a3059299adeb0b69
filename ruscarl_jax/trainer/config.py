"""The run configuration: validated before anything compiles, turned into each stage's settings.

The ml_collections ConfigDict (configs/*.py) is the only home of hyperparameters. `validate` checks
every section and the cross-section rules, and raises ConfigError naming the offending key
(``config.optim.learning_rate``), so a bad value stops the run in a second, not after a compile.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import ml_collections

from ruscarl_jax.judge.settings import JudgeSettings
from ruscarl_jax.models.sharding import MESH_AXES
from ruscarl_jax.rl.optimizer import OptimizerSettings
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.sampler.settings import SamplingSettings
from ruscarl_jax.scaffold.message import ScaffoldWording
from ruscarl_jax.scaffold.settings import STEP_RULES, ScaffoldSettings


MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


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


def resolve_path(path: str, base: pathlib.Path | None = None) -> pathlib.Path:
    """Expand ~ and $VARS; relative paths are taken from the repository root (or `base`)."""
    p = pathlib.Path(os.path.expandvars(os.path.expanduser(path)))
    return p if p.is_absolute() else (base or pathlib.Path(__file__).resolve().parents[2]) / p


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1,
             check_paths: bool = True) -> RunSettings:
    """Check the whole config; return each stage's frozen settings. Raises ConfigError naming the key.
    check_paths=False skips the checks that files and directories exist (the memory planner's case)."""
    trainer = _section(config, "trainer")
    _require(int(trainer.get("total_steps", 0)) >= 1, "trainer.total_steps", f"must be >= 1, got {trainer.get('total_steps')}")
    for key in ("checkpoint_every", "test_freq", "keep_checkpoints"):
        _require(int(trainer.get(key, 0)) >= 0, f"trainer.{key}", f"must be >= 0, got {trainer.get(key)}")

    model = _section(config, "model")
    _require(model.get("source") in ("tiny", "hf"), "model.source", f"{model.get('source')!r} is not one of 'tiny', 'hf'")
    _require(model.get("architecture", "") not in MOE_ARCHITECTURES, "model.architecture",
             f"{model.get('architecture')} is a mixture-of-experts model; MoE is not supported yet (dense Qwen2/2.5/3 only)")
    if model["source"] == "hf" and check_paths:
        directory = resolve_path(model.get("checkpoint_dir") or "")
        _require(bool(model.get("checkpoint_dir")) and directory.is_dir(), "model.checkpoint_dir",
                 f"a Hugging Face checkpoint directory is required with model.source='hf'; got {model.get('checkpoint_dir')!r}")

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
    sampling = _build(SamplingSettings, rollout, "rollout")
    val_sampling = _build(SamplingSettings, {**rollout, **dict(val)}, "rollout.validation")

    data = _section(config, "data")
    for key in ("train_path", "val_path"):
        if data.get(key) and check_paths:
            path = resolve_path(data[key])
            _require(path.is_file(), f"data.{key}", f"file not found: {path}")
    _require(bool(data.get("train_path")), "data.train_path", "is required")
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
    data_parallel = sizes["data"] * sizes["fsdp"]
    rows = batch * generations * process_count
    _require(rows % data_parallel == 0, "data.batch_size",
             f"{batch} prompts x {generations} generations x {process_count} processes = {rows} rows, "
             f"which do not divide across the {data_parallel} data-parallel devices (mesh data x fsdp)")

    grpo = _section(config, "grpo")
    grpo.setdefault("temperature", sampling.temperature)
    _require(float(grpo["temperature"]) == float(sampling.temperature), "grpo.temperature",
             f"must equal rollout.temperature={sampling.temperature} (log-probs are taken at the sampling temperature)")
    grpo_settings = _build(GRPOSettings, grpo, "grpo")
    try:
        grpo_settings.check_batch_size(rows)
    except ValueError as err:
        raise ConfigError(f"config.grpo.ppo_mini_batch_size: {err}") from None

    judge = _section(config, "judge")
    judge_settings = _build(JudgeSettings, judge, "judge")
    return RunSettings(scaffold=scaffold_settings, sampling=sampling, val_sampling=val_sampling,
                       judge=judge_settings, grpo=grpo_settings, optim=_build(OptimizerSettings, optim, "optim"))

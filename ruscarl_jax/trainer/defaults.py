"""The run configuration's defaults, each key declared once.

Direction chosen: the config sections are BUILT FROM the settings dataclasses (`section`), not the other
way round. The dataclasses already carry every default together with its type and its validation
(`__post_init__`), and the code outside the trainer (tests, notebooks, scripts) constructs them
directly; so they stay the single declaration, and `base_config()` derives a ConfigDict section from
each one. A field added to a dataclass is therefore a config key at once (overridable from the command
line, shown in a resolved config) with no second declaration. Sections that no dataclass describes
(model, mesh, data, trainer, distributed) are declared here, once.

`base_config()` is the library's defaults (the reference implementation's where it has one, see each
dataclass); configs/tiny.py puts the toy task on top of it, configs/qwen7b.py the paper's HealthBench run.

Conversion rules of `section`: a nested dataclass default becomes a nested section; a `None` default of
an optional field becomes an ml_collections placeholder of the field's type (so `--config.key=value`
can still set it); lists stay tuples. Fields named in `exclude` are filled by the trainer itself (stop
and pad ids from the tokenizer, the log-prob temperature from rollout.temperature) and stay out.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from ruscarl_jax.judge.settings import JudgeSettings
from ruscarl_jax.models.lora import LoraSettings
from ruscarl_jax.models.sharding import DEFAULT_RULES
from ruscarl_jax.rl.optimizer import OptimizerSettings
from ruscarl_jax.rl.settings import GRPOSettings
from ruscarl_jax.sampler.settings import SamplingSettings
from ruscarl_jax.scaffold.settings import ScaffoldSettings
from ruscarl_jax.trainer.config import PREEMPTION_GRACE_S
from ruscarl_jax.trainer.warm_start import WarmStartSettings

# fields of a settings dataclass that the trainer fills in itself (never a config key)
DERIVED: dict[type, tuple[str, ...]] = {
    SamplingSettings: ("stop_token_ids", "pad_token_id"),  # from the tokenizer
    GRPOSettings: ("temperature",),  # = rollout.temperature (log-probs at the sampling temperature)
}


def _optional_type(hint: Any) -> type:
    """The non-None member of an `X | None` hint, as a placeholder type (mappings as dict)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) != 1:
        raise TypeError(f"cannot make a config placeholder of {hint!r}")
    arg = typing.get_origin(args[0]) or args[0]
    return dict if isinstance(arg, type) and issubclass(arg, Mapping) else arg


def section(cls: type, exclude: tuple[str, ...] = (), **required: Any) -> ml_collections.ConfigDict:
    """A config section holding every field of the dataclass `cls` at its default.

    Fields without a default must be given in `required`; fields in `exclude` (and DERIVED[cls]) are left
    out. See the module docstring for the conversion rules.
    """
    hints = typing.get_type_hints(cls)
    skip = set(exclude) | set(DERIVED.get(cls, ()))
    unknown = set(required) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in required:
            value = required[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: pass it to section()")
        if dataclasses.is_dataclass(value):
            value = section(type(value))
        elif value is None:
            value = placeholder(_optional_type(hints[f.name]))
        elif isinstance(value, (list, types.MappingProxyType)):
            value = tuple(value) if isinstance(value, list) else dict(value)
        out[f.name] = value
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    """The library defaults of a run: every settings dataclass at its defaults, plus the sections no
    dataclass describes. No warm start, the full scaffold wording, an external judge, a Hugging Face model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/base"

    c.model = ml_collections.ConfigDict(dict(
        source="hf",  # hf: a checkpoint directory | tiny: random init + a tokenizer trained on the task
        checkpoint_dir="", trust_remote_code=False,
        preset="",  # with source=hf and no checkpoint at hand: a models/presets.py name (the memory planner uses it)
        dtype="float32", param_dtype="float32", remat="none",
    ))
    c.model.lora = section(LoraSettings)  # LoRA / QLoRA (models/lora.py; configs/tiny_lora.py): rank 0 = full fine-tuning
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = tuple(DEFAULT_RULES)

    c.data = ml_collections.ConfigDict(dict(
        train_path="", val_path="", format="auto", on_bad_row="fail",
        batch_size=64, shuffle=True, num_epochs=placeholder(int), max_prompt_length=4096, length_policy="drop",
        val_examples=0,  # 0: every example of val_path
    ))
    c.scaffold = section(ScaffoldSettings)
    c.warm_start = section(WarmStartSettings)  # path "" = no warm start

    c.rollout = section(SamplingSettings, max_new_tokens=4096)
    c.rollout.num_generations = 8
    # validation sampling: these fields of the rollout section, overridden (verl's default: greedy)
    c.rollout.validation = ml_collections.ConfigDict(dict(
        temperature=c.rollout.temperature, top_p=c.rollout.top_p, top_k=c.rollout.top_k, greedy=True))

    c.judge = section(JudgeSettings)
    c.grpo = section(GRPOSettings)
    c.optim = section(OptimizerSettings)
    c.trainer = ml_collections.ConfigDict(dict(
        total_steps=100, checkpoint_every=50, keep_checkpoints=2, test_freq=10, overlap_judge=False,
        save_rollouts=True, tensorboard=True,
        # SIGTERM (a TPU VM preemption): stop sampling / judging at once and save the last completed step
        # (with the rollout already sampled) within this many seconds; a slower stop is logged as an error
        preemption_grace_s=PREEMPTION_GRACE_S,
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

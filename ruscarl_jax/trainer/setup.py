"""What a run starts from: the mesh, the tokenizer and policy parameters, and the rubric data."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.loaders import load_examples
from ruscarl_jax.data.tokenizer import build_tiny_tokenizer
from ruscarl_jax.data.types import Example
from ruscarl_jax.models import hf_io, qwen
from ruscarl_jax.models.sharding import Rules, make_mesh
from ruscarl_jax.scaffold.prompts import build_prompts, render_prompt
from ruscarl_jax.scaffold.settings import ScaffoldSettings
from ruscarl_jax.trainer.config import ConfigError, resolve_path
from ruscarl_jax.trainer.warm_start import WarmStartSettings, build_and_save, cache_directory

logger = logging.getLogger("ruscarl_jax.trainer")


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
    return make_mesh(dict(config.mesh))


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules)


def load_data(config: ml_collections.ConfigDict, key: str) -> list[Example]:
    path = config.data[key]
    if not path:
        return []
    examples, report = load_examples(resolve_path(path), fmt=config.data.format, on_bad_row=config.data.on_bad_row)
    if report.num_skipped:
        logger.warning("%s", report.summary())
    return examples


def _tiny_corpus(examples: list[Example], scaffold: ScaffoldSettings) -> list[str]:
    texts = synthetic.corpus(seed=0)
    texts += [m.content for ex in examples for m in ex.messages]
    texts += [item.criterion for ex in examples for item in ex.rubric]
    wording = [value for value in dataclasses.asdict(scaffold.wording).values() if isinstance(value, str)]
    texts += (wording + ["system\n", "user\n", "assistant\n"]) * 50  # frequent, so merged into few tokens
    return texts


def warm_start_settings(config: ml_collections.ConfigDict) -> WarmStartSettings:
    """config.warm_start as settings (path '' or no section: no warm start)."""
    section = config.get("warm_start")
    return WarmStartSettings(**(section.to_dict() if section is not None else {}))


def load_policy(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, examples: list[Example],
                scaffold: ScaffoldSettings | None, tokenizer: Any = None) -> tuple[qwen.QwenConfig, qwen.Params, Any]:
    """(model config, sharded params, tokenizer) from config.model, warm-started by SFT on
    config.warm_start.path's demonstrations when that is set (built once, then loaded from its cache).
    A given `tokenizer` (the run's snapshot) is used instead of building the tiny one (from `examples`
    and `scaffold`, which are then unused) or loading the checkpoint's."""
    warm = warm_start_settings(config)
    if not warm.path:
        return _load_model(config, mesh, rules, examples, scaffold, int(config.seed), tokenizer)
    corpus = _tiny_corpus(examples, scaffold) if config.model.source == "tiny" else []
    directory = cache_directory(config, warm, [hashlib.sha256("\n".join(corpus).encode()).hexdigest()])
    if not (directory / "config.json").exists():
        cfg, params, tokenizer = _load_model(config, mesh, rules, examples, scaffold, warm.seed)
        build_and_save(directory, params, cfg, tokenizer, warm, mesh, rules)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("warm start saved")
    m = config.model
    cfg, params = hf_io.load_checkpoint(directory, mesh, rules, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    logger.info("warm start loaded from %s", directory)
    return cfg, params, tokenizer or hf_io.load_tokenizer(directory)


def _load_model(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, examples: list[Example],
                scaffold: ScaffoldSettings | None, seed: int, tokenizer: Any = None) -> tuple[qwen.QwenConfig, qwen.Params, Any]:
    m = config.model
    if m.source == "tiny":
        tiny = dict(m.tiny)
        vocab = int(tiny.pop("vocab_size"))
        tokenizer = tokenizer or build_tiny_tokenizer(_tiny_corpus(examples, scaffold), vocab_size=vocab)
        cfg = qwen.QwenConfig(vocab_size=len(tokenizer), dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **tiny)
        params = qwen.init_params_sharded(cfg, jax.random.key(seed), mesh, rules)
        return cfg, params, tokenizer
    if m.source == "hf":
        if not m.checkpoint_dir:
            raise ConfigError("config.model.checkpoint_dir: required when config.model.source='hf'")
        directory = resolve_path(m.checkpoint_dir)
        cfg, params = hf_io.load_checkpoint(directory, mesh, rules, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
        return cfg, params, tokenizer or hf_io.load_tokenizer(directory, trust_remote_code=bool(m.trust_remote_code))
    raise ConfigError(f"config.model.source: {m.source!r} is not one of 'tiny', 'hf'")


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS plus the chat template's end-of-turn token (<|im_end|> for Qwen), when the vocabulary has them."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(int(tid))
    return tuple(sorted(ids))


def filter_long_prompts(examples: list[Example], config: ml_collections.ConfigDict, scaffold: ScaffoldSettings,
                        tokenizer: Any, generations: int) -> list[Example]:
    """Apply the max-prompt-length policy once, at load time, on each example's longest prompt (the
    full-reveal scaffold), so batches never shrink mid-run. Returns the kept examples."""
    limit = int(config.data.max_prompt_length)
    policy = config.data.length_policy
    if policy == "truncate_left":
        return examples
    full_reveal = dataclasses.replace(scaffold, rule="linear")  # sample 0 of a linear group shows every criterion
    batch = build_prompts(examples, max(generations, 1), None, None, full_reveal, config.seed,
                          tokenizer, max_prompt_length=limit, length_policy=policy)
    if batch.num_dropped:
        logger.warning("dropped %d of %d examples whose prompts exceed data.max_prompt_length=%d (data.length_policy"
                       "='drop'); first: %s", batch.num_dropped, len(examples), limit, batch.dropped_ids[0])
    if not batch.examples:
        raise ConfigError(f"config.data.max_prompt_length: all {len(examples)} training examples have prompts longer than "
                          f"{limit} tokens (the longest is the full-reveal scaffold); raise it or use length_policy='truncate_left'")
    return batch.examples


def filter_long_validation(examples: list[Example], config: ml_collections.ConfigDict, tokenizer: Any) -> list[Example]:
    """The validation examples whose (unscaffolded) prompt fits data.max_prompt_length, decided once at
    load time on every process alike, before anything compiles: under length_policy 'drop' the others
    are dropped with a warning naming them ('error': a ConfigError naming them) (an over-long prompt would otherwise stop the one process
    that samples it while the others wait); under 'truncate_left' all are kept and validation keeps
    each prompt's last max_prompt_length tokens, as the training prompts do."""
    limit = int(config.data.max_prompt_length)
    if not examples or not limit or config.data.length_policy == "truncate_left":
        return examples
    lengths = [len(tokenizer(render_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"]) for ex in examples]
    kept = [ex for ex, n in zip(examples, lengths) if n <= limit]
    if len(kept) < len(examples):
        long = [(ex.id, n) for ex, n in zip(examples, lengths) if n > limit]
        named = ", ".join(f"{i} ({n} tokens)" for i, n in long[:5]) + (", ..." if len(long) > 5 else "")
        if config.data.length_policy == "error":
            raise ConfigError(f"config.data.max_prompt_length: {len(long)} validation example(s) of {config.data.val_path} "
                              f"have prompts longer than {limit} tokens (data.length_policy='error'): {named}")
        logger.warning("dropped %d of %d validation examples whose prompts exceed data.max_prompt_length=%d "
                       "(data.length_policy='drop'): %s", len(long), len(examples), limit, named)
    if not kept:
        raise ConfigError(f"config.data.max_prompt_length: all {len(examples)} validation examples ({config.data.val_path}) "
                          f"have prompts longer than {limit} tokens; raise it, use length_policy='truncate_left' or "
                          "set data.val_path=''")
    return kept

"""The memory plan of one training step of a config: its programs compiled on abstract inputs.

    plan = plan_config(config, parse_slice("v5p-64"))
    print(plan.report())        # per program and device, ending "fits: yes|no (peak X GiB of Y GiB per device)"

The programs are the trainer's own (the rollout engine's prefill and decode chunk at the configured slots
and pages, the log-prob pass, the GRPO update with the optimizer state), lowered with the config's shapes
and shardings: rows = data.batch_size x rollout.num_generations (global), prompts at
data.max_prompt_length (bucketed), responses at rollout.max_new_tokens, every slot prefilled at once and
decoding with a full-length page table, so the plan is of the worst step the config allows.
"""
from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from ruscarl_jax.models import hf_io, presets, qwen
from ruscarl_jax.models.sharding import batch_sharding, data_parallel_size, make_mesh
from ruscarl_jax.rl.optimizer import make_optimizer, opt_state_shardings
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.train_step import grpo_update, rollout_logprobs
from ruscarl_jax.sampler import engine
from ruscarl_jax.sampler.settings import bucket_length
from ruscarl_jax.trainer import config as config_lib
from ruscarl_jax.trainer.memory_plan import (Plan, Slice, abstract, advice, compile_program, dtype_bytes,
                                             per_device_bytes, rows_per_device)
from ruscarl_jax.trainer.setup import rules_from_config


def model_config(config: ml_collections.ConfigDict) -> qwen.QwenConfig:
    """The architecture a config trains: the tiny dims, the checkpoint's config.json, or model.preset."""
    m = config.model
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.source == "tiny":
        return qwen.QwenConfig(**dict(m.tiny), **kw)
    directory = config_lib.resolve_path(m.checkpoint_dir) if m.get("checkpoint_dir") else None
    if directory is not None and (directory / "config.json").is_file():
        hf = json.loads((directory / "config.json").read_text())
        return hf_io.config_from_hf(hf, source=str(directory / "config.json"), **kw)
    if m.get("preset"):
        try:
            return hf_io.config_from_hf(presets.preset(m.preset), source=f"preset {m.preset}", **kw)
        except KeyError as err:
            raise config_lib.ConfigError(f"config.model.preset: {err.args[0]}") from None
    raise config_lib.ConfigError("config.model.preset: the plan needs the architecture: give model.checkpoint_dir with "
                                 f"a config.json or model.preset (one of {', '.join(sorted(presets.PRESETS))})")


def _layer_working_set(cfg: qwen.QwenConfig, rows: int, queries: int, keys: int, tensor: int, cb: int,
                       saved: bool = False) -> int:
    """Bytes of one decoder layer's activations on one device (materialised attention scores in float32).
    saved: what autodiff keeps of a layer for its backward pass without remat (each op's inputs: about twice
    the dense activations, as normed, rotated and gated copies are kept too)."""
    local = lambda n: -(-n // tensor) if n % tensor == 0 else n  # noqa: E731 - sharded over tensor when divisible
    h, k, d, e = local(cfg.num_heads), local(cfg.num_kv_heads), cfg.head_dim, cfg.hidden_size
    # MoE: each token's top-k expert rows (gate, up, product) and its k sorted copies in and out
    mlp = (3 * local(cfg.num_experts_per_tok * cfg.moe_intermediate_size) + 2 * cfg.num_experts_per_tok * e
           if cfg.is_moe else 3 * local(cfg.intermediate_size))
    dense = rows * queries * (2 * e + (2 * h + 2 * k) * d + mlp) * cb * (2 if saved else 1)
    scores = rows * h * queries * keys * 4 * 2  # scores and probabilities
    return dense + scores


def _analytic(cfg: qwen.QwenConfig, settings: config_lib.RunSettings, state: dict[str, int], mesh_shape: dict[str, int],
              rows: int, prompt: int, response: int, dp: int, kv_bytes: int, slots: int, max_len: int) -> dict[str, int]:
    g, tensor = settings.grpo, mesh_shape.get("tensor", 1)
    cb = dtype_bytes(g.compute_dtype)
    width = prompt + response
    param_elems = state["params"] // dtype_bytes(cfg.param_dtype)
    terms = dict(state)
    terms["gradients"] = param_elems * (4 + cb)  # the float32 sum over micro-batches and one micro-batch's
    if g.compute_dtype != cfg.param_dtype:
        terms["compute-dtype params"] = param_elems * cb
    # the engine samples from a replicated compute-dtype copy of the weights, made once per rollout
    # (engine.rollout_params); no weight is gathered per decode step
    sb = dtype_bytes(cfg.dtype)
    terms["rollout weights"] = cfg.num_params * sb
    terms["rollout KV cache"] = kv_bytes
    # a decode step of a shard (one device, all KV heads) reads one layer's pages of its slots (the pure-JAX
    # path gathers them; the Pallas kernel streams them) and samples from float32 logits (sorted for top-k/p)
    devices = math.prod(mesh_shape.values())
    slot_rows = rows_per_device(slots, devices)
    terms["decode working set"] = slot_rows * (2 * max_len * cfg.num_kv_heads * cfg.head_dim * sb + 4 * cfg.vocab_size * 4)
    # the engine prefills the prompts admitted together: at most every slot, at the longest prompt
    terms["prefill activations"] = _layer_working_set(cfg, slot_rows, prompt, prompt, 1, sb)
    vocab = cfg.vocab_size // tensor if cfg.vocab_size % tensor == 0 else cfg.vocab_size
    fsdp = mesh_shape.get("fsdp", 1)  # the update keeps each layer's all-gathered weights (without full remat)
    table = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    layer_gathered = (cfg.num_params - table) // cfg.num_layers * (fsdp - 1) // fsdp
    micro = rows_per_device(g.ppo_micro_batch_size, dp)
    layer = _layer_working_set(cfg, micro, width, width, tensor, cb)
    saved = cfg.num_layers * micro * width * cfg.hidden_size * cb
    # full remat keeps each layer's input and recomputes one layer at a time (forward, then its backward);
    # otherwise every layer's working set is kept for the backward pass, which needs one more of its own
    # (with FSDP, each layer's all-gathered weights are kept for the backward pass too)
    if cfg.remat == "full":
        terms["update activations"] = saved + 2 * layer
    else:
        kept = _layer_working_set(cfg, micro, width, width, tensor, cb, saved=True) + layer_gathered * cb
        terms["update activations"] = cfg.num_layers * kept + layer
    terms["logits chunk"] = 3 * micro * min(g.logprob_chunk_size, response) * vocab * 4
    terms["log-prob activations"] = _layer_working_set(cfg, rows_per_device(g.logprob_rows, dp), width, width, tensor, cb)
    return terms


def plan_config(config: ml_collections.ConfigDict, target: Slice, devices: list[jax.Device] | None = None) -> Plan:
    """Compile the step's programs for `config` on the first `target.devices` devices; the Plan."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < target.devices:
        raise ValueError(f"the plan of {target.name} needs {target.devices} devices; this process has {len(devices)} "
                         f"(start it with XLA_FLAGS=--xla_force_host_platform_device_count={target.devices})")
    settings = config_lib.validate(config, num_devices=target.devices, process_count=1, check_paths=False)
    mesh = make_mesh(dict(config.mesh), devices[: target.devices])
    rules = rules_from_config(config)
    cfg = model_config(config)
    g, s = settings.grpo, settings.sampling
    rows = int(config.data.batch_size) * int(config.rollout.num_generations)
    prompt = bucket_length(int(config.data.max_prompt_length), s.prompt_bucket_min, s.prompt_bucket_steps)
    response = s.max_new_tokens
    dp = data_parallel_size(mesh, rules)

    replicated = NamedSharding(mesh, PartitionSpec())
    params = abstract(qwen.param_shapes(cfg), qwen.param_shardings(cfg, mesh, rules))
    optimizer = make_optimizer(settings.optim)
    opt_state = abstract(jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params))
    state = {"params": per_device_bytes(params), "optimizer state": per_device_bytes(opt_state)}
    if g.kl_active and not g.ref_in_host_memory:
        state["reference policy"] = state["params"]
    layout = engine.plan(cfg, s, rows=rows, longest_prompt=int(config.data.max_prompt_length), mesh=mesh, rules=rules)
    terms = _analytic(cfg, settings, state, dict(mesh.shape), rows, prompt, response, dp,
                      engine.kv_cache_bytes(cfg, layout, mesh, rules)[1], layout.slots, layout.pages_per_seq * layout.page_size)
    resident_all = sum(state.values())

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules))

    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    programs = []

    # the rollout engine (its own layout: every device a shard with a replicated compute-dtype copy of the
    # weights, see engine.rollout_mesh): its prefill of every slot at the longest prompt, then a decode chunk
    # over every slot reading full-length page tables
    during_rollout = resident_all
    fn, args, static = engine.prefill_program(cfg, s, layout, mesh, rules, width=prompt)
    prefill, _ = compile_program(
        "rollout prefill", fn, args, resident=during_rollout, static=static,
        analytic=resident_all + terms["rollout weights"] + terms["rollout KV cache"] + terms["prefill activations"])
    fn, args, static = engine.decode_program(cfg, s, layout, mesh, rules)
    decode, _ = compile_program(
        "rollout decode", fn, args, resident=during_rollout, static=static,
        analytic=resident_all + terms["rollout weights"] + terms["rollout KV cache"] + terms["decode working set"])
    programs += [prefill, decode]

    batch = {"input_ids": arr((rows, prompt + response), jnp.int32), "attention_mask": arr((rows, prompt + response), jnp.int32),
             "response_mask": arr((rows, response), jnp.int32), "rewards": arr((rows,), jnp.float32),
             "group_ids": arr((rows,), jnp.int32), "row_valid": arr((rows,), jnp.float32)}
    policy = qwen_policy(cfg, mesh, rules)
    logprobs_fn = jax.jit(lambda p, b: rollout_logprobs(p, b, policy=policy, settings=g))
    compute_copy = terms.get("compute-dtype params", 0)
    logprobs, old = compile_program(
        "log-probs", logprobs_fn, (params, batch), resident=resident_all - state["params"],
        analytic=resident_all + compute_copy + terms["log-prob activations"] + terms["logits chunk"])
    programs.append(logprobs)
    update_fn = jax.jit(lambda p, o, b, lp, ref, k: grpo_update(p, o, b, lp, ref, k, policy=policy, settings=g,
                                                                optimizer=optimizer), donate_argnums=(0, 1))
    update, _ = compile_program(
        "GRPO update", update_fn, (params, opt_state, batch, old, old if g.kl_active else None, key),
        resident=state.get("reference policy", 0),
        analytic=resident_all + terms["gradients"] + compute_copy + terms["update activations"] + terms["logits chunk"])
    programs.append(update)

    peak = max(programs, key=lambda p: p.peak)
    return Plan(target, tuple(programs), terms, advice(terms, peak.name, target.hbm_bytes, peak.peak, config))


def local_slice() -> Slice:
    """This job's own devices as a slice: their count and the memory limit the backend reports for one
    (on CPU, which reports none, the host's memory split over the local devices)."""
    import os

    devices = jax.devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if not limit:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, jax.local_device_count())
    return Slice(f"this job ({devices[0].platform})", len(devices), int(limit), jax.local_device_count())

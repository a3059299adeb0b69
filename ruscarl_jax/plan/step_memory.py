"""The plan of one training step of a config: its programs compiled on abstract inputs.

    plan = plan_config(config, parse_slice("v5p-64"))   # the TPU compiler, for a v5p-64's 32 chips
    print(plan.report())        # per program and device, ending "fits: yes|no (peak X GiB of Y GiB per device)"

The programs are the trainer's own (the rollout engine's prefill and decode chunk at the configured slots
and pages, MoE's rollout-routing pass, the log-prob pass, the GRPO update with the optimizer state),
lowered with the config's shapes and shardings: rows = data.batch_size x rollout.num_generations (global),
prompts at data.max_prompt_length (bucketed), responses at rollout.max_new_tokens, every slot prefilled at
once and decoding with a full-length page table, so the plan is of the worst step the config allows (and
its time prediction assumes every response runs to max_new_tokens).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from ruscarl_jax.models import hf_io, lora, presets, qwen
from ruscarl_jax.models.sharding import batch_sharding, data_parallel_size, make_mesh
from ruscarl_jax.rl.optimizer import make_optimizer, opt_state_shardings
from ruscarl_jax.rl.policy import qwen_policy
from ruscarl_jax.rl.routing import experts_shape, make_routing_pass, routing_needed
from ruscarl_jax.rl.train_step import ROUTING_KEY, grpo_update, rollout_logprobs
from ruscarl_jax.sampler import engine
from ruscarl_jax.sampler.settings import bucket_length
from ruscarl_jax.plan.memory_plan import (Plan, Slice, StepModel, abstract, advice, compile_program, dtype_bytes,
                                          per_device_bytes, rows_per_device)
from ruscarl_jax.trainer import config as config_lib
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
              rows: int, prompt: int, response: int, dp: int, kv_bytes: int, slots: int, max_len: int,
              trainable: int | None = None) -> dict[str, int]:
    g, tensor = settings.grpo, mesh_shape.get("tensor", 1)
    cb = dtype_bytes(g.compute_dtype)
    width = prompt + response
    param_elems = state["params"] // dtype_bytes(cfg.param_dtype)
    trainable = param_elems if trainable is None else trainable  # LoRA: the adapters' element count
    terms = dict(state)
    terms["gradients"] = trainable * (4 + cb)  # the float32 sum over micro-batches and one micro-batch's
    if trainable != param_elems:  # LoRA: the float32 adapters are cast, the base is stored in the compute dtype
        if g.compute_dtype != "float32":
            terms["compute-dtype params"] = trainable * cb
    elif g.compute_dtype != cfg.param_dtype:
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
    lp_rows, lp_width = rows_per_device(g.logprob_rows, dp), width
    if g.packed:  # packing: one buffer of the token budget per device and micro-batch (rl/packing.py)
        micro, width, lp_rows, lp_width = 1, g.micro_token_budget, 1, g.logprob_budget
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
    terms["log-prob activations"] = _layer_working_set(cfg, lp_rows, lp_width, lp_width, tensor, cb)
    return terms


def active_params(cfg: qwen.QwenConfig) -> int:
    """Parameters a token passes through (a MoE layer's top-k experts only)."""
    idle = sum(cfg.sparse_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return cfg.num_params - (idle if cfg.is_moe else 0)


def _target_mesh(config: ml_collections.ConfigDict, target: Slice, devices: list[jax.Device] | None,
                 backend: str) -> tuple[Any, str]:
    """The mesh to compile for and what compiles: the TPU compiler for a TPU slice (unless backend='cpu'),
    else the given / this process's devices (emulated CPU devices for a GPU slice)."""
    if target.tpu and backend != "cpu" and devices is None:
        from ruscarl_jax.plan import topology

        mesh = topology.tpu_mesh(target.name, dict(config.mesh))
        return mesh, f"the TPU compiler (libtpu), topology {topology.tpu_topology(target.name).topology_name}"
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < target.devices:
        raise ValueError(f"the plan of {target.name} needs {target.devices} devices; this process has {len(devices)} "
                         f"(start it with XLA_FLAGS=--xla_force_host_platform_device_count={target.devices})")
    mesh = make_mesh(dict(config.mesh), devices[: target.devices])
    platform = devices[0].platform
    if platform == "cpu" and target.family:
        kind = "GPU slices cannot be cross-compiled" if not target.tpu else "--backend=cpu"
        return mesh, f"emulated CPU devices ({kind}: XLA's CPU buffer assignment and kernels stand in for the {target.family}'s)"
    return mesh, f"this job's {platform} devices"


def plan_config(config: ml_collections.ConfigDict, target: Slice, devices: list[jax.Device] | None = None,
                backend: str = "auto") -> Plan:
    """Compile the step's programs for `config` on `target`; the Plan. A TPU slice compiles with the TPU
    compiler for its topology (backend='cpu': on emulated CPU devices); otherwise on the first
    `target.devices` of `devices` (default: this job's). Several processes (trainer.plan_only) plan the
    global step: every slot and row of the job."""
    processes = jax.process_count()
    settings = config_lib.validate(config, num_devices=target.devices, process_count=processes, check_paths=False)
    mesh, compiled_by = _target_mesh(config, target, devices, backend)
    if mesh.devices.flat[0].platform != "tpu":
        return _plan(config, target, settings, mesh, compiled_by, processes)
    # compile-only TPU executables cannot be read back from JAX's persistent cache on this host: keep them out
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _plan(config, target, settings, mesh, compiled_by, processes)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)


def _plan(config: ml_collections.ConfigDict, target: Slice, settings: config_lib.RunSettings, mesh: Any,
          compiled_by: str, processes: int) -> Plan:
    rules = rules_from_config(config)
    cfg = model_config(config)
    g, s = settings.grpo, settings.sampling
    rows = int(config.data.batch_size) * int(config.rollout.num_generations)
    prompt = bucket_length(int(config.data.max_prompt_length), s.prompt_bucket_min, s.prompt_bucket_steps)
    response = s.max_new_tokens
    dp = data_parallel_size(mesh, rules)

    replicated = NamedSharding(mesh, PartitionSpec())
    params = abstract(qwen.param_shapes(cfg), qwen.param_shardings(cfg, mesh, rules))
    if settings.lora.enabled:  # frozen (int8) base + float32 adapters; no reference copy (the base is it)
        params = lora.abstract_state(params, qwen.param_logical_axes(cfg), settings.lora, mesh, rules)
    trainable = lora.split(params)[0]
    optimizer = make_optimizer(settings.optim)
    opt_state = abstract(jax.eval_shape(optimizer.init, trainable), opt_state_shardings(optimizer, trainable))
    state = {"params": per_device_bytes(params), "optimizer state": per_device_bytes(opt_state)}
    if g.kl_active and not g.ref_in_host_memory and not settings.lora.enabled:
        state["reference policy"] = state["params"]
    # the engine plans each process's share of the rows and slots; the step's programs hold every process's
    layout = engine.plan(cfg, s, rows=-(-rows // processes), longest_prompt=int(config.data.max_prompt_length),
                         mesh=mesh, rules=rules)
    slots = layout.slots * processes
    terms = _analytic(cfg, settings, state, dict(mesh.shape), rows, prompt, response, dp,
                      engine.kv_cache_bytes(cfg, layout, mesh, rules)[1], slots, layout.pages_per_seq * layout.page_size,
                      trainable=lora.count(trainable) if settings.lora.enabled else None)
    resident_all = sum(state.values())

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules))

    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    programs = []
    compile_ = functools.partial(compile_program, num_devices=target.devices)

    # the rollout engine (its own layout: every device a shard with a replicated compute-dtype copy of the
    # weights, see engine.rollout_mesh): its prefill of every slot at the longest prompt, then a decode chunk
    # over every slot reading full-length page tables. Per step it admits the rows in ceil(rows / slots)
    # waves, each decoding up to max_new_tokens steps. (With LoRA the engine's weights are the base with the
    # adapters inserted; the programs are planned with the plain model's weights.)
    during_rollout = resident_all
    waves = -(-rows // slots)
    fn, args, static = engine.prefill_program(cfg, s, layout, mesh, rules, width=prompt)
    prefill, _ = compile_(
        "rollout prefill", fn, args, resident=during_rollout, static=static, calls=waves,
        analytic=resident_all + terms["rollout weights"] + terms["rollout KV cache"] + terms["prefill activations"])
    fn, args, static = engine.decode_program(cfg, s, layout, mesh, rules)
    decode, _ = compile_(
        "rollout decode", fn, args, resident=during_rollout, static=static, calls=waves * response / layout.check_every,
        analytic=resident_all + terms["rollout weights"] + terms["rollout KV cache"] + terms["decode working set"])
    # its time: XLA's cost analysis charges the paged-attention kernel every layer's whole page pool and counts
    # a loop body once, so neither its bytes nor its optimal_seconds scale to a decode step; the step reads the
    # chip's rollout weights and its own slots' pages, at the mean context of a wave whose rows all run to the
    # limit (prompt + half the response)
    step_bytes = engine.decode_step_hbm_bytes(cfg, layout, context=prompt + response / 2)
    decode = dataclasses.replace(decode, iterations=waves * response, hbm_bytes=step_bytes * layout.check_every,
                                 cost_model_s=0.0)
    programs += [prefill, decode]

    batch = {"input_ids": arr((rows, prompt + response), jnp.int32), "attention_mask": arr((rows, prompt + response), jnp.int32),
             "response_mask": arr((rows, response), jnp.int32), "rewards": arr((rows,), jnp.float32),
             "group_ids": arr((rows,), jnp.int32), "row_valid": arr((rows,), jnp.float32)}
    policy = qwen_policy(cfg, mesh, rules)
    if routing_needed(cfg.is_moe, g):
        # MoE with routing replay or the mismatch metric: the rollout-routing pass (rl/routing.py, in the log-prob
        # pass's micro-batches) records each response token's experts, which the update is given
        tokens = arr((rows, prompt + response), jnp.int32)
        routing, _ = compile_(
            "rollout routing", make_routing_pass(policy, g), (params, tokens, tokens), resident=resident_all - state["params"],
            static={"response_len": response}, analytic=resident_all + terms["log-prob activations"])
        programs.append(routing)
        batch[ROUTING_KEY] = arr(experts_shape(cfg, rows, response), jnp.int32)
    logprobs_fn = jax.jit(lambda p, b: rollout_logprobs(p, b, policy=policy, settings=g))
    compute_copy = terms.get("compute-dtype params", 0)
    logprobs, old = compile_(
        "log-probs", logprobs_fn, (params, batch), resident=resident_all - state["params"],
        calls=2 if g.kl_active else 1,  # the policy's, and the reference's when the KL loss is on
        analytic=resident_all + compute_copy + terms["log-prob activations"] + terms["logits chunk"])
    programs.append(logprobs)
    update_fn = jax.jit(lambda p, o, b, lp, ref, k: grpo_update(p, o, b, lp, ref, k, policy=policy, settings=g,
                                                                optimizer=optimizer), donate_argnums=(0, 1))
    update, _ = compile_(
        "GRPO update", update_fn, (params, opt_state, batch, old, old if g.kl_active else None, key),
        resident=state.get("reference policy", 0),
        analytic=resident_all + terms["gradients"] + compute_copy + terms["update activations"] + terms["logits chunk"])
    programs.append(update)

    peak = max(programs, key=lambda p: p.peak)
    from ruscarl_jax.plan import roofline

    step = StepModel(rows, response, target.devices,
                     6.0 * active_params(cfg) * rows * (prompt + response) * g.ppo_epochs)
    return Plan(target, tuple(programs), terms, advice(terms, peak.name, target.hbm_bytes, peak.peak, config),
                compiled_by, roofline.CHIPS.get(target.family), step)


def local_slice() -> Slice:
    """This job's own devices as a slice: their count and the memory limit the backend reports for one
    (on CPU, which reports none, the host's memory split over the local devices)."""
    import os

    devices, local = jax.devices(), jax.local_devices()[0]  # memory stats: of an addressable device
    stats = local.memory_stats() if hasattr(local, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    if not limit:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, jax.local_device_count())
    return Slice(f"this job ({devices[0].platform})", len(devices), int(limit), jax.local_device_count())

"""The rollout engine: continuous batching over a fixed number of sequence slots and a paged KV cache.

Host loop (one iteration per ``check_every`` decode steps, never per token):

1. every running slot gets the pages its next chunk writes; if its page group is out of pages, the
   most recently admitted sequence of that group is preempted: its pages are freed and its prompt
   goes back to the front of the queue (it is recomputed later: its draws are keyed by (row seed,
   token index), so it comes out the same);
2. free slots take prompts from the queue while their group has pages for the prompt and one chunk;
3. the admitted prompts are prefilled together (jitted; they attend to themselves and are written
   into their pages) and sample their first token;
4. one jitted decode chunk of up to ``check_every`` steps runs over the occupied slots, packed per page
   group to a power-of-two count (a ``lax.while_loop`` that exits early once no slot is running), so
   the batch shrinks in the tail; finished slots free their pages.

The layer maths is the model's (``qwen.forward_paged``: the training forward's layer code). Several
processes run the loop in lockstep: the shapes of each iteration's prefill and decode chunk are
agreed with one small all-gather, and each process schedules only its own rows and slots.

Rollout layout (``rollout_mesh``): every device is a data-parallel shard of its own, holding a
replicated compute-dtype copy of the policy (resharded from the training layout once per call by one
jitted all-gather, ``rollout_params``), its own slots and its own page group of the cache. Prefill and
the decode chunk run under ``jax.shard_map``: page writes, paged attention (the platform's Pallas
kernel where it fits) and sampling are local; each shard's loop ends when its own slots are done, and
only tokens, log-probs and step counts come back to the host. No weight and no page crosses devices
per token.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ruscarl_jax.models import qwen
from ruscarl_jax.models.attention import pallas_misfit
from ruscarl_jax.models.sharding import DEFAULT_RULES, Rules, global_to_host, host_to_global, platform
from ruscarl_jax.sampler.filtering import sample_tokens, sampled_logprobs
from ruscarl_jax.sampler.layout import cast_params, rollout_mesh, rollout_params, shard_axis
from ruscarl_jax.sampler.pages import PageTable
from ruscarl_jax.sampler.settings import SamplingSettings, bucket_length, round_up


@dataclasses.dataclass(frozen=True)
class Layout:
    """The engine's shapes for one generate call (identical on every process)."""

    groups: int  # page groups of the whole job: one per data-parallel shard
    local_groups: int  # page groups of this process
    slots: int  # sequence slots of this process (its share of rollout.engine.slots)
    page_size: int
    pages_per_group: int
    max_len: int  # prompt + response tokens a slot can hold
    check_every: int
    cache_dtype: str

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.max_len / self.page_size)

    def cache_shape(self, cfg: qwen.QwenConfig) -> tuple[int, ...]:
        return (cfg.num_layers, self.groups, cfg.num_kv_heads, self.pages_per_group, self.page_size, cfg.head_dim)


def agree(*values: int) -> tuple[int, ...]:
    """Element-wise maxima over all processes (a tiny all-gather; free on one process)."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return tuple(int(v) for v in gathered.reshape(-1, len(values)).max(axis=0))


def plan(cfg: qwen.QwenConfig, settings: SamplingSettings, *, rows: int, longest_prompt: int, mesh: Mesh | None,
         rules: Rules = DEFAULT_RULES) -> Layout:
    """Slots, pages and page size for `rows` prompts per process (the longest `longest_prompt` tokens).
    Without ``max_seq_len`` a slot holds the prompt bucket (settings.bucket_length) + max_new_tokens, so
    calls whose prompts fall in one bucket share compiled programs. A page budget too small for one
    sequence is an error naming its config key."""
    e, r = settings.engine, settings.max_new_tokens
    if e.attention == "pallas":
        why = pallas_misfit(platform(mesh), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, e.page_size)
        if why:
            raise ValueError(f"rollout.engine.attention='pallas': {why}")
    groups = mesh.devices.size if mesh is not None else 1  # one page group per device (see rollout_mesh)
    local = max(1, groups // jax.process_count())
    width = bucket_length(longest_prompt, settings.prompt_bucket_min, settings.prompt_bucket_steps)
    max_len = e.max_seq_len or width + r
    cache_dtype = e.cache_dtype or cfg.dtype
    if e.schedule == "static":  # every row at once, one page per row, one chunk to the end
        slots = round_up(rows, local)
        return Layout(groups, local, slots, max_len, slots // local, max_len, r, cache_dtype)
    # slots and num_pages count the whole job (like every batch size); each process takes its share
    slots = round_up(-(-e.slots // jax.process_count()) if e.slots else rows, local)
    per_seq = math.ceil(max_len / e.page_size)
    page_bytes = e.page_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)
    if e.num_pages:
        per_group, key = e.num_pages // groups, "num_pages"
    elif e.memory_gb:
        per_group, key = int(e.memory_gb * 1e9 // page_bytes), "memory_gb"
    else:
        per_group, key = slots // local * per_seq, "slots"
    if per_group < per_seq:
        raise ValueError(
            f"rollout.engine.{key}: {per_group} pages of {e.page_size} tokens per data-parallel shard cannot hold one "
            f"sequence of max_seq_len {max_len} (prompt width {width} + max_new_tokens {r}), which needs {per_seq} pages")
    return Layout(groups, local, slots, e.page_size, per_group, max_len, e.check_every, cache_dtype)


def kv_cache_bytes(cfg: qwen.QwenConfig, layout: Layout, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> tuple[int, int]:
    """(bytes of the whole paged cache, bytes per device) of a layout."""
    width = jnp.dtype(layout.cache_dtype).itemsize
    total = 2 * math.prod(layout.cache_shape(cfg)) * width
    return total, total // layout.groups


def decode_step_hbm_bytes(cfg: qwen.QwenConfig, layout: Layout, context: float) -> float:
    """HBM bytes one decode step reads per device in the rollout layout: the device's replicated copy of the
    weights in the model dtype, and its own slots' KV pages at `context` tokens each. A MoE layer reads only
    the experts its slots route to: of E experts with top-k routing, S tokens touch E(1 - (1 - k/E)^S) in
    expectation under uniform routing. The time model of the decode step (the planner, the rollout
    benchmark); the XLA cost model cannot see inside the paged-attention kernel."""
    slots = layout.slots // layout.local_groups
    weights = float(cfg.num_params)
    sparse = sum(cfg.sparse_layers)
    if sparse:
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        idle = e - e * (1 - (1 - k / e) ** slots)
        weights -= sparse * idle * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    kv = slots * context * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(layout.cache_dtype).itemsize
    return weights * jnp.dtype(cfg.dtype).itemsize + kv


# ----------------------------------------------------------------------------------------- device side

def _init_cache(cfg, layout, mesh, rules):
    cache = qwen.init_paged_cache(cfg, layout.groups, layout.pages_per_group, layout.page_size, layout.cache_dtype)
    if mesh is None:
        return cache
    return {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, PartitionSpec(None, shard_axis(mesh))))
            for k, v in cache.items()}


def _sharded(local, mesh: Mesh | None, in_kinds: str, out_kinds: str):
    """`local` (one shard's program) over the rollout mesh's shards: kinds per argument / output, "r" for
    replicated (weights, keys), "b" for split on the leading (slot) axis, "c" for the paged cache (split on
    its page-group axis). Without a mesh `local` runs as it is (one shard)."""
    if mesh is None:
        return local
    axis = shard_axis(mesh)
    spec = {"r": PartitionSpec(), "b": PartitionSpec(axis), "c": PartitionSpec(None, axis)}
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec[k] for k in in_kinds),
                         out_specs=tuple(spec[k] for k in out_kinds), check_vma=False)


def _sample(params, cfg, hidden, seeds, t, rng, s: SamplingSettings):
    """Token t of each row, drawn with fold_in(fold_in(rng, seed), t), and its log-prob at the sampling
    temperature before top-k / top-p: a row's draw depends on its seed and index, not its slot."""
    w = qwen.output_embedding(params, cfg)
    logits = jnp.einsum("ne,ev->nv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    keys = jax.vmap(lambda seed, ti: jax.random.fold_in(jax.random.fold_in(rng, seed), ti))(seeds, t)
    tok = jax.vmap(lambda k, row: sample_tokens(k, row, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                 greedy=s.greedy))(keys, logits)
    return tok.astype(jnp.int32), sampled_logprobs(logits, tok, 1.0 if s.greedy else s.temperature)


def _prefill(params, cache, tokens, mask, table, seeds, rng, *, cfg, settings, layout, mesh, rules):
    """Prompts [A, P] (left padded) written into their pages; their first sampled token and log-prob.
    Each shard prefills its own rows into its own page group."""
    def local(params, cache, tokens, mask, table, seeds, rng):
        positions = qwen.default_positions(mask)
        page = jnp.take_along_axis(table, positions // layout.page_size, axis=1)
        ctx = dict(kv_mask=mask, write_page=jnp.where(mask.astype(bool), page, layout.pages_per_group),
                   write_offset=positions % layout.page_size)
        hidden, cache = qwen.forward_paged(params, cfg, tokens, positions, cache, ctx,
                                           paged_attention=settings.engine.attention)
        tok, logp = _sample(params, cfg, hidden[:, -1], seeds, jnp.zeros_like(seeds, jnp.int32), rng, settings)
        return cache, tok, logp

    return _sharded(local, mesh, "rcbbbbr", "cbb")(params, cache, tokens, mask, table, seeds, rng)


def _decode(params, cache, last, pos, t, active, seeds, table, rng, *, cfg, settings, layout, mesh, rules):
    """Up to `check_every` decode steps over all slots: feed `last` at `pos`, sample token t.
    Returns the cache, tokens / log-probs [S, check_every] (pad / 0 for idle slots) and the steps each
    shard ran [shards]: a shard's loop ends when its own slots are done (no collective in the loop)."""
    k, r = layout.check_every, settings.max_new_tokens
    stops = jnp.asarray(settings.stop_token_ids or (-1,), jnp.int32)

    def local(params, cache, last, pos, t, active, seeds, table, rng):
        s = last.shape[0]

        def body(carry):
            i, cache, last, pos, t, active, out_tok, out_logp = carry
            page = jnp.take_along_axis(table, (pos // layout.page_size)[:, None], axis=1, mode="clip")
            ctx = dict(write_page=jnp.where(active[:, None], page, layout.pages_per_group),
                       write_offset=(pos % layout.page_size)[:, None], page_table=table,
                       lengths=jnp.where(active, pos + 1, 0))
            hidden, cache = qwen.forward_paged(params, cfg, last[:, None], pos[:, None], cache, ctx,
                                               paged_attention=settings.engine.attention)
            tok, logp = _sample(params, cfg, hidden[:, 0], seeds, t, rng, settings)
            tok = jnp.where(active, tok, settings.pad_token_id)
            out_tok = out_tok.at[:, i].set(tok)
            out_logp = out_logp.at[:, i].set(jnp.where(active, logp, 0.0))
            running = active & ~jnp.isin(tok, stops) & (t + 1 < r)
            step = active.astype(jnp.int32)
            return i + 1, cache, jnp.where(active, tok, last), pos + step, t + step, running, out_tok, out_logp

        carry = (jnp.int32(0), cache, last, pos, t, active, jnp.full((s, k), settings.pad_token_id, jnp.int32),
                 jnp.zeros((s, k), jnp.float32))
        i, cache, *_, out_tok, out_logp = jax.lax.while_loop(lambda c: (c[0] < k) & jnp.any(c[5]), body, carry)
        return cache, out_tok, out_logp, i[None]

    return _sharded(local, mesh, "rcbbbbbbr", "cbbb")(params, cache, last, pos, t, active, seeds, table, rng)


_STATIC = ("cfg", "settings", "layout", "mesh", "rules")
_init_cache_jit = jax.jit(_init_cache, static_argnums=(0, 1, 2, 3))
_prefill_jit = jax.jit(_prefill, static_argnames=_STATIC, donate_argnames=("cache",))
_decode_jit = jax.jit(_decode, static_argnames=_STATIC, donate_argnames=("cache",))


def _abstract(cfg, layout, mesh, rules):
    """Abstract rollout weights, cache and helpers on the rollout mesh of `mesh` (see the *_program functions)."""
    rmesh = rollout_mesh(mesh, rules)
    ns = (lambda spec: None) if rmesh is None else (lambda spec: NamedSharding(rmesh, spec))  # noqa: E731
    axis = None if rmesh is None else shard_axis(rmesh)
    arg = lambda shape, dtype, spec=PartitionSpec(axis): jax.ShapeDtypeStruct(shape, dtype, sharding=ns(spec))  # noqa: E731
    params = jax.tree.map(lambda x: arg(x.shape, cfg.dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                        PartitionSpec()), qwen.param_shapes(cfg))
    cache = {n: arg(layout.cache_shape(cfg), layout.cache_dtype, PartitionSpec(None, axis)) for n in ("k", "v")}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=ns(PartitionSpec()))
    static = dict(cfg=cfg, layout=layout, mesh=rmesh, rules=rules)
    return params, cache, key, arg, static, layout.slots * (layout.groups // layout.local_groups)


def decode_program(cfg: qwen.QwenConfig, settings: SamplingSettings, layout: Layout, mesh: Mesh | None,
                   rules: Rules = DEFAULT_RULES, width: int | None = None) -> tuple[Any, tuple, dict]:
    """(jitted decode chunk, abstract arguments, static arguments) of a layout on the rollout mesh of the
    training mesh `mesh`, every slot of the job reading `width` pages (default: a full-length table): what
    a planner compiles with ``fn.lower(*args, **static).compile()``."""
    params, cache, key, arg, static, a = _abstract(cfg, layout, mesh, rules)
    args = (params, cache, arg((a,), jnp.int32), arg((a,), jnp.int32), arg((a,), jnp.int32), arg((a,), jnp.bool_),
            arg((a,), jnp.uint32), arg((a, width or layout.pages_per_seq), jnp.int32), key)
    return _decode_jit, args, dict(static, settings=settings)


def prefill_program(cfg: qwen.QwenConfig, settings: SamplingSettings, layout: Layout, mesh: Mesh | None,
                    rules: Rules = DEFAULT_RULES, width: int = 0) -> tuple[Any, tuple, dict]:
    """As `decode_program`, for the prefill of every slot at a prompt width of `width` tokens."""
    params, cache, key, arg, static, a = _abstract(cfg, layout, mesh, rules)
    pages = -(-width // layout.page_size)
    args = (params, cache, arg((a, width), jnp.int32), arg((a, width), jnp.int32), arg((a, pages), jnp.int32),
            arg((a,), jnp.uint32), key)
    return _prefill_jit, args, dict(static, settings=settings)


# ------------------------------------------------------------------------------------------- host side

def _pow2(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Slot:
    row: int
    order: int  # admission counter: the latest admitted is preempted first
    last: int
    pos: int  # tokens held in the cache; `last` goes to this position next
    t: int  # index of the next token to sample
    tokens: list[int]
    logprobs: list[float]


class Interrupted(Exception):
    """A generate call abandoned because its `interrupt` callback answered True (e.g. a preemption)."""


class _Engine:
    """One generate call's scheduler state (host numpy), see the module docstring."""

    def __init__(self, params, cfg, rows, seeds, rng, settings, layout, mesh, rules, interrupt=None,
                 priority=None) -> None:
        self.interrupt = interrupt
        self.params, self.cfg, self.rows, self.seeds, self.rng = params, cfg, rows, seeds, rng
        self.s, self.layout, self.mesh, self.rules = settings, layout, mesh, rules
        self.pages = PageTable(layout.local_groups, layout.slots, layout.pages_per_group, layout.page_size)
        self.slots: list[_Slot | None] = [None] * layout.slots
        order = range(len(rows)) if priority is None else np.argsort(-np.asarray(priority, np.float64), kind="stable")
        self.queue = collections.deque(int(i) for i in order)
        per = layout.slots // layout.local_groups  # free slots are filled round-robin over the page groups
        self.fill_order = sorted(range(layout.slots), key=lambda i: (i % per, i // per))
        r = settings.max_new_tokens
        self.tokens = np.full((len(rows), r), settings.pad_token_id, np.int32)
        self.logprobs = np.zeros((len(rows), r), np.float32)
        self.stopped = np.zeros(len(rows), bool)
        self.admissions = 0
        self.preemptions = 0
        self.decode_steps = 0  # decode steps run (each over all slots)
        self.pages_read = 0  # KV pages the decode steps read (slots x page-table width, per step)
        self.static = dict(cfg=cfg, settings=settings, layout=layout, mesh=mesh, rules=rules)

    def _put(self, tree: dict) -> Any:
        return tree if self.mesh is None else host_to_global(tree, self.mesh, self.rules)

    def _get(self, tree: dict) -> dict:
        return jax.tree.map(np.asarray, tree) if self.mesh is None else global_to_host(tree, self.mesh, self.rules)

    def _budget(self, slot: _Slot) -> int:
        """Tokens the slot holds after one more chunk (the last sampled token is never written)."""
        prompt = len(self.rows[slot.row])
        return min(slot.pos + self.layout.check_every, prompt + self.s.max_new_tokens - 1, self.layout.max_len)

    def _finish(self, index: int, stopped: bool) -> None:
        slot = self.slots[index]
        n = len(slot.tokens)
        self.tokens[slot.row, :n] = slot.tokens
        self.logprobs[slot.row, :n] = slot.logprobs
        self.stopped[slot.row] = stopped
        self.pages.release(index)
        self.slots[index] = None

    def _record(self, index: int, token: int, logprob: float) -> bool:
        """Append a sampled token to the slot's response; True if that ended it."""
        slot = self.slots[index]
        slot.tokens.append(int(token))
        slot.logprobs.append(float(logprob))
        stop = int(token) in self.s.stop_token_ids
        if stop or len(slot.tokens) == self.s.max_new_tokens:
            self._finish(index, stop)
            return True
        return False

    def _reserve(self) -> None:
        """Pages for every running slot's next chunk; preempt the latest admitted of a group that runs out."""
        running = sorted((i for i, sl in enumerate(self.slots) if sl is not None), key=lambda i: self.slots[i].order)
        for i in running:
            while self.slots[i] is not None and not self.pages.grow(i, self._budget(self.slots[i])):
                group = self.pages.group_of(i)
                victim = max((j for j, sl in enumerate(self.slots) if sl is not None and self.pages.group_of(j) == group),
                             key=lambda j: self.slots[j].order)
                self.queue.appendleft(self.slots[victim].row)
                self.pages.release(victim)
                self.slots[victim] = None
                self.preemptions += 1

    def _admit(self) -> list[int]:
        """Fill free slots from the queue while their group has pages for the prompt and one chunk."""
        admitted = []
        for i in self.fill_order:
            if not self.queue:
                break
            if self.slots[i] is not None:
                continue
            row = self.queue[0]
            prompt = len(self.rows[row])
            need = min(prompt + self.layout.check_every, prompt + self.s.max_new_tokens - 1, self.layout.max_len)
            if not self.pages.grow(i, max(need, prompt)):
                continue
            self.queue.popleft()
            self.slots[i] = _Slot(row, self.admissions, 0, prompt, 1, [], [])
            self.admissions += 1
            admitted.append(i)
        return admitted

    def _prefill(self, admitted: list[int], per_group: int, width: int) -> None:
        g, per = self.layout.local_groups, self.layout.slots // self.layout.local_groups
        a = g * per_group
        tokens = np.full((a, width), self.s.pad_token_id, np.int32)
        mask = np.zeros((a, width), np.int32)
        table = np.zeros((a, math.ceil(width / self.layout.page_size)), np.int32)
        seeds = np.zeros(a, np.uint32)
        where: dict[int, int] = {}
        fill = [0] * g
        for i in admitted:
            group = i // per
            r = group * per_group + fill[group]
            fill[group] += 1
            where[i] = r
            prompt = self.rows[self.slots[i].row]
            tokens[r, width - prompt.size:] = prompt
            mask[r, width - prompt.size:] = 1
            table[r] = self.pages.rows([i], table.shape[1], 0)[0]
            seeds[r] = self.seeds[self.slots[i].row]
        inputs = self._put(dict(tokens=tokens, mask=mask, table=table, seeds=seeds))
        self.cache, tok, logp = _prefill_jit(self.params, self.cache, inputs["tokens"], inputs["mask"], inputs["table"],
                                             inputs["seeds"], self.rng, **self.static)
        out = self._get(dict(tok=tok, logp=logp))
        for i, r in where.items():
            self.slots[i].last = int(out["tok"][r])
            self._record(i, out["tok"][r], out["logp"][r])

    def _occupied(self) -> list[list[int]]:
        """The occupied slots of each page group of this process."""
        per = self.layout.slots // self.layout.local_groups
        return [[i for i in range(g * per, (g + 1) * per) if self.slots[i] is not None]
                for g in range(self.layout.local_groups)]

    def _decode(self, per_group: int, width: int) -> None:
        """One decode chunk over the occupied slots only, packed `per_group` per page group (idle rows
        pad each group's block): as sequences finish and the queue runs dry the batch shrinks."""
        rows = [i for group in self._occupied() for i in (group + [-1] * per_group)[:per_group]]
        live = [i >= 0 and self.slots[i] is not None for i in rows]
        slots = [self.slots[i] if ok else None for i, ok in zip(rows, live)]
        pick = lambda field: np.asarray([getattr(sl, field) if sl else 0 for sl in slots], np.int32)  # noqa: E731
        seeds = np.asarray([self.seeds[sl.row] if sl else 0 for sl in slots], np.uint32)
        table = np.asarray([self.pages.rows([i], width, 0)[0] if ok else [0] * width for i, ok in zip(rows, live)],
                           np.int32).reshape(len(rows), width)
        inputs = self._put(dict(last=pick("last"), pos=pick("pos"), t=pick("t"), active=np.asarray(live), seeds=seeds,
                                table=table))
        self.cache, tok, logp, steps = _decode_jit(self.params, self.cache, inputs["last"], inputs["pos"], inputs["t"],
                                                   inputs["active"], inputs["seeds"], inputs["table"], self.rng, **self.static)
        out = self._get(dict(tok=tok, logp=logp, steps=steps))
        steps = out["steps"]  # decode steps each of this process's shards ran
        self.decode_steps += int(steps.max())
        self.pages_read += int(steps.sum()) * per_group * width
        for r, (i, alive) in enumerate(zip(rows, live)):
            for j in range(steps[r // per_group] if alive else 0):
                slot = self.slots[i]
                slot.last, slot.pos, slot.t = int(out["tok"][r, j]), slot.pos + 1, slot.t + 1
                if self._record(i, out["tok"][r, j], out["logp"][r, j]):
                    break

    def run(self) -> None:
        self.cache = _init_cache_jit(self.cfg, self.layout, self.mesh, self.rules)
        per = self.layout.slots // self.layout.local_groups
        while True:
            self._reserve()
            admitted = self._admit()
            counts = collections.Counter(i // per for i in admitted)
            longest = max((len(self.rows[self.slots[i].row]) for i in admitted), default=0)
            held = max((len(p) for p in self.pages.held), default=0)
            busy = max(len(group) for group in self._occupied())
            work = bool(self.queue) or busy > 0
            per_group, longest, held, busy, work = agree(max(counts.values(), default=0), longest, held, busy, int(work))
            if not work:
                return
            if self.interrupt is not None and self.interrupt():  # asked once per agreed iteration, on every process
                raise Interrupted(f"sampling interrupted after {self.decode_steps} decode steps")
            if per_group:
                width = bucket_length(longest, self.s.prompt_bucket_min, self.s.prompt_bucket_steps)
                self._prefill(admitted, _pow2(per_group, per), width)
            self._decode(_pow2(max(busy, 1), per), _pow2(max(held, 1), self.layout.pages_per_seq))


def run(params: qwen.Params, cfg: qwen.QwenConfig, rows: Sequence[np.ndarray], seeds: np.ndarray, rng: jax.Array,
        settings: SamplingSettings, layout: Layout, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
        interrupt: Callable[[], bool] | None = None, priority: Sequence[float] | None = None,
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Sample every row (this process's prompts as id arrays): tokens [N, R], log-probs [N, R], stopped [N]
    and counters (admissions, preemptions, decode_steps: the most any shard of this process ran,
    pages_read). `mesh` is the training mesh: the policy is resharded once into the rollout layout
    (`rollout_mesh`). `priority` (e.g. an expected response length per row) admits higher rows first, so
    long rows do not start late and stretch the tail; default: the queue order. Every process must call
    it (with its own rows) the same number of times. `interrupt` is called once per scheduler iteration,
    after the iteration's all-gather, so every process asks it equally often; True raises Interrupted (on
    every process alike when its answer is agreed, as the trainer's preemption check is)."""
    rmesh = rollout_mesh(mesh, rules)
    engine = _Engine(rollout_params(params, cfg.dtype, rmesh), cfg, list(rows), seeds, rng, settings, layout, rmesh,
                     rules, interrupt, priority)
    engine.run()
    stats = {k: getattr(engine, k) for k in ("admissions", "preemptions", "decode_steps", "pages_read")}
    return engine.tokens, engine.logprobs, engine.stopped, stats

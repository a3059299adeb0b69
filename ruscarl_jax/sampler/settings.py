"""Sampling settings of the in-framework sampler, and the padding-bucket policy for prompts.

One frozen (hashable) dataclass: the jitted prefill / decode functions are specialised on it, so a
run whose settings stay fixed compiles once per bucketed shape.

Prompt bucket policy: the padded prompt width P is the longest prompt of the batch rounded up to the
next power of two, and at least ``prompt_bucket_min`` (default 64). Prompts of up to 4096 tokens thus
compile at most 7 prompt widths (64, 128, ..., 4096), and the padding costs at most 2x of the longest
prompt in prefill work. ``prompt_bucket_steps`` > 1 inserts that many equally spaced widths per
octave (e.g. 4: 64, 80, 96, 112, 128, 160, ...), trading more compiled shapes for less padding.
The batch N is padded up to a multiple of ``batch_bucket`` (and of the mesh's data-parallel size).
"""
from __future__ import annotations

import dataclasses
import math


SCHEDULES = ("continuous", "static")
PAGED_ATTENTION = ("auto", "jax", "pallas")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Memory and scheduling of the rollout engine (sampler/engine.py); config section rollout.engine.

    ``slots``: sequences decoded together, over all processes like every batch size (0 = one per
    prompt of the call). The KV cache holds ``num_pages`` pages of ``page_size`` tokens, over all
    data-parallel shards (0 = from ``memory_gb``, the cache budget per device; both 0 = enough for
    every slot at full length, so nothing is ever preempted).
    ``max_seq_len`` (prompt + response; 0 = the longest prompt of the call + max_new_tokens) sizes a
    slot's page table. The host looks for finished slots every ``check_every`` decode steps.
    ``cache_dtype`` ("" = the model's compute dtype) stores keys / values, e.g. "bfloat16".
    ``attention``: paged decode attention, "jax" (gather + dense attention, runs everywhere),
    "pallas" (the backend's kernel) or "auto". ``schedule="static"`` is the lockstep baseline: every
    row in a slot at once, one page per row, decoded until the longest row stops.
    """

    schedule: str = "continuous"
    slots: int = 0
    page_size: int = 16
    num_pages: int = 0
    memory_gb: float = 0.0
    max_seq_len: int = 0
    check_every: int = 16
    cache_dtype: str = ""
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"EngineSettings.schedule={self.schedule!r}: valid: {', '.join(SCHEDULES)}")
        if self.attention not in PAGED_ATTENTION:
            raise ValueError(f"EngineSettings.attention={self.attention!r}: valid: {', '.join(PAGED_ATTENTION)}")
        if self.cache_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"EngineSettings.cache_dtype={self.cache_dtype!r}: valid: '', 'float32', 'bfloat16'")
        for name in ("slots", "num_pages", "max_seq_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineSettings.{name}={getattr(self, name)}: must be >= 0 (0 = derived)")
        for name in ("page_size", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineSettings.{name}={getattr(self, name)}: must be >= 1")
        if not (math.isfinite(self.memory_gb) and self.memory_gb >= 0):
            raise ValueError(f"EngineSettings.memory_gb={self.memory_gb}: must be >= 0 (0 = derived)")

    def page_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int, compute_dtype: str) -> int:
        """Bytes of one page: keys and values of `page_size` tokens in every layer and KV head."""
        width = 2 if (self.cache_dtype or compute_dtype) == "bfloat16" else 4
        return 2 * num_layers * num_kv_heads * self.page_size * head_dim * width


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What and how to sample. ``top_k=0`` and ``top_p=1.0`` switch those filters off.

    Order of the filters: logits / temperature, then top-k, then top-p over the renormalised top-k
    distribution. ``greedy`` takes the arg-max (lowest token id among ties) and ignores the rest.
    Generation of a row ends at (and includes) its first token in ``stop_token_ids``; later slots
    hold ``pad_token_id``.
    """

    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    prompt_bucket_min: int = 64
    prompt_bucket_steps: int = 1
    batch_bucket: int = 1
    engine: EngineSettings = EngineSettings()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.engine, dict):
            object.__setattr__(self, "engine", EngineSettings(**self.engine))
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"SamplingSettings.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not self.greedy and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SamplingSettings.temperature={self.temperature}: must be > 0 (use greedy=True for arg-max)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingSettings.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingSettings.top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.pad_token_id < 0:
            raise ValueError(f"SamplingSettings.pad_token_id={self.pad_token_id}: must be >= 0")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingSettings.stop_token_ids={self.stop_token_ids}: ids must be >= 0")
        for name in ("prompt_bucket_min", "prompt_bucket_steps", "batch_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplingSettings.{name}={getattr(self, name)}: must be >= 1")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a stop or pad id is not a token of a vocabulary of `vocab_size`."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("pad_token_id", (self.pad_token_id,))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"SamplingSettings.{name}: id(s) {bad} are outside the model's vocabulary of {vocab_size}")


def bucket_length(n: int, minimum: int = 64, steps_per_octave: int = 1) -> int:
    """The padded width for a longest prompt of `n` tokens (see the module docstring)."""
    if n < 1:
        raise ValueError(f"bucket_length: n={n} must be >= 1")
    if n <= minimum:
        return minimum
    octave = 1 << ((n - 1).bit_length() - 1)  # largest power of two < n
    step = max(1, octave // steps_per_octave)
    return min(2 * octave, -(-n // step) * step)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple

"""Sequence packing: the rows of a rollout batch laid end to end in fixed-length token buffers, so the
log-prob pass and the update compute on real tokens instead of each row's padding.

A row of the batch (prompt left-padded to P, response right-padded to R) holds one contiguous span of
real tokens (its attention mask). The spans are packed first-fit-decreasing into buffers of `capacity`
tokens; each packed sequence gets its own segment id (so attention never crosses sequences, see
``models.attention.segment_causal``) and positions that restart at 0 (those of the unpacked row). The
packing runs inside the jitted program on the masks themselves (static shapes: as many buffers as rows,
the worst case, in the order first-fit fills them, so the trailing ones are empty and their
micro-batches are skipped), and is the same on every process.

Per-token results come back to the [rows, R] response layout with ``unpack_response``, so every loss,
aggregation mode and metric is computed by the same code on the same [rows, R] arrays as unpacked.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
    """Where each row's span went: buffer index (-1: not packed), offset of its first token in the buffer,
    first real column of the row, and the span's length (all [rows] int32)."""

    buffer: jax.Array
    offset: jax.Array
    start: jax.Array
    length: jax.Array


def spans(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First real column and number of real tokens of each row [N, T] (the real tokens are contiguous)."""
    real = attention_mask > 0
    length = real.sum(axis=-1).astype(jnp.int32)
    start = jnp.where(length > 0, jnp.argmax(real, axis=-1), 0).astype(jnp.int32)
    return start, length


def check_contiguous(attention_mask: np.ndarray) -> None:
    """Raise ValueError naming the first row whose real tokens are not one contiguous span (packing keeps
    only the span from its first to its last real token)."""
    mask = np.asarray(attention_mask) > 0
    length = mask.sum(axis=-1)
    first = np.argmax(mask, axis=-1)
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=-1)
    bad = np.nonzero((length > 0) & (last - first != length))[0]
    if bad.size:
        raise ValueError(f"rollout batch: 'attention_mask' row {int(bad[0])} has gaps between its real tokens; "
                         "packing (GRPOSettings.micro_token_budget) needs one contiguous span per row")


def first_fit(lengths: jax.Array, num_buffers: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """First-fit decreasing: (buffer [N], offset [N]) of spans of `lengths` [N] in `num_buffers` buffers of
    `capacity` tokens. Rows of length 0 (or that fit nowhere) get buffer -1."""
    n = lengths.shape[0]
    lengths = lengths.astype(jnp.int32)
    order = jnp.argsort(-lengths, stable=True)

    def place(i, state):
        free, buffer, offset = state
        row = order[i]
        size = lengths[row]
        fits = free >= size
        b = jnp.argmax(fits).astype(jnp.int32)
        ok = fits[b] & (size > 0)
        buffer = buffer.at[row].set(jnp.where(ok, b, -1))
        offset = offset.at[row].set(capacity - free[b])
        free = free.at[b].add(jnp.where(ok, -size, 0).astype(jnp.int32))
        return free, buffer, offset

    init = (jnp.full((num_buffers,), capacity, jnp.int32), jnp.full((n,), -1, jnp.int32), jnp.zeros((n,), jnp.int32))
    _, buffer, offset = jax.lax.fori_loop(0, n, place, init)
    return buffer, offset


def layout(attention_mask: jax.Array, keep: jax.Array, num_buffers: int, capacity: int) -> Layout:
    """The packing of the rows of `attention_mask` [N, T] whose `keep` [N] is true."""
    start, length = spans(attention_mask)
    length = jnp.where(keep, length, 0)
    buffer, offset = first_fit(length, num_buffers, capacity)
    return Layout(buffer, offset, start, length)


def pack(input_ids: jax.Array, lay: Layout, num_buffers: int, capacity: int
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens, segment ids (row index + 1; 0 = padding) and positions, each [num_buffers, capacity] int32."""
    n, t = input_ids.shape
    col = jnp.arange(t, dtype=jnp.int32)[None, :]
    rel = col - lay.start[:, None]
    inside = (rel >= 0) & (rel < lay.length[:, None]) & (lay.buffer[:, None] >= 0)
    dest = jnp.where(inside, lay.buffer[:, None] * capacity + lay.offset[:, None] + rel, num_buffers * capacity)

    def scatter(values):
        flat = jnp.zeros((num_buffers * capacity,), jnp.int32).at[dest.reshape(-1)].set(
            values.reshape(-1).astype(jnp.int32), mode="drop")
        return flat.reshape(num_buffers, capacity)

    segment = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32)[:, None], (n, t))
    return scatter(input_ids), scatter(segment), scatter(jnp.broadcast_to(rel, (n, t)))


def unpack_response(values: jax.Array, lay: Layout, prompt_width: int, response_len: int) -> jax.Array:
    """Per-position values [buffers, capacity] of the packed STATES (position p scores the token at p + 1)
    -> [N, response_len]: response token j of a row (column P + j) is scored by the state at column
    P + j - 1. Tokens outside a row's span (or rows not packed) get 0."""
    capacity = values.shape[1]
    j = jnp.arange(response_len, dtype=jnp.int32)[None, :]
    rel = prompt_width + j - 1 - lay.start[:, None]  # the scoring state, relative to the span
    valid = (rel >= 0) & (rel + 1 < lay.length[:, None]) & (lay.buffer[:, None] >= 0)
    flat = lay.buffer[:, None] * capacity + lay.offset[:, None] + rel
    got = values.reshape(-1)[jnp.clip(jnp.where(valid, flat, 0), 0, values.size - 1)]
    return jnp.where(valid, got, jnp.zeros((), values.dtype))


def num_buffers(rows: int, per_micro: int) -> int:
    """Buffers for `rows` rows: one per row at worst (each row fits one buffer), rounded up to whole
    micro-batches of `per_micro` buffers."""
    return -(-rows // per_micro) * per_micro

"""Checkpoints with orbax: train state (params, optimizer state, RNG), step metadata, and the data
iterator position of every process (grain's per-process JSON files), saved together, the last K kept.
A LoRA run saves its adapters as the params (models/lora.py: the frozen base is rebuilt from the model
source, like the reference policy), so its checkpoints are small.

Every process calls `save` and `restore` (orbax coordinates multi-host writes; each process writes
and reads its own data-iterator file). The reference policy is not saved: it is the initial
parameters, which the trainer rebuilds from the model source.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from ruscarl_jax.trainer import storage


class _IteratorState:
    """Adapts an iterator with dict get_state/set_state to grain's checkpoint handler (bytes)."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


class Checkpointer:
    """Saves and restores {train state pytree, metadata JSON, data iterator} under `directory`.

    The state holds arrays only: keep RNG keys as raw key data (jax.random.key_data)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, save_every: int = 0):
        """`directory`: a local path or a storage URL (gs://BUCKET/PATH)."""
        text = os.fspath(directory)
        self.directory = epath.Path(text if storage.is_url(text) else pathlib.Path(text).absolute())
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.save_every = save_every

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: Any, metadata: dict[str, Any], iterator: Any, pending: Any = None) -> None:
        """Save and wait until the checkpoint is complete on disk (so a kill right after is safe).
        `pending`: optional arrays of a rollout already sampled for the next step (overlap mode)."""
        items = dict(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata),
                     data=grain.checkpoint.CheckpointSave(_IteratorState(iterator)))
        if pending is not None:
            items["pending"] = ocp.args.StandardSave(pending)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore_pending(self, step: int, template: dict[str, Any]) -> dict[str, Any] | None:
        """The `pending` arrays saved at `step` (shaped and sharded like `template`'s entries), or None if it
        has none. Only the entries the checkpoint holds are restored (older ones hold fewer)."""
        path = self.directory / str(step) / "pending"
        if not path.exists():
            return None
        metadata = ocp.StandardCheckpointer().metadata(path)
        held = set((metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata).keys())
        template = {k: v for k, v in template.items() if k in held}
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
        return self.manager.restore(step, args=ocp.args.Composite(pending=ocp.args.StandardRestore(target)))["pending"]

    def restore(self, step: int, abstract_state: Any, iterator: Any) -> tuple[Any, dict[str, Any], bool]:
        """The state (shaped and sharded like `abstract_state`) and metadata saved at `step`, and whether
        `iterator` was moved to its saved position. It is not when the checkpoint was written by a
        different number of processes (each process saves its own position); the caller then
        repositions the iterator itself."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore()))
        index, count = jax.process_index(), jax.process_count()
        has_data = (self.directory / str(step) / "data" / f"process_{index}-of-{count}.json").exists()
        if has_data:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(_IteratorState(iterator))))
        return restored["state"], dict(restored["metadata"]), has_data

    def close(self) -> None:
        self.manager.close()

"""When to stop early: a preemption notice (SIGTERM) or an interrupt, agreed on by every process.

The loop asks `should_stop(step)` once per step, on every process, after the update; True means: save
this step's checkpoint and return. A TPU VM preemption, `scancel`/`--signal=TERM` under SLURM and
`kill` all send SIGTERM.

- Several processes (jax.distributed started): a per-process flag would let hosts that see the signal
  at different steps enter the collective checkpoint save at different times and hang. Instead JAX's
  preemption sync manager, which `jax.distributed.initialize` starts on every backend (TPU, GPU, CPU
  with gloo), catches SIGTERM in whichever process receives it and tells the coordination service;
  `multihost_utils.reached_preemption_sync_point(step)` then returns True on every host at the same
  step (one past the largest step any host had reached when the notice came). So every host saves
  the same step and exits 0. SIGINT keeps Python's default (KeyboardInterrupt, no checkpoint).
- One process without jax.distributed: SIGTERM and SIGINT set a flag; the current step finishes,
  is saved, and the run returns.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger("ruscarl_jax.trainer")


def _coordinated() -> bool:
    """Whether JAX's preemption sync manager is running (jax.distributed started with the service on)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopSignal:
    """Installs the stop handling for one run (`install` / `restore`) and answers `should_stop(step)`."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.coordinated = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.coordinated = _coordinated()
        if self.coordinated:
            logger.info("preemption: SIGTERM on any process stops every process at one agreed step "
                        "(jax.distributed preemption sync point)")
            return
        if jax.process_count() > 1:
            logger.warning("preemption: jax_enable_preemption_service is off, so a SIGTERM stops only the "
                           "process that receives it; multi-process runs should keep the service on")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received signal %d: finishing this step, saving a checkpoint, then stopping", signum)
        self.signal = signum

    def should_stop(self, step: int) -> bool:
        """Call exactly once per step on every process (the sync point counts calls by step)."""
        if self.coordinated:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = int(signal.SIGTERM)
                logger.warning("preemption sync point reached at step %d on process %d", step, jax.process_index())
                return True
            return False
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

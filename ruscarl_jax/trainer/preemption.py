"""When to stop early: a preemption notice (SIGTERM) or an interrupt, agreed on by every process, within
a grace period.

A TPU VM preemption, `scancel`/`--signal=TERM` under SLURM and `kill` all send SIGTERM, and the machine
is gone some seconds later (`trainer.preemption_grace_s`, 25 s by default). A step can take far longer
(a 512 x 4096-token rollout, thousands of judge calls), so the loop does not finish it: it asks `poll()`
at many points that every process passes in the same order, and the first True abandons the work in
hand (sampling or judging) and saves the last completed step (with the rollout already sampled, when
there is one) at once. The points:

- every scheduler iteration of the rollout engine (each one follows an all-gather, so every process
  runs the same iterations; `sampler.engine.run(interrupt=...)`);
- every tick of the wait for the judge (`wait_for`: the processes all-gather "my grading is done" each
  tick, so they leave the wait at the same tick);
- the end of every step (after the update; the update itself is one compiled program and runs to the end).

- Several processes (jax.distributed started): a per-process flag would let hosts that see the signal
  at different points enter the collective checkpoint save at different times and hang. Instead JAX's
  preemption sync manager, which `jax.distributed.initialize` starts on every backend (TPU, GPU, CPU
  with gloo), catches SIGTERM in whichever process receives it and tells the coordination service;
  `multihost_utils.reached_preemption_sync_point(n)`, called with the running count of polls, then
  returns True on every host at the same poll (one past the largest count any host had reached when
  the notice came; the call blocks while that is being agreed, so no host runs past it). So every host
  abandons the same work, saves the same step and exits 0. SIGINT keeps Python's default
  (KeyboardInterrupt, no checkpoint).
- One process without jax.distributed: SIGTERM and SIGINT set a flag that the next poll reads.
"""
from __future__ import annotations

import concurrent.futures
import logging
import signal
import time
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger("ruscarl_jax.trainer")

JUDGE_TICK_S = 0.25  # how often a wait for the judge checks for a stop (and all-gathers "done")


def _coordinated() -> bool:
    """Whether JAX's preemption sync manager is running (jax.distributed started with the service on)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopSignal:
    """Installs the stop handling for one run (`install` / `restore`) and answers `poll()`."""

    def __init__(self, grace_s: float = 25.0) -> None:
        self.grace_s = float(grace_s)
        self.signal: int | None = None
        self.coordinated = False
        self.noticed_at: float | None = None  # time.monotonic() when this process learned of the stop
        self._polls = 0
        self._stopped = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.coordinated = _coordinated()
        if self.coordinated:
            logger.info("preemption: SIGTERM on any process stops every process at one agreed point, within "
                        "trainer.preemption_grace_s=%.0f s (jax.distributed preemption sync point)", self.grace_s)
            return
        if jax.process_count() > 1:
            logger.warning("preemption: jax_enable_preemption_service is off, so a SIGTERM stops only the "
                           "process that receives it; multi-process runs should keep the service on")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received signal %d: stopping the work in hand and saving the last completed step", signum)
        self.signal = signum
        self.noticed_at = time.monotonic()

    def poll(self) -> bool:
        """True once a stop is agreed (and from then on). Call it only at points every process reaches in
        the same order: the sync point counts calls."""
        if self._stopped:
            return True
        self._polls += 1
        if self.coordinated:
            if multihost_utils.reached_preemption_sync_point(self._polls):
                self.signal, self.noticed_at, self._stopped = int(signal.SIGTERM), time.monotonic(), True
                logger.warning("preemption sync point reached at check %d on process %d", self._polls, jax.process_index())
        else:
            self._stopped = self.signal is not None
        return self._stopped

    @property
    def stopped(self) -> bool:
        return self._stopped

    def report(self, what: str) -> float:
        """Log how long the stop took since this process learned of it, against the grace; the seconds."""
        seconds = time.monotonic() - (self.noticed_at if self.noticed_at is not None else time.monotonic())
        log = logger.warning if seconds <= self.grace_s else logger.error
        log("stopped by signal %s: %s, %.1f s after the notice (trainer.preemption_grace_s=%.0f%s)", self.signal, what,
            seconds, self.grace_s, "" if seconds <= self.grace_s else ": OVER the grace, the save may have been cut off")
        return seconds

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def wait_for(future: concurrent.futures.Future, stop: StopSignal | None, tick: float = JUDGE_TICK_S) -> Any | None:
    """The future's result (the judge's grades), or None when a stop is agreed first (the future is then
    cancelled). Every process must call it at the same point: each tick all-gathers whether each one's
    future is done, so all leave together, and a grading that raised raises after that agreement, not
    while the others wait in a collective."""
    if stop is None:
        return future.result()
    while True:
        done = bool(concurrent.futures.wait([future], timeout=tick).done)
        if jax.process_count() > 1:
            done = bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(done)], np.int32))).min())
        if stop.poll():
            future.cancel()
            return None
        if done:
            return future.result()

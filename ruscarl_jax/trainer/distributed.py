"""Start JAX's multi-controller runtime (`jax.distributed`) once per process.

Multi-host training runs the same program on every host; `jax.distributed.initialize` connects the
processes so that `jax.devices()` lists the devices of all hosts. It has to run in every process
BEFORE anything touches a device (creating an array, `jax.devices()`, `jax.process_index()`, a jitted
call): JAX refuses to initialise after its backends exist. Call `initialize` first thing in a script.

Where the settings come from (arguments win over the environment; an empty variable counts as unset):

- coordinator address: `coordinator_address` or RUSCARL_COORDINATOR_ADDRESS, "host:port" of process 0;
  the word "auto" instead lets JAX detect the cluster (Cloud TPU VM / pod slice, SLURM, Open MPI,
  Kubernetes).
- process count: `num_processes` or RUSCARL_NUM_PROCESSES.
- process id: `process_id` or RUSCARL_PROCESS_ID (0-based; 0 is the main process).

Nothing configured, or a count of 1 without an address, means a single process and nothing is started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "RUSCARL_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RUSCARL_NUM_PROCESSES"
ENV_PROCESS_ID = "RUSCARL_PROCESS_ID"
AUTO = "auto"
CPU_COLLECTIVES = ("gloo", "mpi")

_initialized = False  # set by the first call of `initialize`; later calls do nothing


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do: nothing ("single"), JAX auto-detection ("auto") or explicit settings."""

    mode: Literal["single", "auto", "explicit"]
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_setting(value: int | None, arg: str, env: str, environ: Mapping[str, str]) -> int | None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"distributed: {arg}={value!r} must be an int")
        return value
    raw = environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"distributed: environment variable {env}={raw!r} is not an integer") from None


def _check_address(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"distributed: {source}={address!r} must be 'host:port' (port 1-65535) or {AUTO!r}"
        )


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Plan:
    """Merge arguments with the RUSCARL_* environment and validate them; starts nothing."""
    environ = os.environ if environ is None else environ
    addr_source = "coordinator_address"
    if coordinator_address is None:
        coordinator_address = environ.get(ENV_COORDINATOR_ADDRESS, "").strip() or None
        addr_source = ENV_COORDINATOR_ADDRESS
    n = _int_setting(num_processes, "num_processes", ENV_NUM_PROCESSES, environ)
    pid = _int_setting(process_id, "process_id", ENV_PROCESS_ID, environ)
    n_source = "num_processes" if num_processes is not None else ENV_NUM_PROCESSES
    pid_source = "process_id" if process_id is not None else ENV_PROCESS_ID

    if n is not None and n < 1:
        raise ValueError(f"distributed: {n_source}={n} must be >= 1")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        bound = f" and < {n_source}={n}" if n is not None else ""
        raise ValueError(f"distributed: {pid_source}={pid} must be >= 0{bound}")
    if coordinator_address is not None and coordinator_address.lower() == AUTO:
        return Plan("auto", None, n, pid)
    if coordinator_address is None:
        if n is None and pid is None:
            return Plan("single")
        if n == 1:
            return Plan("single", None, 1, 0)
        raise ValueError(
            f"distributed: {n_source}={n}, {pid_source}={pid} but no coordinator address: pass "
            f"coordinator_address or set {ENV_COORDINATOR_ADDRESS} to 'host:port' of process 0 "
            f"(or {AUTO!r} on a TPU VM / SLURM)"
        )
    _check_address(coordinator_address, addr_source)
    missing = [name for name, v in ((f"num_processes ({ENV_NUM_PROCESSES})", n),
                                    (f"process_id ({ENV_PROCESS_ID})", pid)) if v is None]
    if missing:
        raise ValueError(
            f"distributed: {addr_source}={coordinator_address!r} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; give all three, or the address {AUTO!r} "
            "to let JAX detect the cluster"
        )
    return Plan("explicit", coordinator_address, n, pid)


def _set_cpu_collectives(name: str) -> None:
    if name not in CPU_COLLECTIVES:
        raise ValueError(f"distributed: cpu_collectives={name!r} must be one of {CPU_COLLECTIVES} or None")
    current = jax.config.jax_cpu_collectives_implementation
    if current == name:
        return
    from jax._src import xla_bridge  # no public equivalent; exists in jax 0.10 and 0.11

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        raise RuntimeError(
            f"distributed: cpu_collectives={name!r} must be set before any device use "
            "(JAX's backends are already initialised); call initialize() first in the program"
        )
    jax.config.update("jax_cpu_collectives_implementation", name)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = None,
) -> None:
    """Connect this process to the others with `jax.distributed.initialize`, at most once.

    Call before any device use. Settings are resolved by `resolve` (arguments, then RUSCARL_* env
    vars). `cpu_collectives="gloo"` selects the cross-process collectives of the CPU backend (needed
    for multi-process CPU runs such as the loopback tests). A second call, or a call after someone
    else started `jax.distributed`, does nothing.
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        logger.debug("distributed: already initialised; initialize() is a no-op")
        _initialized = True
        return
    plan = resolve(coordinator_address, num_processes, process_id)
    if cpu_collectives is not None:
        _set_cpu_collectives(cpu_collectives)
    if plan.mode == "single":
        logger.info("distributed: single process, jax.distributed not started")
    elif plan.mode == "auto":
        logger.info("distributed: jax.distributed.initialize() with cluster auto-detection")
        jax.distributed.initialize(
            num_processes=plan.num_processes, process_id=plan.process_id,
            local_device_ids=local_device_ids,
        )
    else:
        logger.info("distributed: process %d of %d, coordinator %s",
                    plan.process_id, plan.num_processes, plan.coordinator_address)
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
            process_id=plan.process_id, local_device_ids=local_device_ids,
        )
    _initialized = True


def process_info() -> tuple[int, int]:
    """(this process's index, number of processes). Touches the backend: call after `initialize`."""
    return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that writes metrics, rollout records and the progress bar."""
    return jax.process_index() == 0


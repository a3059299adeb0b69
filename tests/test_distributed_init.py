"""ruscarl_jax.trainer.distributed: where the settings come from, their checks, and a real
single-process `jax.distributed` start on a loopback coordinator (in a fresh subprocess, since JAX
can be initialised only once per process and only before any device use)."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from ruscarl_jax.trainer import distributed
from ruscarl_jax.trainer.distributed import Plan, resolve

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV_A, ENV_N, ENV_P = "RUSCARL_COORDINATOR_ADDRESS", "RUSCARL_NUM_PROCESSES", "RUSCARL_PROCESS_ID"


@pytest.mark.parametrize("args, environ, expected", [
    ((None, None, None), {}, Plan("single")),
    ((None, None, None), {ENV_A: "", ENV_N: " ", ENV_P: ""}, Plan("single")),
    ((None, 1, None), {}, Plan("single", None, 1, 0)),
    ((None, None, None), {ENV_N: "1", ENV_P: "0"}, Plan("single", None, 1, 0)),
    ((None, None, None), {ENV_A: "10.0.0.1:1234", ENV_N: "4", ENV_P: "3"},
     Plan("explicit", "10.0.0.1:1234", 4, 3)),
    (("host-0:8476", 2, 1), {}, Plan("explicit", "host-0:8476", 2, 1)),
    # arguments win over the environment, each setting on its own
    (("h:1", None, 0), {ENV_A: "other:2", ENV_N: "8", ENV_P: "5"}, Plan("explicit", "h:1", 8, 0)),
    (("[::1]:9000", 2, 0), {}, Plan("explicit", "[::1]:9000", 2, 0)),
    (("auto", None, None), {}, Plan("auto")),
    ((None, None, None), {ENV_A: "AUTO", ENV_N: "16", ENV_P: "2"}, Plan("auto", None, 16, 2)),
])
def test_resolve(args, environ, expected):
    assert resolve(*args, environ=environ) == expected


@pytest.mark.parametrize("args, environ, message", [
    ((None, None, None), {ENV_N: "four"}, "RUSCARL_NUM_PROCESSES='four' is not an integer"),
    ((None, None, None), {ENV_P: "1.5", ENV_N: "2", ENV_A: "h:1"}, "RUSCARL_PROCESS_ID='1.5'"),
    ((None, 0, None), {}, "num_processes=0 must be >= 1"),
    ((None, None, None), {ENV_N: "2", ENV_P: "2", ENV_A: "h:1"},
     "RUSCARL_PROCESS_ID=2 must be >= 0 and < RUSCARL_NUM_PROCESSES=2"),
    (("h:1", 2, -1), {}, "process_id=-1 must be >= 0"),
    ((None, 2, 0), {}, "no coordinator address"),
    ((None, None, None), {ENV_A: "h:1", ENV_N: "2"}, "RUSCARL_PROCESS_ID"),
    (("h:1", None, None), {}, "num_processes (RUSCARL_NUM_PROCESSES) and process_id (RUSCARL_PROCESS_ID)"),
    (("localhost", 2, 0), {}, "coordinator_address='localhost' must be 'host:port'"),
    ((None, 2, 0), {ENV_A: "h:99999"}, "RUSCARL_COORDINATOR_ADDRESS='h:99999' must be 'host:port'"),
    ((":1234", 2, 0), {}, "must be 'host:port'"),
])
def test_resolve_rejects_bad_settings(args, environ, message):
    with pytest.raises(ValueError) as err:
        resolve(*args, environ=environ)
    assert message in str(err.value)


def test_resolve_rejects_non_int_arguments():
    with pytest.raises(TypeError, match="num_processes='2' must be an int"):
        resolve("h:1", "2", 0, environ={})
    with pytest.raises(TypeError, match="process_id=True must be an int"):
        resolve("h:1", 2, True, environ={})


def test_resolve_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(ENV_A, "127.0.0.1:5555")
    monkeypatch.setenv(ENV_N, "3")
    monkeypatch.setenv(ENV_P, "1")
    assert resolve() == Plan("explicit", "127.0.0.1:5555", 3, 1)


def test_bad_cpu_collectives_named():
    with pytest.raises(ValueError, match="cpu_collectives='nccl' must be one of"):
        distributed._set_cpu_collectives("nccl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RUSCARL_")}
    base.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", **env)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=base, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_single_process_loopback_really_starts_once():
    """num_processes=1 with a loopback coordinator runs the real runtime; a second call is a no-op."""
    _python(f"""
        import jax
        from ruscarl_jax.trainer import distributed as d
        d.initialize("127.0.0.1:{_free_port()}", 1, 0, cpu_collectives="gloo")
        assert jax.distributed.is_initialized()
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        d.initialize("127.0.0.1:1", 1, 0)  # would raise in jax if it reached jax.distributed again
        assert d.process_info() == (0, 1) and d.is_main_process()
        assert jax.device_count() == 2 and jax.local_device_count() == 2
        jax.distributed.shutdown()
    """)


def test_initialize_from_environment_variables():
    _python("""
        import jax
        from ruscarl_jax.trainer import distributed as d
        d.initialize()
        assert jax.distributed.is_initialized()
        assert d.process_info() == (0, 1)
        jax.distributed.shutdown()
    """, RUSCARL_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", RUSCARL_NUM_PROCESSES="1",
        RUSCARL_PROCESS_ID="0")


def test_nothing_configured_starts_nothing_and_respects_an_existing_start():
    _python(f"""
        import jax
        from ruscarl_jax.trainer import distributed as d
        d.initialize()
        assert not jax.distributed.is_initialized()
        assert d.process_info() == (0, 1) and d.is_main_process()
    """)
    # Someone else (e.g. a notebook) started jax.distributed first: initialize() leaves it alone.
    _python(f"""
        import jax
        jax.distributed.initialize("127.0.0.1:{_free_port()}", 1, 0)
        from ruscarl_jax.trainer import distributed as d
        d.initialize("127.0.0.1:1", 2, 1)
        assert d.process_info() == (0, 1)
        jax.distributed.shutdown()
    """)


def test_cpu_collectives_after_device_use_is_a_clear_error():
    _python("""
        import jax
        jax.devices()  # the backends now exist
        from ruscarl_jax.trainer import distributed as d
        try:
            d.initialize(cpu_collectives="mpi")
        except RuntimeError as e:
            assert "must be set before any device use" in str(e), e
        else:
            raise AssertionError("no error")
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    """)

"""Test set-up: 8 emulated CPU devices for the whole session (set before JAX is imported), a shared
persistent compilation cache, and no network."""
import os

# XLA's backend optimisation level 0 halves CPU compile time, which dominates this suite.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

# One persistent compilation cache (keyed by program hash, so never stale), shared with the
# subprocesses that tests start: the trainer's runs compile the same programs once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest

# shared/ beside the checkout (CI's layout); RUSCARL_SHARED_DIR points elsewhere (a worktree without one)
SHARED = pathlib.Path(os.environ.get("RUSCARL_SHARED_DIR") or pathlib.Path(__file__).resolve().parents[1].parent / "shared")
HEALTHBENCH_DIR = SHARED / "healthbench"


@pytest.fixture(scope="session")
def healthbench_dir() -> pathlib.Path:
    if not HEALTHBENCH_DIR.is_dir():
        pytest.skip(f"{HEALTHBENCH_DIR} is absent")
    return HEALTHBENCH_DIR

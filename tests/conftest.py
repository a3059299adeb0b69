"""Test set-up: 8 emulated CPU devices for the whole session (set before JAX is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
HEALTHBENCH_DIR = SHARED / "healthbench"


@pytest.fixture(scope="session")
def healthbench_dir() -> pathlib.Path:
    if not HEALTHBENCH_DIR.is_dir():
        pytest.skip(f"{HEALTHBENCH_DIR} is absent")
    return HEALTHBENCH_DIR

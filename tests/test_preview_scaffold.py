"""scripts/preview_scaffold.py, run as a user would, on the shared HealthBench files."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "preview_scaffold.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["healthbench_val400.jsonl", "healthbench_val400.verl.parquet"])
def test_preview_lines(healthbench_dir, tmp_path, name):
    plot = tmp_path / "schedule.png"
    out = _run("--data", str(healthbench_dir / name), "--rule", "step_sigmoid", "--num-generations", "8",
               "--step", "60", "--total-steps", "350", "--start-point", "0.2", "--steepness", "125",
               "--seed", "0", "--limit", "3", "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3 * 8
    raw = [json.loads(line) for line in open(healthbench_dir / "healthbench_val400.jsonl", encoding="utf-8")][:3]
    s = 1 / (1 + math.exp((59 / 349 - 0.2) * 125))  # step 60 of 350
    for i, line in enumerate(lines):
        assert set(line) == {"example_id", "sample_index", "ratio", "shown_indices", "system_message"}
        example, k = raw[i // 8], i % 8
        assert line["sample_index"] == k
        if name.endswith(".jsonl"):
            assert line["example_id"] == example["prompt_id"]
        assert line["ratio"] == pytest.approx((7 - k) / 7 * s, rel=1e-12)
        rubric = example["rubrics"]
        assert len(line["shown_indices"]) == round(len(rubric) * line["ratio"])
        if line["shown_indices"]:
            for j in line["shown_indices"]:
                assert rubric[j]["criterion"] in line["system_message"]
        else:  # the reference default adds the base message when nothing is shown
            assert line["system_message"] == "You are a helpful assistant."
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_preview_without_base_message(healthbench_dir):
    out = _run("--data", str(healthbench_dir / "healthbench_val400.jsonl"), "--num-generations", "2",
               "--no-add-base-when-zero", "--limit", "1")
    assert out.returncode == 0, out.stderr
    first, last = (json.loads(line) for line in out.stdout.splitlines())
    assert first["ratio"] == 1.0 and first["shown_indices"] == list(range(len(first["shown_indices"])))
    assert last["ratio"] == 0.0 and last["shown_indices"] == [] and last["system_message"] is None


def test_preview_reports_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": [], "rubrics": [{"criterion": "c", "points": 1}]}\n')
    out = _run("--data", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    assert "bad.jsonl, line 1, field 'prompt': empty conversation" in out.stderr
    out = _run("--data", str(bad), "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 2 and "--plot needs --total-steps" in out.stderr

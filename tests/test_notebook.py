"""notebooks/quickstart.ipynb runs top to bottom (nbclient), so it never goes stale."""
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes():
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    env_backup = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # the kernel: one CPU device, like a laptop
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        if env_backup is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = env_backup
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "reward_mean" in outputs and "sample 0: ratio" in outputs
    assert "trainable" in outputs and "checkpoints: full fine-tuning" in outputs  # the LoRA section ran
    assert "not on Colab: skipped" in outputs  # the Colab cell is inert in CI

"""A QLoRA run end to end (scripts/train.py and scripts/export.py in subprocesses, as the user runs them):
the checkpoints hold the adapters only, a run resumes from them, and the export merges them."""
import json
import subprocess
import sys

import numpy as np
from run_utils import checkpoint_params
from test_trainer import FAST, ROOT, TRAIN, _env


def _train(workdir, steps):
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", f"--config.trainer.total_steps={steps}", *FAST,
                                   "--config.model.lora.rank=4", "--config.model.lora.quantize=int8",
                                   "--config.optim.learning_rate=0.01", "--config.grpo.entropy_coeff=0.01"],  # a gradient from step 1
                          capture_output=True, text=True, env=_env(), timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_qlora_run_checkpoints_adapters_resumes_and_exports(tmp_path):
    import torch
    import transformers

    workdir = tmp_path / "run"
    _train(workdir, 2)
    saved = checkpoint_params(workdir)
    # only the adapters ({stack}/{projection}/{a|b}) are saved: no base, no reference
    assert saved and all(key.endswith("['a']") or key.endswith("['b']") for key in saved), sorted(saved)[:4]
    assert any("q_proj" in key for key in saved) and any("down_proj" in key for key in saved)
    assert max(float(np.abs(v).max()) for k, v in saved.items() if k.endswith("['b']")) > 0  # trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kl"]) for r in rows)

    proc = _train(workdir, 3)  # resumes from the step-2 checkpoint: adapters restored onto a rebuilt base
    assert "resumed from" in proc.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]

    out, adapter = tmp_path / "merged", tmp_path / "adapter"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), f"--workdir={workdir}", f"--out={out}",
                           f"--adapter_out={adapter}"], capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    from ruscarl_jax.models import hf_io, qwen

    cfg, params = hf_io.load_checkpoint(out)
    ids = np.asarray([[5, 9, 13, 7, 2]], np.int32)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(qwen.compute_logits(params, cfg, ids, np.ones_like(ids))), theirs, atol=1e-4)

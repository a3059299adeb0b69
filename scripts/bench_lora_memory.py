"""The resident training state per device of a preset model, full fine-tuning vs LoRA vs QLoRA (rank 16, every
projection): parameters, optimizer state and the KL reference, from the abstract shapes and shardings (nothing is
compiled or allocated). The whole step, activations and rollout included, is scripts/plan.py's.

    python scripts/bench_lora_memory.py 8 Qwen2.5-7B-Instruct "{'data': 1, 'fsdp': 8, 'tensor': 1}"   # v5p-8
    python scripts/bench_lora_memory.py 1 Qwen2.5-1.5B-Instruct "{'data': 1, 'fsdp': 1, 'tensor': 1}"  # v5e-1
"""
import ast
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
n = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402
from ruscarl_jax.models import hf_io, lora, presets, qwen  # noqa: E402
from ruscarl_jax.models.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from ruscarl_jax.rl.optimizer import OptimizerSettings, make_optimizer, opt_state_shardings  # noqa: E402
from ruscarl_jax.plan.memory_plan import abstract, per_device_bytes  # noqa: E402
name, mesh_shape = sys.argv[2], dict(ast.literal_eval(sys.argv[3]))  # a dict literal of mesh axis sizes
mesh = make_mesh(mesh_shape)
opt = make_optimizer(OptimizerSettings())
G = 2**30
for mode, pdt, settings in [("full FT", "float32", None), ("LoRA r16", "bfloat16", lora.LoraSettings(rank=16)),
                            ("QLoRA r16 int8", "bfloat16", lora.LoraSettings(rank=16, quantize="int8"))]:
    cfg = hf_io.config_from_hf(presets.preset(name), dtype="bfloat16", param_dtype=pdt)
    params = abstract(qwen.param_shapes(cfg), qwen.param_shardings(cfg, mesh, DEFAULT_RULES))
    if settings:
        params = lora.abstract_state(params, qwen.param_logical_axes(cfg), settings, mesh, DEFAULT_RULES)
    t = lora.split(params)[0]
    o = abstract(jax.eval_shape(opt.init, t), opt_state_shardings(opt, t))
    p, ob = per_device_bytes(params), per_device_bytes(o)
    ref = 0 if settings else p
    print(f"{name} {mesh_shape} {mode:15s} params {p/G:6.2f} GiB  optimizer {ob/G:6.2f} GiB  reference {ref/G:6.2f} GiB  "
          f"state total {(p+ob+ref)/G:6.2f} GiB  trainable {lora.count(t)/1e6:,.1f} M")

"""LoRA and QLoRA for the functional Qwen: low-rank adapters beside frozen (optionally int8) base weights.

Why a small transform of our own and not qwix: qwix intercepts Flax modules and keeps its adapters in
the model's own ``params`` collection under names it chooses, and quantizes on every call unless the
model is rewrapped for its PTQ path; our model is applied functionally from four places (training
forward, routed forward, prefill / decode, init) that all take one params pytree. Putting the adapters
and the quantized weights into that pytree, next to the kernels they modify, needs one projection
module (``Dense``) and a few pure tree functions, and every caller, the rollout engine included, works
unchanged.

The train state of a LoRA run is ``{"base": base params, "lora": adapters, "lora_scale": alpha / rank}``:
- ``base``: the model's params in the compute dtype, frozen (no float32 master copy, no optimizer
  state); with ``quantize='int8'`` each targeted kernel is replaced by ``kernel_q`` (int8) and
  ``kernel_scale`` (absmax per output feature), dequantized on the fly inside the layer.
- ``lora``: per targeted projection ``{"a": [L, *in, r], "b": [L, r, *out]}`` (a ~ normal(1/r), b = 0,
  so a fresh adapter leaves the model unchanged); the only trainable leaves (``split`` / ``join``).
- ``effective_params`` inserts ``lora_a = scale * a`` and ``lora_b = b`` beside each kernel; ``Dense``
  adds ``x @ lora_a @ lora_b`` to the base projection. The KL reference is ``reference(state)``: the
  base with the adapters off, so a LoRA run keeps no reference copy.

Targets are the dense projections q, k, v, o, gate, up, down (in MoE models the attention ones; the
experts' grouped matmuls are not adapted).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = dict[str, Any]
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QUANTIZE = ("none", "int8")
# contracted (input) dims of each projection's kernel, after the leading layer axis
_IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """config.model.lora. rank 0: full fine-tuning (no adapters). alpha / rank scales the adapter's
    product (PEFT's lora_alpha). targets: projection names. quantize: 'int8' stores the base kernels
    of the targeted projections as int8 with a float scale per output feature (QLoRA); 'none' keeps
    them in the compute dtype. seed: the adapters' initialisation."""

    rank: int = 0
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    quantize: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"LoraSettings.rank={self.rank}: must be >= 0 (0 = no adapters)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or (self.rank and not self.targets):
            raise ValueError(f"LoraSettings.targets={self.targets!r}: valid names are {', '.join(TARGETS)} (at least one)")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"LoraSettings.quantize={self.quantize!r}: valid: {', '.join(QUANTIZE)}")
        if self.quantize != "none" and not self.rank:
            raise ValueError(f"LoraSettings.quantize={self.quantize!r} needs rank > 0 (a quantized base is frozen)")
        if not self.alpha > 0:
            raise ValueError(f"LoraSettings.alpha={self.alpha}: must be > 0")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ----------------------------------------------------------------------------------- the projection

class Dense(nn.DenseGeneral):
    """nn.DenseGeneral (same params, same init) that also reads, when its params hold them, an int8
    kernel (``kernel_q`` * ``kernel_scale``, in place of ``kernel``) and a LoRA pair (``lora_a``,
    ``lora_b``: adds x @ lora_a @ lora_b)."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        axis = tuple(a % inputs.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis))
        contract = (axis, tuple(range(len(axis))))
        if self.has_variable("params", "kernel_q"):
            dtype = self.dtype or jnp.float32
            kernel = (self.get_variable("params", "kernel_q").astype(dtype)
                      * self.get_variable("params", "kernel_scale").astype(dtype))
            out = lax.dot_general(inputs.astype(dtype), kernel, (contract, ((), ())))
            if self.use_bias:
                out = out + self.get_variable("params", "bias").astype(dtype)
        else:
            out = super().__call__(inputs)
        if self.has_variable("params", "lora_a"):
            a = self.get_variable("params", "lora_a").astype(out.dtype)
            b = self.get_variable("params", "lora_b").astype(out.dtype)
            low = lax.dot_general(inputs.astype(out.dtype), a, (contract, ((), ())))  # [..., r]
            out = out + lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ())))
        return out


# ----------------------------------------------------------------------------------- tree functions

def _targets(base: Params, settings: LoraSettings) -> list[tuple[str, str, str]]:
    """(stack, module, target) of every projection of `base` that the settings adapt."""
    found = []
    for stack, modules in base.items():
        if not stack.startswith("layers") or not isinstance(modules, Mapping):
            continue
        for target in settings.targets:
            module = f"{target}_proj"
            if isinstance(modules.get(module), Mapping) and ("kernel" in modules[module] or "kernel_q" in modules[module]):
                found.append((stack, module, target))
    return found


def _kernel_shape(leaf: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple((leaf["kernel"] if "kernel" in leaf else leaf["kernel_q"]).shape)


def adapter_shapes(base: Params, settings: LoraSettings) -> Params:
    """ShapeDtypeStructs (float32) of the adapters of `base` (arrays or ShapeDtypeStructs)."""
    out: Params = {}
    for stack, module, target in _targets(base, settings):
        shape = _kernel_shape(base[stack][module])
        k = _IN_DIMS[target]
        a = shape[: 1 + k] + (settings.rank,)
        b = (shape[0], settings.rank) + shape[1 + k:]
        out.setdefault(stack, {})[module] = {"a": jax.ShapeDtypeStruct(a, jnp.float32),
                                             "b": jax.ShapeDtypeStruct(b, jnp.float32)}
    if not out:
        raise ValueError(f"LoRA: none of the targets {settings.targets} is a projection of this model")
    return out


def adapter_logical_axes(base_axes: Params, settings: LoraSettings, base: Params) -> Params:
    """Logical axis names of the adapters: a keeps the kernel's input axes, b its output axes; the rank
    axis is replicated (None)."""
    out: Params = {}
    for stack, module, target in _targets(base, settings):
        names = tuple(base_axes[stack][module]["kernel"])
        k = _IN_DIMS[target]
        out.setdefault(stack, {})[module] = {"a": names[: 1 + k] + (None,), "b": (names[0], None) + names[1 + k:]}
    return out


def init_adapters(base: Params, settings: LoraSettings, rng: jax.Array) -> Params:
    """a ~ normal(0, 1/r) (PEFT's default draws a Kaiming-uniform; either works with b = 0), b = 0."""
    shapes = adapter_shapes(base, settings)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, Mapping) and "a" in x)
    keys = jax.random.split(rng, len(leaves))
    made = [{"a": jax.random.normal(key, s["a"].shape, jnp.float32) / settings.rank,
             "b": jnp.zeros(s["b"].shape, jnp.float32)} for key, s in zip(keys, leaves)]
    return jax.tree.unflatten(tree, made)


def quantize_kernel(kernel: jax.Array, in_dims: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of a stacked kernel [L, *in, *out]: absmax over the input dims, per layer and
    output feature. Returns (int8 kernel, float32 scale shaped like the kernel with 1 on input dims)."""
    x = kernel.astype(jnp.float32)
    reduce = tuple(range(1, 1 + in_dims))
    scale = jnp.max(jnp.abs(x), axis=reduce, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def quantize_base(base: Params, settings: LoraSettings) -> Params:
    """`base` with each targeted kernel replaced by kernel_q / kernel_scale (settings.quantize='int8')."""
    if settings.quantize == "none":
        return base
    out = jax.tree.map(lambda x: x, base)  # a fresh dict tree (the leaves are shared)
    for stack, module, target in _targets(base, settings):
        leaf = dict(out[stack][module])
        leaf["kernel_q"], leaf["kernel_scale"] = quantize_kernel(leaf.pop("kernel"), _IN_DIMS[target])
        out[stack][module] = leaf
    return out


def dequantize_base(base: Params, dtype: str = "float32") -> Params:
    """The float params of a (possibly) quantized base: kernel = kernel_q * kernel_scale."""
    def fix(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        node = {k: fix(v) for k, v in node.items()}
        if "kernel_q" in node:
            node["kernel"] = (node.pop("kernel_q").astype(jnp.float32) * node.pop("kernel_scale")).astype(dtype)
        return node
    return fix(base)


def make_state(base: Params, settings: LoraSettings, rng: jax.Array | None = None) -> Params:
    """The LoRA train state {"base", "lora", "lora_scale"} from full params (quantized if asked)."""
    rng = jax.random.key(settings.seed) if rng is None else rng
    return {"base": quantize_base(base, settings), "lora": init_adapters(base, settings, rng),
            "lora_scale": jnp.asarray(settings.scale, jnp.float32)}


def make_sharded_state(base: Params, settings: LoraSettings, base_axes: Params, mesh: Any, rules: Any) -> Params:
    """make_state for sharded base params: the adapters created in their shardings (their logical axes
    through the rules), the int8 kernels sharded like the kernels they replace."""
    from ruscarl_jax.models.sharding import tree_shardings

    shapes = jax.tree.map(lambda s: s.shape, adapter_shapes(base, settings))
    shardings = tree_shardings(adapter_logical_axes(base_axes, settings, base), shapes, mesh, rules)
    adapters = jax.jit(lambda key: init_adapters(base, settings, key), out_shardings=shardings)(jax.random.key(settings.seed))
    if settings.quantize != "none":  # one stacked kernel at a time (the float32 temporary is one kernel's)
        base = jax.tree.map(lambda x: x, base)
        quantize = jax.jit(quantize_kernel, static_argnums=1)
        for stack, module, target in _targets(base, settings):
            leaf = dict(base[stack][module])
            kernel = leaf.pop("kernel")
            q, leaf["kernel_scale"] = quantize(kernel, _IN_DIMS[target])
            leaf["kernel_q"] = jax.device_put(q, kernel.sharding)  # sharded like the kernel it replaces
            base[stack][module] = leaf
    return {"base": base, "lora": adapters, "lora_scale": jnp.asarray(settings.scale, jnp.float32)}


def abstract_state(base: Params, base_axes: Params, settings: LoraSettings, mesh: Any, rules: Any) -> Params:
    """ShapeDtypeStructs (with shardings) of make_sharded_state's result, from the base's: for the memory plan."""
    from ruscarl_jax.models.sharding import named_sharding

    state = jax.eval_shape(lambda b: make_state(b, settings, jax.random.key(0)), base)
    axes = {"base": dict(base_axes), "lora": adapter_logical_axes(base_axes, settings, base), "lora_scale": ()}
    for stack, module, _ in _targets(base, settings) if settings.quantize != "none" else ():
        names = tuple(base_axes[stack][module]["kernel"])
        axes["base"][stack] = dict(axes["base"][stack])
        axes["base"][stack][module] = {**{k: v for k, v in base_axes[stack][module].items() if k != "kernel"},
                                       "kernel_q": names, "kernel_scale": names}
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)  # noqa: E731
    return jax.tree.map(lambda names, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=named_sharding(names, s.shape, mesh, rules)),
                        axes, state, is_leaf=is_names)


def is_adapted(params: Any) -> bool:
    """Whether `params` is a LoRA train state (else: plain model params)."""
    return isinstance(params, Mapping) and "lora" in params and "base" in params


def effective_params(params: Params) -> Params:
    """The model params to run: plain params as they are; a LoRA state's base with lora_a (scaled) and
    lora_b inserted beside each adapted kernel (a state without "lora": the base alone). The one way
    the forward, the update and the rollout engine see a LoRA state."""
    if not isinstance(params, Mapping) or "base" not in params:
        return params
    base, adapters = params["base"], params.get("lora")
    if adapters is None:
        return base
    out = dict(base)
    for stack, modules in adapters.items():
        out[stack] = dict(out[stack])
        for module, ab in modules.items():
            scale = params["lora_scale"].astype(ab["a"].dtype)
            out[stack][module] = {**out[stack][module], "lora_a": ab["a"] * scale, "lora_b": ab["b"]}
    return out


def split(params: Params) -> tuple[Any, Any]:
    """(trainable, frozen): the adapters and the rest of a LoRA state; (params, None) otherwise."""
    if not is_adapted(params):
        return params, None
    return params["lora"], {k: v for k, v in params.items() if k != "lora"}


def join(trainable: Any, frozen: Any) -> Any:
    """The inverse of `split`."""
    return trainable if frozen is None else {**frozen, "lora": trainable}


def reference(params: Params) -> Params | None:
    """The KL reference of a LoRA state: its base with the adapters off (no copy); None for plain params
    (the trainer then keeps a frozen copy, rl.train_step.make_reference)."""
    if not is_adapted(params):
        return None
    return {k: v for k, v in params.items() if k != "lora"}


def merge(params: Params, dtype: str | None = None) -> Params:
    """Plain model params with the adapters folded in: kernel = base kernel + scale * a @ b (a quantized
    base is dequantized first). For export; `dtype` defaults to the base kernels' dtype (float32 if int8)."""
    if not is_adapted(params):
        return params
    base = params["base"]
    out = dequantize_base(base, dtype or "float32")
    scale = np.float32(params["lora_scale"])
    for stack, modules in params["lora"].items():
        for module, ab in modules.items():
            kernel = out[stack][module]["kernel"]
            a, b = jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32)
            delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                               b.reshape(b.shape[0], b.shape[1], -1)).reshape(kernel.shape)
            out[stack][module] = {**out[stack][module],
                                  "kernel": (kernel.astype(jnp.float32) + scale * delta).astype(dtype or kernel.dtype)}
    return out


def count(tree: Any) -> int:
    """Number of elements of a pytree's leaves."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

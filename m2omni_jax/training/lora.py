"""LoRA adapters for the LLM's attention and MLP kernels, without touching the model classes.

Alignment trains low-rank adapters on q, k, v, o, gate, up and down
(DESIGN §2: ~5% of the LLM's weights, alpha = 2r, dropout 0.05):

    y = x·W + scale · dropout(x)·A·B,     scale = alpha / r,  A: (in, r), B: (r, out)

A starts uniform in ±1/sqrt(fan_in) (PEFT's kaiming_uniform(a=√5)), B at zero,
so a fresh adapter leaves the model unchanged.

Mechanism. The LoRA parameters are a separate tree that mirrors the base
tree: next to each target kernel `.../attention/query/kernel` it holds
`.../attention/query/lora_a` and `lora_b`. `apply_with_lora` merges the two
trees into one "params" collection and runs the model under
`nn.intercept_methods`; the interceptor adds the adapter branch, on the
activations, to every SplitHeads / MergeHeads / Dense call whose params hold
`lora_a`. Because the adapters sit in "params" beside their kernels, nn.scan
slices their leading layer axis exactly as it slices the kernels, and
`make_rng("dropout")` gets nn.scan's per-layer split. Unscanned stacks
(`layers_0`, ...) need nothing special. `merge_lora` folds W + scale·A@B for
eval and export; training keeps the activation branch because the dropout
acts on the adapter's input.

Omni model. The LoRA tree mirrors whatever tree it is made from: from the
omni model's params the adapters sit under `llm/decoder/...`, the vision
tower and connector get none (the target regex names the decoder's kernels
only), and `apply_with_lora` / `merge_lora` take the whole omni tree.

Rank. The default (`rank=None`) is the rank whose adapters hold
`target_fraction` (5%) of the LLM's parameters (the `llm/` subtree of an
omni tree; embeddings and head included, towers not), rounded to the
nearest integer (`rank_for_fraction`). Per layer and per unit of rank the
adapters hold Σ (fan_in + fan_out) over the kernels:
  q, o: width + heads·head_dim each; k, v: width + kv_heads·head_dim each;
  gate, up, down: width + mlp_dim each.
Llama-3.1-8B dims (width 4096, 32 layers, 32/8 heads of 128, mlp 14336,
vocab 128256; 8.03 B parameters): 81,920 per layer per rank, 2.62 M per rank,
so r = 153 gives 401 M = 4.99% (r = 128: 4.18%, r = 160: 5.22%). The tiny
config (width 256, 4 layers, mlp 704, vocab 1024; 3.48 M): 18,688 per rank,
r = 9 gives 4.84%.

Logical axes: A carries its kernel's input axes and B its output axes (with
'layers' in front when scanned); the rank axis is None (replicated). No new
names in the rules table.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from m2omni_jax.models import layers

LORA_A, LORA_B = "lora_a", "lora_b"
DEFAULT_TARGET_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Target:
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]


TARGETS = {
    "query": Target(("embed",), ("heads", "head_dim")),
    "key": Target(("embed",), ("kv_heads", "head_dim")),
    "value": Target(("embed",), ("kv_heads", "head_dim")),
    "out": Target(("heads", "head_dim"), ("embed",)),
    "gate": Target(("embed",), ("mlp",)),
    "up": Target(("embed",), ("mlp",)),
    "down": Target(("mlp",), ("embed",)),
}
# The LLM decoder's kernels only (the vision/audio towers also have query/out modules);
# `layer_i/` is the scanned DecoderBlock of an interleaved MoE stack.
_TARGET_PATH = re.compile(r"(^|/)decoder/layers(_\d+)?/(layer_\d+/)?"
                          r"(attention/(?P<attn>query|key|value|out)|mlp/(?P<mlp>gate|up|down))/kernel$")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int | None = None  # None: rank_for_fraction(params, target_fraction)
    alpha: float | None = None  # None: 2·rank
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)
    target_fraction: float = DEFAULT_TARGET_FRACTION
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"lora.targets has unknown names {sorted(unknown)}; known: {tuple(TARGETS)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1 or None, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    def scale(self, rank: int) -> float:
        return (2.0 * rank if self.alpha is None else float(self.alpha)) / rank


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(nn.unbox(tree))


def target_kernels(params, targets=tuple(TARGETS)) -> dict[tuple[str, ...], tuple[str, Any]]:
    """{kernel path: (target name, kernel)} for the LLM decoder kernels LoRA adapts.

    MoE expert kernels (an `mlp` with a `router`) are left out: their kernels
    carry an expert axis the adapters do not have [ours]; attention is adapted.
    """
    flat = _flat(params)
    moe_mlps = {path[:-2] for path in flat if path[-2:] == ("router", "kernel")}
    found = {}
    for path, kernel in flat.items():
        m = _TARGET_PATH.search("/".join(path))
        name = m and (m["attn"] or m["mlp"])
        if name in targets and path[:-2] not in moe_mlps:
            found[path] = (name, kernel)
    if not found:
        raise ValueError("no LoRA target kernels (decoder/layers/{attention,mlp}/*/kernel) in params")
    return found


def _split_shape(name: str, kernel) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(stacked layer dims, input dims, output dims) of a target kernel."""
    t = TARGETS[name]
    n_stack = kernel.ndim - len(t.in_axes) - len(t.out_axes)
    shape = tuple(kernel.shape)
    return shape[:n_stack], shape[n_stack:n_stack + len(t.in_axes)], shape[n_stack + len(t.in_axes):]


def params_per_rank(params, targets=tuple(TARGETS)) -> int:
    """LoRA parameters per unit of rank: Σ layers·(fan_in + fan_out) over the targets."""
    total = 0
    for name, kernel in target_kernels(params, targets).values():
        stack, fan_in, fan_out = _split_shape(name, kernel)
        total += math.prod(stack) * (math.prod(fan_in) + math.prod(fan_out))
    return total


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def llm_params(params):
    """The LLM's tree: the `llm/` subtree of an omni model's params, or `params` itself."""
    params = nn.unbox(params)
    return params["llm"] if "llm" in params else params


def rank_for_fraction(params, fraction: float = DEFAULT_TARGET_FRACTION, targets=tuple(TARGETS)) -> int:
    """The rank (>= 1) whose adapters come nearest `fraction` of the LLM's parameters in `params`."""
    params = llm_params(params)
    return max(1, round(fraction * count_params(params) / params_per_rank(params, targets)))


def init_lora(params, config: LoRAConfig = LoRAConfig(), rng=None, *, boxed: bool = False):
    """LoRA tree {…/<target>/lora_a, lora_b} for `params` (the LLM's, or the omni tree holding it).

    `rng` defaults to key(config.seed). Works under `jax.eval_shape` too. With
    `boxed`, leaves are `nn.Partitioned` with logical axis names (for shardings).
    """
    rng = jax.random.key(config.seed) if rng is None else rng
    lora_params = _init_lora(nn.unbox(params), config, rng)
    return box(lora_params) if boxed else lora_params


@functools.partial(jax.jit, static_argnums=(1,))
def _init_lora(params, config: LoRAConfig, rng):
    rank = config.rank or rank_for_fraction(params, config.target_fraction, config.targets)
    kernels = sorted(target_kernels(params, config.targets).items())
    # One uniform draw sliced per adapter: a threefry per leaf costs seconds of compile each on CPU.
    sizes = [math.prod(_split_shape(name, k)[0] + _split_shape(name, k)[1]) * rank for _, (name, k) in kernels]
    draws = jnp.split(jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0),
                      list(itertools.accumulate(sizes))[:-1])
    out = {}
    for (path, (name, kernel)), u in zip(kernels, draws):
        stack, fan_in, fan_out = _split_shape(name, kernel)
        a = u.reshape(stack + fan_in + (rank,)) * math.prod(fan_in) ** -0.5
        out[path[:-1] + (LORA_A,)] = a.astype(kernel.dtype)
        out[path[:-1] + (LORA_B,)] = jnp.zeros(stack + (rank,) + fan_out, kernel.dtype)
    return traverse_util.unflatten_dict(out)


def box(lora_params):
    """The tree with each leaf in an `nn.Partitioned` naming its logical axes.

    A carries its kernel's input axes, B its output axes, the rank axis None,
    and a leading 'layers' axis where the kernel is nn.scan-stacked.
    """
    def boxed(path, x):
        keys = [getattr(k, "key", k) for k in path]
        t = TARGETS[keys[-2]]
        axes = t.in_axes + (None,) if keys[-1] == LORA_A else (None,) + t.out_axes
        return nn.Partitioned(x, ("layers",) * (x.ndim - len(axes)) + axes)
    return jax.tree_util.tree_map_with_path(boxed, nn.unbox(lora_params))


def lora_fraction(params, lora_params) -> float:
    """LoRA parameters / the LLM's parameters in `params` (DESIGN's ~5%)."""
    return count_params(lora_params) / count_params(llm_params(params))


def combine(params, lora_params):
    """One params tree: the base tree with the adapters beside their kernels."""
    merged = _flat(params)
    merged.update(_flat(lora_params))
    return traverse_util.unflatten_dict(merged)


# --------------------------------------------------------------------------- applying


_ADAPTED = (layers.SplitHeads, layers.MergeHeads, nn.Dense)


def _adapter_branch(module, x, config: LoRAConfig, deterministic: bool):
    """scale · dropout(x)·A·B for one adapted projection (per layer inside nn.scan)."""
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    if config.dropout > 0 and not deterministic:
        keep = 1.0 - config.dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=layers.to_dtype(module.dtype))
    h = jnp.tensordot(x, a, axes=a.ndim - 1)
    return config.scale(a.shape[-1]) * jnp.tensordot(h, b, axes=1)


def lora_interceptor(config: LoRAConfig, deterministic: bool):
    """Method interceptor adding the adapter branch to projections whose params hold lora_a."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        if (context.method_name != "__call__" or not isinstance(module, _ADAPTED)
                or not module.has_variable("params", LORA_A)):
            return y
        return y + _adapter_branch(module, args[0], config, deterministic).astype(y.dtype)
    return intercept


def apply_with_lora(model: nn.Module, params, lora_params, *args, rng=None, deterministic: bool = True,
                    config: LoRAConfig = LoRAConfig(), **kwargs):
    """`model.apply` with the adapters; `rng` (the dropout key) is needed unless deterministic.

    `variables` adds other collections (e.g. `{"cache": cache}`); the other
    kwargs go to `model.apply` (e.g. `decode=True, mutable=["cache"]`).
    """
    variables = {"params": combine(params, lora_params)}
    extra = kwargs.pop("variables", None)
    if extra:
        variables.update(extra)
    if not deterministic and config.dropout > 0:
        if rng is None:
            raise ValueError("apply_with_lora: training mode (deterministic=False) needs a dropout rng")
        kwargs["rngs"] = {**kwargs.get("rngs", {}), "dropout": rng}
    with nn.intercept_methods(lora_interceptor(config, deterministic)):
        return model.apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------- merging


def lora_delta(name: str, a, b, kernel_shape) -> jax.Array:
    """A@B in the kernel's layout (leading layer axes kept apart)."""
    n_in = len(TARGETS[name].in_axes)
    n_stack = a.ndim - n_in - 1
    stack = a.shape[:n_stack]
    a2 = a.reshape(stack + (-1, a.shape[-1]))
    b2 = b.reshape(stack + (b.shape[n_stack], -1))
    return jnp.matmul(a2, b2).reshape(kernel_shape)


def merge_lora(params, lora_params, config: LoRAConfig = LoRAConfig()):
    """Base params with W + scale·A@B folded into every adapted kernel (for eval / export)."""
    flat, adapters = _flat(params), _flat(lora_params)
    for path, (name, kernel) in target_kernels(params).items():
        a_path = path[:-1] + (LORA_A,)
        if a_path not in adapters:
            continue
        a, b = adapters[a_path], adapters[path[:-1] + (LORA_B,)]
        delta = config.scale(a.shape[-1]) * lora_delta(name, a.astype(jnp.float32), b.astype(jnp.float32),
                                                        kernel.shape)
        flat[path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)

"""Building blocks shared by the towers: norms, initialisers, remat policies."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name_or_dtype) -> Dtype:
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[name_or_dtype]
    return name_or_dtype


def kernel_init(axes: tuple[str, ...], scale: float = 1.0, in_axis=-2, out_axis=-1) -> Callable:
    """Variance-scaling (fan-in) truncated-normal init annotated with logical axis names."""
    init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)
    return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def ones_init(axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.ones, axes)


REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything
    "dots": jax.checkpoint_policies.checkpoint_dots,  # save matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def fourier_features(fractions, num_frequencies: int):
    """(..., 2) fractions in [0, 1] -> (..., 4·num_frequencies) sin/cos of π·2^k·fraction."""
    angles = fractions[..., None] * (jnp.pi * 2.0 ** jnp.arange(num_frequencies))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(*fractions.shape[:-1], -1)


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def maybe_remat(block_cls, policy_name: str, static_argnums=()):
    """Wraps a block class in nn.remat unless the policy is 'none'."""
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=remat_policy(policy_name), prevent_cse=False,
                    static_argnums=static_argnums)


class RMSNorm(nn.Module):
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", ones_init(("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with logically named scale and bias (for the encoders)."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            scale_init=ones_init(("norm",)), bias_init=zeros_init(("norm",)))(x)


# Multi-head projections own their full-shape kernels: nn.DenseGeneral
# initialises a flattened 2-D kernel, which cannot carry 3 logical axis names
# once a mesh is active.

class SplitHeads(nn.Module):
    """Linear (..., embed) -> (..., heads, head_dim)."""
    num_heads: int
    head_dim: int
    heads_axis: str = "heads"  # "kv_heads" for grouped key/value projections
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (self.num_heads, self.head_dim)
        kernel = self.param("kernel", kernel_init(("embed", self.heads_axis, "head_dim"), in_axis=0,
                                                  out_axis=(1, 2)),
                            (x.shape[-1],) + shape, to_dtype(self.param_dtype))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=to_dtype(self.dtype))
        y = jnp.einsum("...e,ehd->...hd", x, kernel)
        if self.use_bias:
            y = y + self.param("bias", zeros_init((self.heads_axis, "head_dim")), shape,
                               to_dtype(self.param_dtype)).astype(y.dtype)
        return y


class MergeHeads(nn.Module):
    """Linear (..., heads, head_dim) -> (..., features); `zero_init`: the kernel starts at 0."""
    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        axes = ("heads", "head_dim", "embed")
        init = zeros_init(axes) if self.zero_init else kernel_init(axes, in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", init, x.shape[-2:] + (self.features,), to_dtype(self.param_dtype))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=to_dtype(self.dtype))
        y = jnp.einsum("...hd,hde->...e", x, kernel)
        if self.use_bias:
            y = y + self.param("bias", zeros_init(("embed",)), (self.features,),
                               to_dtype(self.param_dtype)).astype(y.dtype)
        return y


# --------------------------------------------------------------------------- attention

# Which softmax attention the towers run, chosen per tower by config
# (model.llm.attention_implementation, model.audio.attention_implementation; the ViT's
# segment_attention and the attn-pool connector take an argument, default DEFAULT_ATTENTION):
#   "einsum": ours, grouped einsums and a where-masked fp32 softmax;
#   "xla":    jax.nn.dot_product_attention's XLA path (the same maths, vmapped over groups);
#   "cudnn":  jax.nn.dot_product_attention's cuDNN flash attention (GPU only, bf16/fp16
#             q/k/v; the boolean mask becomes an additive bias).
# The default is the faster of the first two on CPU (benchmarks/attention.py: "einsum" 15-25%
# less time forward+backward at the bench_32m LLM and the tiny ViT shapes, fp32).
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
DEFAULT_ATTENTION = "einsum"


def check_attention_implementation(implementation: str, field: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{field}={implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}")


def dot_product_attention(q, k, v, mask=None, *, implementation: str = DEFAULT_ATTENTION):
    """softmax(q·kᵀ/√D)·v with fp32 logits and softmax, keys filtered by a boolean mask.

    q (B, L, H, D); k, v (B, S, K, D) with H a multiple of K (grouped-query: query
    head h reads kv head h // (H/K)); mask broadcastable to (B, H, L, S), True =
    attend, or None. -> (B, L, H, D). A query with no allowed key averages all
    values (finite: padding rows stay harmless); every implementation agrees on that.
    """
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    check_attention_implementation(implementation, "attention implementation")
    batch, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    # Queries group-major (B, K, G, L, D) first: the einsums then write the (B, K, G, L, S)
    # logits in place and only the small q and output are transposed. On CPU forward +
    # backward takes ~30% less time than with (B, K, L, G, S) logits (a transpose of them
    # each way) and 15-25% less than "xla" (benchmarks/attention.py).
    q = q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim).transpose(0, 2, 3, 1, 4)
    logits = jnp.einsum("bkgld,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(head_dim ** -0.5)
    if mask is not None:
        mask = jnp.asarray(mask).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
        if mask.shape[1] == 1:  # one mask for every head
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(mask.shape[0], num_kv, num_heads // num_kv, *mask.shape[2:])
        # Masked keys get exactly zero weight (exp underflows), so nothing leaks in.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->bkgld", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)

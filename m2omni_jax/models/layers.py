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

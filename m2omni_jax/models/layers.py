"""Building blocks shared by the towers: norms, initialisers, remat policies."""
from __future__ import annotations

import math
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


def token_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` for activations (..., in) · kernel (in, ...): the leading (token) axes
    are flattened into one first, so the kernel's gradient contracts a single axis of the
    tokens. XLA:CPU lays the (B, L, in) operand of a two-axis (B, L) contraction out
    transposed, with the elementwise work before it fused into that copy: the bench_32m
    SwiGLU MLP's forward + backward took 1.8x the time of the flattened form (same values).
    On TPU and GPU the reshape is a bitcast. Any other contraction goes to lax.dot_general."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    trailing = tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
    if lhs_batch or rhs_batch or lhs.ndim <= n + 1 or not trailing or (n > 1 and tuple(rhs_contract) != tuple(range(n))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    lead = lhs.shape[:lhs.ndim - n]
    tokens = lhs.reshape(-1, math.prod(lhs.shape[lhs.ndim - n:]))
    if n > 1:  # (in1, in2, ...) -> one axis
        rhs, rhs_contract = rhs.reshape((math.prod(rhs.shape[:n]),) + rhs.shape[n:]), (0,)
    flat = jax.lax.dot_general(tokens, rhs, (((1,), tuple(rhs_contract)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    return flat.reshape(lead + flat.shape[1:])


def token_matmul(x, kernel, in_axes: int = 1):
    """x (..., *in) · kernel (*in, *out) -> (..., *out) over flattened tokens (`token_dot_general`)."""
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    return token_dot_general(x, kernel, (contract, ((), ())))


class Dense(nn.Dense):
    """nn.Dense (same parameters) whose matmul runs over flattened tokens (`token_dot_general`)."""
    dot_general: Callable | None = token_dot_general


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate)·up, the SwiGLU MLP's hidden activation. Its backward pass recomputes the
    sigmoid from `gate` rather than saving it: autodiff of silu(g)·u keeps ~4 (B, L, mlp)
    tensors per layer for the backward pass, this keeps gate and up (fewer writes and reads
    of the largest activations, and less memory in an un-rematerialised stack)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_hidden):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    d_up = d_hidden * gate * sigmoid
    d_gate = d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
        y = token_matmul(x, kernel)
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
        y = token_matmul(x, kernel, in_axes=2)
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


def dot_product_attention(q, k, v, mask=None, *, implementation: str = DEFAULT_ATTENTION,
                          causal_blocks: int = 1):
    """softmax(q·kᵀ/√D)·v with fp32 logits and softmax, keys filtered by a boolean mask.

    q (B, L, H, D); k, v (B, S, K, D) with H a multiple of K (grouped-query: query
    head h reads kv head h // (H/K)); mask broadcastable to (B, H, L, S), True =
    attend, or None. -> (B, L, H, D). A query with no allowed key averages all
    values (finite: padding rows stay harmless); every implementation agrees on that.
    causal_blocks > 1 ("einsum" only): the caller's mask is causal with q and k aligned
    (query i never attends key j > i, and always itself); the queries then go in this many
    blocks, each skipping the keys after its last query (which have zero weight anyway), so
    4 blocks compute 5/8 of the L×S logits.
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
    if mask is None:
        mask = jnp.ones((1, 1, 1, 1, 1), bool)
    else:
        mask = jnp.asarray(mask).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
        if mask.shape[1] == 1:  # one mask for every head
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(mask.shape[0], num_kv, num_heads // num_kv, *mask.shape[2:])
    if causal_blocks > 1 and length == k.shape[1] and length % causal_blocks == 0:
        size = length // causal_blocks
        rows = lambda start: mask if mask.shape[3] == 1 else mask[:, :, :, start:start + size]  # noqa: E731
        out = jnp.concatenate([_grouped_attention(q[:, :, :, start:start + size], k[:, :start + size],
                                                  v[:, :start + size], rows(start)[..., :start + size])
                               for start in range(0, length, size)], axis=3)
    else:
        out = _grouped_attention(q, k, v, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


# The backward pass recomputes the (B, K, G, L, S) probabilities from q and k (one matmul)
# instead of saving them, and uses Σₛ pₛ·dpₛ = dout·out (flash attention's trick), so only
# O(L) tensors are kept per layer: a scanned, un-rematerialised stack no longer stores
# L×S fp32 probabilities for every layer, and the softmax's backward skips a pass over them.
# bench_32m's train step on CPU: ~6% less CPU time per step (benchmarks/peers/train_vs_torch.py);
# the maths is the softmax's own.

def _masked_logits(q, k, mask):
    """Grouped q (B, K, G, L, D), k (B, S, K, D) -> fp32 logits (B, K, G, L, S), masked keys at
    the lowest float (exp underflows: they get exactly zero weight, so nothing leaks in)."""
    logits = jnp.einsum("bkgld,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, logits * jnp.float32(q.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min)


def _softmax_parts(logits):
    top = jnp.max(logits, axis=-1, keepdims=True)
    return top, jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)


@jax.custom_vjp
def _grouped_attention(q, k, v, mask):
    """softmax(q·kᵀ/√D, masked)·v for group-major q (B, K, G, L, D); k, v (B, S, K, D)."""
    return _grouped_attention_fwd(q, k, v, mask)[0]


def _grouped_attention_fwd(q, k, v, mask):
    logits = _masked_logits(q, k, mask)
    top, total = _softmax_parts(logits)
    probs = (jnp.exp(logits - top) / total).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->bkgld", probs, v)
    return out, (q, k, v, mask, out, top, total)


def _grouped_attention_bwd(residuals, d_out):
    q, k, v, mask, out, top, total = residuals
    probs = jnp.exp(_masked_logits(q, k, mask) - top) / total  # the forward's, recomputed
    d_v = jnp.einsum("bkgls,bkgld->bskd", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("bkgld,bskd->bkgls", d_out, v, preferred_element_type=jnp.float32)
    d_out_dot_out = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # Masked logits get no gradient (jnp.where's), even in a row with no allowed key.
    d_logits = jnp.where(mask, probs * (d_probs - d_out_dot_out), 0.0) * jnp.float32(q.shape[-1] ** -0.5)
    d_q = jnp.einsum("bkgls,bskd->bkgld", d_logits.astype(q.dtype), k)
    d_k = jnp.einsum("bkgls,bkgld->bskd", d_logits.astype(k.dtype), q)
    return d_q, d_k, d_v, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)

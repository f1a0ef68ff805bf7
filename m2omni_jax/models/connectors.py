"""Vision–language connectors: vision features -> LLM-width tokens.

`linear` is M2-omni's projector (Linear or Linear–GELU–Linear, then each
token L2-normalised); it keeps the token count of its input and so works on
the packed token sequence. The MM1 alternatives fix the count at
`num_tokens` (k, e.g. 64 or 144) per image: `avg_pool` and `c_abstractor`
take one image's token grid (B, H, W, C), `attn_pool` any token set.

Padded grids: the packed omni model (`models/omni.py`) places each image of
a row top-left in a fixed (Hmax, Wmax) grid and passes `extent` (B, 2), the
image's actual (rows, cols). Pooling then averages over the image's own
cells only (the bins of `adaptive_pool_matrix(H, √k)`, not of Hmax), and the
C-Abstractor zeroes the padding cells before every 3×3 conv (what "SAME"
zero padding sees at an image border), so a padded grid gives exactly the
tokens of the image's own (H, W) grid. `attn_pool` takes a key mask instead.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.models import layers
from m2omni_jax.models.layers import LayerNorm, kernel_init, to_dtype, zeros_init
from m2omni_jax.models.layers import DEFAULT_ATTENTION, MergeHeads, SplitHeads, dot_product_attention

CONNECTOR_KINDS = ("linear", "avg_pool", "attn_pool", "c_abstractor")


def l2_normalize(x, epsilon: float = 1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + epsilon)).astype(x.dtype)


def grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens {num_tokens} must be a perfect square for a grid connector")
    return side


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging weights; bin i spans [floor(i·in/out), ceil((i+1)·in/out))."""
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        lo, hi = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


def extent_pool_matrices(max_in: int, out_size: int, lengths):
    """(..., out_size, max_in): `adaptive_pool_matrix(n, out_size)` for each actual size n
    in `lengths` (an int array, 0..max_in), zero past column n; n = 0 gives zeros."""
    table = np.zeros((max_in + 1, out_size, max_in), np.float32)
    for n in range(1, max_in + 1):
        table[n, :, :n] = adaptive_pool_matrix(n, out_size)
    return jnp.asarray(table)[jnp.clip(lengths, 0, max_in)]


def grid_mask(extent, height: int, width: int):
    """(B, 2) actual (rows, cols) -> (B, height, width) bool: the cell lies in the image."""
    rows = jnp.arange(height)[None, :, None] < extent[:, 0, None, None]
    return rows & (jnp.arange(width)[None, None, :] < extent[:, 1, None, None])


def adaptive_avg_pool_2d(grid, out_height: int, out_width: int, extent=None):
    """(B, H, W, C) -> (B, out_height, out_width, C), any H, W (bins may overlap).

    extent (B, 2): each grid's actual (rows, cols) from the top left, the rest
    padding; the bins are those of the actual size (None: the whole grid).
    """
    if extent is None:
        rows = jnp.asarray(adaptive_pool_matrix(grid.shape[1], out_height), grid.dtype)
        cols = jnp.asarray(adaptive_pool_matrix(grid.shape[2], out_width), grid.dtype)
        return jnp.einsum("ih,bhwc,jw->bijc", rows, grid, cols)
    rows = extent_pool_matrices(grid.shape[1], out_height, extent[:, 0]).astype(grid.dtype)
    cols = extent_pool_matrices(grid.shape[2], out_width, extent[:, 1]).astype(grid.dtype)
    return jnp.einsum("bih,bhwc,bjw->bijc", rows, grid, cols)


def tokens_to_grid(tokens, height: int, width: int):
    """Merged tokens of one image (B, H·W, C), raster order -> (B, H, W, C)."""
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1])


def _flatten_grid(x):
    return x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 4 else x


def _require_grid(x, kind: str):
    if x.ndim != 4:
        raise ValueError(f"{kind} connector takes one image's token grid (B, H, W, C), got shape {x.shape}")


def _dtypes(module):
    return dict(dtype=to_dtype(module.dtype), param_dtype=to_dtype(module.param_dtype))


class LinearConnector(nn.Module):
    """M2-omni: Linear (or Linear–GELU–Linear when `mlp`) then per-token L2 norm."""
    out_width: int
    mlp: bool = False
    num_tokens: int | None = None  # if set, the input must have exactly this many tokens
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        x = _flatten_grid(x)
        if self.num_tokens is not None and x.shape[1] != self.num_tokens:
            raise ValueError(f"linear connector configured for {self.num_tokens} tokens got {x.shape[1]}")
        if self.mlp:
            x = layers.Dense(self.out_width, kernel_init=kernel_init(("embed", "mlp")),
                         bias_init=zeros_init(("mlp",)), name="fc1", **_dtypes(self))(x)
            x = nn.gelu(x, approximate=False)
        x = layers.Dense(self.out_width, kernel_init=kernel_init(("mlp", "embed")),
                     bias_init=zeros_init(("embed",)), name="fc2" if self.mlp else "proj",
                     **_dtypes(self))(x)
        return l2_normalize(x)


class AvgPoolConnector(nn.Module):
    """MM1: adaptive average pooling of the token grid to √k×√k, then Linear."""
    out_width: int
    num_tokens: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, grid, extent=None):
        """grid (B, H, W, C); extent (B, 2) actual (rows, cols), None: the whole grid."""
        _require_grid(grid, "avg_pool")
        side = grid_side(self.num_tokens)
        pooled = _flatten_grid(adaptive_avg_pool_2d(grid, side, side, extent))
        return layers.Dense(self.out_width, kernel_init=kernel_init(("mlp", "embed")),
                        bias_init=zeros_init(("embed",)), name="proj", **_dtypes(self))(pooled)


class AttnPoolConnector(nn.Module):
    """MM1: k learnable queries cross-attend to the image tokens."""
    out_width: int
    num_tokens: int = 64
    num_heads: int = 8
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_implementation: str = DEFAULT_ATTENTION  # models/layers.py: dot_product_attention

    @nn.compact
    def __call__(self, x, mask=None):
        """x (B, N, C) or (B, H, W, C); mask (B, N) True for real tokens."""
        x = _flatten_grid(x)
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"attn_pool: token width {width} not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        x = LayerNorm(name="norm", **_dtypes(self))(x)
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("queries", "embed")), (self.num_tokens, width),
            to_dtype(self.param_dtype))
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = SplitHeads(self.num_heads, head_dim, use_bias=True, name="query", **dtypes)(queries)
        k = SplitHeads(self.num_heads, head_dim, use_bias=True, name="key", **dtypes)(x)
        v = SplitHeads(self.num_heads, head_dim, use_bias=True, name="value", **dtypes)(x)
        q = jnp.broadcast_to(q, (x.shape[0],) + q.shape)
        pooled = dot_product_attention(q, k, v, None if mask is None else mask[:, None, None, :],
                                       implementation=self.attention_implementation)
        return MergeHeads(self.out_width, use_bias=True, name="out", **dtypes)(pooled)


class RegBottleneck(nn.Module):
    """Honeybee's C-Abstractor block (timm RegNet `RegBottleneck`): 1×1 → depthwise 3×3 →
    squeeze-excite (`se_ratio` of the input width) → 1×1, each conv with LayerNorm over channels
    (no batch statistics), SiLU, a residual (1×1-projected when the widths differ)."""
    features: int
    se_ratio: float = 0.25
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, mask=None):
        """x (B, H, W, C); mask (B, H, W) bool, False on padding cells (None: no padding).
        With a mask the 3×3 conv reads zeros there, the squeeze averages the valid cells only,
        and the output is zero there."""
        def conv(features, size, axes, name, groups=1):
            # flax forbids a logical name twice in one array: the width dim stays unnamed.
            return nn.Conv(features, (size, size), padding="SAME", use_bias=False, name=name,
                           feature_group_count=groups, kernel_init=kernel_init(("conv", None) + axes),
                           **_dtypes(self))

        def norm(name):
            return LayerNorm(name=name, **_dtypes(self))

        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = norm("shortcut_norm")(conv(self.features, 1, (None, "embed"), "shortcut")(x))
        keep = (lambda a: a) if mask is None else (lambda a: jnp.where(mask[..., None], a, 0).astype(a.dtype))
        h = nn.silu(norm("norm1")(conv(self.features, 1, ("embed", "mlp"), "reduce")(x)))
        h = nn.silu(norm("norm2")(conv(self.features, 3, (None, "mlp"), "spatial", groups=self.features)(keep(h))))
        squeezed = max(1, round(x.shape[-1] * self.se_ratio))
        h = h * SqueezeExcite(squeezed, name="squeeze_excite", **_dtypes(self))(h, mask)
        h = norm("norm3")(conv(self.features, 1, ("mlp", "embed"), "expand")(h))
        return keep(nn.silu(h + shortcut))



class SqueezeExcite(nn.Module):
    """Per-channel gates in (0, 1) from the mean over the (valid) cells: Dense–ReLU–Dense–sigmoid."""
    squeezed: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, h, mask=None):
        """h (B, H, W, C) → gates (B, 1, 1, C); mask (B, H, W) bool (None: every cell)."""
        if mask is None:
            mean = h.mean(axis=(1, 2))
        else:
            valid = mask[..., None].astype(h.dtype)
            mean = (h * valid).sum(axis=(1, 2)) / jnp.maximum(valid.sum(axis=(1, 2)), 1)
        z = nn.relu(layers.Dense(self.squeezed, kernel_init=kernel_init(("mlp", None)), bias_init=zeros_init((None,)),
                             name="reduce", **_dtypes(self))(mean))
        gate = layers.Dense(h.shape[-1], kernel_init=kernel_init((None, "mlp")), bias_init=zeros_init(("mlp",)),
                        name="expand", **_dtypes(self))(z)
        return jax.nn.sigmoid(gate)[:, None, None, :]


class CAbstractor(nn.Module):
    """Honeybee / MM1: + a learned position embedding per grid cell → RegNet blocks → adaptive
    avg pool to √k×√k → RegNet blocks → MLP readout (Honeybee, arXiv 2312.06742, §3.2)."""
    out_width: int
    num_tokens: int = 64
    hidden_width: int | None = None  # default: the input width
    depth: int = 3
    max_grid_side: int | None = None  # the position table's side (None: the first grid's)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, grid, extent=None):
        """grid (B, H, W, C); extent (B, 2) actual (rows, cols), None: the whole grid."""
        _require_grid(grid, "c_abstractor")
        rows, cols = grid.shape[1:3]
        table_side = self.max_grid_side or max(rows, cols)
        if max(rows, cols) > table_side:
            raise ValueError(f"a {rows}x{cols} grid is larger than the C-Abstractor's position table "
                             f"({table_side}x{table_side}, model.connector.max_grid_side)")
        side = grid_side(self.num_tokens)
        hidden = self.hidden_width or grid.shape[-1]
        mask = None if extent is None else grid_mask(extent, grid.shape[1], grid.shape[2])
        # Honeybee adds its position embedding to the encoder's tokens; here one per cell of the
        # (H, W) grid, so a cell's embedding is its (row, col), whatever the image's size.
        init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None, "embed"))
        position = self.param("position_embedding", init, (table_side, table_side, grid.shape[-1]), self.param_dtype)
        x = grid + position[:rows, :cols].astype(grid.dtype)
        for i in range(self.depth):
            x = RegBottleneck(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage1_block{i}")(x, mask)
        x = adaptive_avg_pool_2d(x, side, side, extent)  # the pooled √k×√k grid has no padding
        for i in range(self.depth):
            x = RegBottleneck(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage2_block{i}")(x)
        x = _flatten_grid(x)
        x = layers.Dense(self.out_width, kernel_init=kernel_init(("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)), name="readout1", **_dtypes(self))(x)
        return layers.Dense(self.out_width, kernel_init=kernel_init(("mlp", "embed")),
                        bias_init=zeros_init(("embed",)), name="readout2", **_dtypes(self))(nn.silu(x))


def make_connector(kind: str, out_width: int, num_tokens: int | None = None, *, mlp: bool = False,
                   hidden_width: int | None = None, num_heads: int = 8, depth: int = 3,
                   max_grid_side: int | None = None,
                   dtype: str = "float32", param_dtype: str = "float32",
                   attention_implementation: str = DEFAULT_ATTENTION) -> nn.Module:
    """Builds the connector named by `kind` (one of CONNECTOR_KINDS).

    `num_tokens` (k) is required for the pooling connectors; for `linear` it is
    optional and only checked against the input.
    """
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    if kind == "linear":
        return LinearConnector(out_width, mlp=mlp, num_tokens=num_tokens, **dtypes)
    if kind not in CONNECTOR_KINDS:
        raise ValueError(f"unknown connector {kind!r}; use one of {CONNECTOR_KINDS}")
    if not num_tokens or num_tokens < 1:
        raise ValueError(f"connector {kind!r} needs num_tokens (e.g. 64 or 144), got {num_tokens}")
    if kind in ("avg_pool", "c_abstractor"):
        grid_side(num_tokens)
    if kind == "avg_pool":
        return AvgPoolConnector(out_width, num_tokens, **dtypes)
    if kind == "attn_pool":
        return AttnPoolConnector(out_width, num_tokens, num_heads, **dtypes,
                                 attention_implementation=attention_implementation)
    return CAbstractor(out_width, num_tokens, hidden_width, depth, max_grid_side, **dtypes)

"""NaViT vision encoder of M2-omni (Qwen2-VL's ViT) over packed patch sequences.

Input is a pack of many images/frames (see `data/image_preprocessing.py`):
patches (B, N, C·2·14·14), segment ids (B, N) with one id per image or video
temporal frame (0 = padding) and per-patch (row, col) ids (B, 2, N).
Attention stays within a segment; 2-D RoPE encodes the position inside it.
The PatchMerger fuses each 2×2 block (four consecutive patches) into one
token of `out_width`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2omni_jax.models import layers
from m2omni_jax.models.layers import (LayerNorm, MergeHeads, SplitHeads, fourier_features, kernel_init,
                                     maybe_remat, to_dtype, zeros_init)
from m2omni_jax.models.rope import apply_rotary, vision_2d_rope_angles

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    out_width: int = 64  # PatchMerger output; Qwen2-VL-7B's ViT emits its LLM width, 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2-VL's 1e-6. For a tower trained from scratch on centred pixels [ours]: ~1, so
    # the LayerNorms do not blow a near-empty patch (a faint gradient or noise
    # background) up to the size of an object's; with 1e-6 a bluish background corner
    # leaves the merger looking like a blue object.
    layer_norm_epsilon: float = 1e-6
    # Attend in query blocks of this many patches (None: all at once); bounds
    # the (heads, chunk, N) logits for large buckets. Must divide the bucket size.
    attention_query_chunk: int | None = None
    attention_implementation: str = layers.DEFAULT_ATTENTION  # models/layers.py: dot_product_attention
    # [ours] Zero-initialise each block's attention output and fc2 kernels, so a tower
    # trained from scratch starts as the identity on its patch embeddings (SkipInit /
    # zero-init residuals). A random tower's near-uniform attention otherwise mixes every
    # image's average into all its tokens, and the merger's LayerNorm blows that mix up to
    # full size: empty background tokens look like the objects, and the LLM learns no
    # colour at all in the first hundreds of steps (built-in benchmark). Leave it off when
    # loading pretrained weights, which overwrite the init anyway.
    zero_init_residual: bool = False
    # [ours] > 0: add to each patch embedding a projection of Fourier features of the patch's
    # place in its image, as fractions of the image's rows and columns (NaViT's fractional
    # positions). 2-D RoPE alone is relative: a from-scratch tower then hardly tells where
    # in the image an object is ("top left") unless the image is only 2x2 tokens.
    fractional_position_frequencies: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan: bool = True

    def __post_init__(self):
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"width {self.width} must split into {self.num_heads} heads "
                             "with a head dim divisible by 4 (2-D RoPE)")
        layers.check_attention_implementation(self.attention_implementation, "model.vision.attention_implementation")

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def patch_embed_macs(self) -> int:
        """Multiply-adds of the patch embedding (fractional positions included) per patch."""
        return self.patch_dim * self.width + 4 * self.fractional_position_frequencies * self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def tiny(cls, **overrides) -> "VisionConfig":
        return cls(**{**dict(width=64, depth=2, num_heads=4, out_width=64), **overrides})

    @classmethod
    def qwen2vl_675m(cls, **overrides) -> "VisionConfig":
        """The Qwen2-VL ViT used by M2-omni-9B/72B (675M parameters)."""
        defaults = dict(width=1280, depth=32, num_heads=16, out_width=3584,
                        attention_query_chunk=1024, remat_policy="full")
        return cls(**{**defaults, **overrides})


def training_flops_per_pack(config: VisionConfig, pack_size: int) -> float:
    """Model FLOPs (forward + backward) of one row's pack of `pack_size` patches.

    6·N per patch for the patch embedding and each block's matmuls, plus the
    masked pack-wide attention as computed (12·depth·width·pack_size per
    patch, like the LLM's full L×L count), plus the PatchMerger's two matmuls
    per merged token. Padding patches are computed, so they are counted.
    """
    w, group = config.width, config.spatial_merge_size ** 2
    per_patch = config.patch_embed_macs + config.depth * (4 * w * w + 2 * w * config.mlp_dim)
    per_merged = group * w * group * w + group * w * config.out_width
    attention = 12 * config.depth * w * pack_size
    return 6.0 * (per_patch * pack_size + per_merged * pack_size // group) + attention * pack_size


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _attend(q, k, v, q_segments, kv_segments, implementation):
    """Softmax attention (fp32) where query and key segment ids are equal (layers.dot_product_attention)."""
    # Padding (segment 0) attends only to padding; other segments cannot leak in.
    allowed = q_segments[:, None, :, None] == kv_segments[:, None, None, :]
    return layers.dot_product_attention(q, k, v, allowed, implementation=implementation)


def segment_attention(q, k, v, segment_ids, query_chunk: int | None = None, *,
                      implementation: str = layers.DEFAULT_ATTENTION):
    """q, k, v (B, N, heads, head_dim); each query sees only keys of its own segment.

    `query_chunk`: attend in blocks of that many queries, one after another, so the
    (heads, chunk, N) logits of one block are all that exist at a time, forward and
    backward: each block is rematerialised in the backward pass (without that the
    scan keeps every block's probabilities for the backward pass: all N² again).
    With cuDNN flash attention the full N² never exists anyway; leave it None there.
    """
    batch, length, heads, head_dim = q.shape
    if query_chunk is None or query_chunk >= length:
        return _attend(q, k, v, segment_ids, segment_ids, implementation)
    if length % query_chunk:
        raise ValueError(f"attention_query_chunk {query_chunk} must divide the pack length {length}")
    num_chunks = length // query_chunk
    q_chunks = q.reshape(batch, num_chunks, query_chunk, heads, head_dim).swapaxes(0, 1)
    segment_chunks = segment_ids.reshape(batch, num_chunks, query_chunk).swapaxes(0, 1)
    attend_chunk = jax.checkpoint(lambda qs: _attend(qs[0], k, v, qs[1], segment_ids, implementation))
    out = jax.lax.map(attend_chunk, (q_chunks, segment_chunks))
    return out.swapaxes(0, 1).reshape(batch, length, heads, head_dim)


class VisionAttention(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x, rope_angles, segment_ids):
        cfg = self.config
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q = apply_rotary(SplitHeads(cfg.num_heads, cfg.head_dim, use_bias=True, name="query", **dtypes)(x), rope_angles)
        k = apply_rotary(SplitHeads(cfg.num_heads, cfg.head_dim, use_bias=True, name="key", **dtypes)(x), rope_angles)
        v = SplitHeads(cfg.num_heads, cfg.head_dim, use_bias=True, name="value", **dtypes)(x)
        q, k, v = (nn.with_logical_constraint(a, ACTIVATION_HEADS) for a in (q, k, v))
        out = segment_attention(q, k, v, segment_ids, cfg.attention_query_chunk,
                                implementation=cfg.attention_implementation)
        out = nn.with_logical_constraint(out, ACTIVATION_HEADS)
        return MergeHeads(cfg.width, use_bias=True, zero_init=cfg.zero_init_residual, name="out", **dtypes)(out)


class VisionMLP(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        h = layers.Dense(cfg.mlp_dim, kernel_init=kernel_init(("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)), name="fc1", **dtypes)(x)
        h = quick_gelu(nn.with_logical_constraint(h, ACTIVATION_MLP))
        fc2_init = zeros_init(("mlp", "embed")) if cfg.zero_init_residual else kernel_init(("mlp", "embed"))
        return layers.Dense(cfg.width, kernel_init=fc2_init, bias_init=zeros_init(("embed",)), name="fc2", **dtypes)(h)


class VisionBlock(nn.Module):
    """Pre-LN transformer block; (carry, None) signature for nn.scan."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x, rope_angles, segment_ids):
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_epsilon, dtype=to_dtype(cfg.dtype),
                    param_dtype=to_dtype(cfg.param_dtype))
        h = LayerNorm(**norm, name="attention_norm")(x)
        x = x + VisionAttention(cfg, name="attention")(h, rope_angles, segment_ids)
        h = LayerNorm(**norm, name="mlp_norm")(x)
        x = x + VisionMLP(cfg, name="mlp")(h)
        return nn.with_logical_constraint(x, ACTIVATION), None


class PatchMerger(nn.Module):
    """LayerNorm, concatenate each group of merge_size² consecutive tokens, Linear–GELU–Linear."""
    out_width: int
    merge_size: int = 2
    epsilon: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dtypes = dict(dtype=to_dtype(self.dtype), param_dtype=to_dtype(self.param_dtype))
        batch, length, width = x.shape
        group = self.merge_size ** 2
        if length % group:
            raise ValueError(f"pack length {length} must be a multiple of {group} to merge")
        x = LayerNorm(self.epsilon, name="norm", **dtypes)(x)
        x = x.reshape(batch, length // group, group * width)
        x = layers.Dense(group * width, kernel_init=kernel_init(("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)), name="fc1", **dtypes)(x)
        x = nn.gelu(nn.with_logical_constraint(x, ACTIVATION_MLP), approximate=False)
        x = layers.Dense(self.out_width, kernel_init=kernel_init(("mlp", "embed")),
                     bias_init=zeros_init(("embed",)), name="fc2", **dtypes)(x)
        return nn.with_logical_constraint(x, ACTIVATION)


def patch_grid_fractions(hw_positions, segment_ids):
    """(B, N, 2) centre of each patch as a fraction of its image's (rows, cols); hw_positions
    (B, 2, N), segment_ids (B, N). An image's extent is its segment's largest row / col."""
    rc = jnp.moveaxis(hw_positions, 1, 2)
    extent = jax.vmap(lambda hw, seg: jax.ops.segment_max(hw, seg, num_segments=seg.shape[0] + 1)[seg])(
        rc, segment_ids)
    return (rc + 0.5) / (jnp.maximum(extent, 0) + 1)


class VisionEncoder(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, patches, segment_ids, hw_positions):
        """patches (B, N, patch_dim), segment_ids (B, N), hw_positions (B, 2, N)
        -> (features (B, N/4, out_width), merged segment ids (B, N/4)); padding features are 0.
        """
        cfg = self.config
        dtype = to_dtype(cfg.dtype)
        x = patches.astype(dtype)
        # A Linear over the flattened (C, T, P, P) patch equals the Conv3d with stride = kernel.
        x = layers.Dense(cfg.width, use_bias=False, kernel_init=kernel_init(("patch", "embed")),
                     dtype=dtype, param_dtype=to_dtype(cfg.param_dtype), name="patch_embed")(x)
        if cfg.fractional_position_frequencies:
            fractions = fourier_features(patch_grid_fractions(hw_positions, segment_ids),
                                         cfg.fractional_position_frequencies)
            x = x + layers.Dense(cfg.width, use_bias=False, kernel_init=kernel_init((None, "embed")), dtype=dtype,
                             param_dtype=to_dtype(cfg.param_dtype), name="position_embed")(fractions.astype(dtype))
        x = nn.with_logical_constraint(x, ACTIVATION)
        angles = vision_2d_rope_angles(jnp.moveaxis(hw_positions, 1, 0), cfg.head_dim, cfg.rope_theta)

        block = maybe_remat(VisionBlock, cfg.remat_policy)
        if cfg.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, name="blocks")(x, angles, segment_ids)
        else:
            for i in range(cfg.depth):
                x, _ = block(cfg, name=f"block_{i}")(x, angles, segment_ids)

        features = PatchMerger(cfg.out_width, cfg.spatial_merge_size, cfg.layer_norm_epsilon,
                               cfg.dtype, cfg.param_dtype, name="merger")(x)
        merged_segment_ids = segment_ids[:, ::cfg.spatial_merge_size ** 2]
        features = jnp.where(merged_segment_ids[..., None] > 0, features, 0).astype(features.dtype)
        return nn.with_logical_constraint(features, ACTIVATION), merged_segment_ids

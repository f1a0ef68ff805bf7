"""Paraformer SAN-M audio encoder of M2-omni and its projector into the LLM.

Input: LFR features (B, F, 560) from `data/audio.py` and their lengths (B,).
The features are scaled by √width and get sinusoidal positions, then pass
`depth` pre-LN SAN-M blocks (the first maps 560 -> width and has no attention
residual, as FunASR's `encoders0`). A SAN-M block's attention adds an FSMN
memory: a depthwise 1-D convolution over the masked values, plus the values.
After the final LayerNorm every 3 consecutive frames are concatenated
(180 ms per token), projected to the LLM width and L2-normalised. The
output always has `num_audio_tokens` tokens; those past the audio are the
`<end_of_audio>` embedding, and frames past `max_frames` (3 per token) are cut.

Frames at or past a sequence's length never influence its valid frames:
attention masks them as keys, the FSMN zeroes them before and after the
convolution, everything else is per frame.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models import layers
from m2omni_jax.models.connectors import LinearConnector
from m2omni_jax.models.layers import (LayerNorm, MergeHeads, SplitHeads, kernel_init, maybe_remat,
                                     to_dtype, zeros_init)

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")
PROJECTORS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    input_dim: int = 560  # 80 mel bins x LFR m=7
    width: int = 64
    depth: int = 2  # SAN-M blocks, the 560 -> width input block included
    num_heads: int = 4
    mlp_dim: int = 128
    fsmn_kernel: int = 11
    fsmn_shift: int = 0  # > 0 moves the FSMN window into the past (streaming SAN-M)
    layer_norm_epsilon: float = 1e-12  # Paraformer's
    frames_per_token: int = 3
    out_width: int = 64  # the LLM width
    num_audio_tokens: int = 16
    projector: str = "linear"  # "linear" | "mlp" (Linear–GELU–Linear), then L2 norm per token
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan: bool = True
    attention_implementation: str = layers.DEFAULT_ATTENTION  # see layers.ATTENTION_IMPLEMENTATIONS
    # Paraformer's SAN-M dropout (0.1 there): on the positional input, the FSMN memory, the
    # feed-forward's hidden units and each block's residual branches; active only in training
    # (when the apply has a "dropout" RNG). Not on the attention probabilities [ours: our
    # attention kernels take no dropout].
    dropout: float = 0.0

    def __post_init__(self):
        layers.check_attention_implementation(self.attention_implementation, "model.audio.attention_implementation")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.audio.dropout={self.dropout} must be in [0, 1)")
        if self.width % self.num_heads:
            raise ValueError(f"audio width {self.width} must be a multiple of num_heads {self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"audio depth must be >= 1, got {self.depth}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"audio projector {self.projector!r} is not one of {PROJECTORS}")
        if not 0 <= self.fsmn_shift < self.fsmn_kernel - (self.fsmn_kernel - 1) // 2:
            raise ValueError(f"fsmn_shift {self.fsmn_shift} does not fit kernel {self.fsmn_kernel}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def max_frames(self) -> int:
        """LFR frames that fill all output tokens; longer inputs are truncated."""
        return self.num_audio_tokens * self.frames_per_token

    @classmethod
    def tiny(cls, **overrides) -> "AudioConfig":
        return cls(**overrides)

    @classmethod
    def paraformer(cls, **overrides) -> "AudioConfig":
        """M2-omni's encoder: Paraformer-large SAN-M, 256 tokens into a 4096-wide LLM."""
        defaults = dict(width=512, depth=50, num_heads=4, mlp_dim=2048, out_width=4096,
                        num_audio_tokens=256, remat_policy="full", dropout=0.1)
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_config(cls, cfg) -> "AudioConfig":
        """Builds from a ConfigDict / mapping, naming any field it does not know."""
        return dataclass_from_config(cls, cfg, "model.audio")


def sinusoidal_positions(length: int, depth: int) -> np.ndarray:
    """FunASR's encoding: positions 1..length, [sin | cos] halves, timescales up to 10^4."""
    increment = np.log(10000.0) / (depth / 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(depth // 2))
    scaled = np.arange(1, length + 1)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class FSMNMemory(nn.Module):
    """Depthwise conv (no bias) over time of the masked values, plus the values, masked.

    values (B, T, heads, head_dim), frame_mask (B, T) -> (B, T, heads, head_dim).
    Output frame t sees inputs t - left … t + right with zero padding outside,
    left = (kernel-1)//2 + shift, as FunASR's `forward_fsmn`.
    """
    kernel_size: int
    shift: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, values, frame_mask):
        heads, head_dim = values.shape[-2:]
        init = nn.initializers.normal(self.kernel_size ** -0.5)  # fan-in of one channel: the taps
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("conv", "heads", "head_dim")),
                            (self.kernel_size, heads, head_dim), to_dtype(self.param_dtype))
        mask = frame_mask[:, :, None, None].astype(values.dtype)
        values = values * mask
        left = (self.kernel_size - 1) // 2 + self.shift
        padded = jnp.pad(values, ((0, 0), (left, self.kernel_size - 1 - left), (0, 0), (0, 0)))
        length = values.shape[1]
        kernel = kernel.astype(values.dtype)
        memory = sum(padded[:, j:j + length] * kernel[j] for j in range(self.kernel_size))
        return (memory + values) * mask


def dropout(module: nn.Module, rate: float, x):
    """Dropout at `rate` while training: when the apply has a "dropout" RNG (the train step's)."""
    return nn.Dropout(rate, deterministic=not module.has_rng("dropout"))(x)


def masked_attention(q, k, v, frame_mask, implementation: str = layers.DEFAULT_ATTENTION):
    """Softmax attention in fp32 over the valid keys; q, k, v (B, T, heads, head_dim)."""
    return layers.dot_product_attention(q, k, v, frame_mask[:, None, None, :], implementation=implementation)


class SANMAttention(nn.Module):
    """Multi-head self-attention whose output adds the FSMN memory of the values."""
    config: AudioConfig

    @nn.compact
    def __call__(self, x, frame_mask):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        project = lambda name: SplitHeads(cfg.num_heads, cfg.head_dim, use_bias=True,  # noqa: E731
                                          name=name, **dtypes)(x)
        q, k, v = (nn.with_logical_constraint(project(n), ACTIVATION_HEADS) for n in ("query", "key", "value"))
        attended = masked_attention(q, k, v, frame_mask, cfg.attention_implementation)
        attended = nn.with_logical_constraint(attended, ACTIVATION_HEADS)
        memory = FSMNMemory(cfg.fsmn_kernel, cfg.fsmn_shift, name="fsmn", dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype)(v, frame_mask)
        memory = dropout(self, cfg.dropout, memory)  # FunASR's forward_fsmn
        # Both constraints matter: without them XLA's SPMD partitioner (jax 0.10.2,
        # CPU) mixes up batch shards when adding the heads-merged memory.
        out = nn.with_logical_constraint(MergeHeads(cfg.width, use_bias=True, name="out", **dtypes)(attended),
                                         ACTIVATION)
        memory = nn.with_logical_constraint(memory.reshape(memory.shape[:2] + (cfg.width,)), ACTIVATION)
        return out + memory.astype(out.dtype)


class FeedForward(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        h = layers.Dense(cfg.mlp_dim, kernel_init=kernel_init(("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)), name="fc1", **dtypes)(x)
        h = dropout(self, cfg.dropout, nn.relu(nn.with_logical_constraint(h, ACTIVATION_MLP)))
        return layers.Dense(cfg.width, kernel_init=kernel_init(("mlp", "embed")),
                        bias_init=zeros_init(("embed",)), name="fc2", **dtypes)(h)


class SANMBlock(nn.Module):
    """Pre-LN SAN-M block; (carry, None) signature for nn.scan.

    The attention residual exists only when the input already has the block's
    width (not for the 560-d input block).
    """
    config: AudioConfig

    @nn.compact
    def __call__(self, x, frame_mask):
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_epsilon, dtype=to_dtype(cfg.dtype),
                    param_dtype=to_dtype(cfg.param_dtype))
        attended = dropout(self, cfg.dropout, SANMAttention(cfg, name="attention")(
            LayerNorm(**norm, name="attention_norm")(x), frame_mask))
        x = x + attended if x.shape[-1] == cfg.width else attended
        x = x + dropout(self, cfg.dropout, FeedForward(cfg, name="mlp")(LayerNorm(**norm, name="mlp_norm")(x)))
        return nn.with_logical_constraint(x, ACTIVATION), None


def sanm_blocks(cfg: AudioConfig, x, frame_mask):
    """`cfg.depth` SAN-M blocks (`input_block`, then `blocks`: scanned unless cfg.scan is
    False) created in the calling compact module's scope; also the speech tokenizer's."""
    block = maybe_remat(SANMBlock, cfg.remat_policy)
    x, _ = block(cfg, name="input_block")(x, frame_mask)
    if cfg.depth == 1:
        return x
    if cfg.scan:
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,), length=cfg.depth - 1,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(cfg, name="blocks")(x, frame_mask)
        return x
    for i in range(cfg.depth - 1):
        x, _ = block(cfg, name=f"block_{i}")(x, frame_mask)
    return x


class AudioEncoder(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, features, lengths, end_of_audio=None):
        """features (B, F, input_dim), lengths (B,) valid frames; `end_of_audio`
        (out_width,) fills the tokens past the audio (default: an own learned
        parameter; pass the LLM's embedding consistently at init and apply).

        Returns (tokens (B, num_audio_tokens, out_width), valid (B, num_audio_tokens) bool).
        """
        cfg = self.config
        dtype = to_dtype(cfg.dtype)
        features = features[:, :cfg.max_frames]  # later frames could not reach a token
        lengths = jnp.minimum(lengths, features.shape[1])
        frame_mask = jnp.arange(features.shape[1])[None, :] < lengths[:, None]

        x = features.astype(jnp.float32) * cfg.width ** 0.5
        x = (x + sinusoidal_positions(features.shape[1], cfg.input_dim)).astype(dtype)
        x = nn.with_logical_constraint(dropout(self, cfg.dropout, x), ACTIVATION)
        x = sanm_blocks(cfg, x, frame_mask)
        x = LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, param_dtype=to_dtype(cfg.param_dtype),
                      name="final_norm")(x)
        tokens = LinearConnector(cfg.out_width, mlp=cfg.projector == "mlp", dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, name="projector")(self._group_frames(x, frame_mask))

        num_valid = -(-lengths // cfg.frames_per_token)
        valid = jnp.arange(cfg.num_audio_tokens)[None, :] < num_valid[:, None]
        if end_of_audio is None:
            end_of_audio = self.param("end_of_audio", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed",)), (cfg.out_width,), to_dtype(cfg.param_dtype))
        tokens = jnp.where(valid[..., None], tokens, end_of_audio.astype(tokens.dtype))
        return nn.with_logical_constraint(tokens, ACTIVATION), valid

    def _group_frames(self, x, frame_mask):
        """Zeroes padding frames, pads/cuts to max_frames, concatenates each frames_per_token."""
        cfg = self.config
        x = jnp.where(frame_mask[..., None], x, 0).astype(x.dtype)
        x = jnp.pad(x, ((0, 0), (0, cfg.max_frames - x.shape[1]), (0, 0)))
        return x.reshape(x.shape[0], cfg.num_audio_tokens, cfg.frames_per_token * cfg.width)

"""Rotary position embeddings: 1-D RoPE, M-RoPE (LLM) and 2-D RoPE (vision).

All functions return rotation angles of shape (..., L, head_dim // 2);
`apply_rotary` rotates query/key heads by them (the "rotate half" layout
used by Llama and Qwen2-VL: pair i is (x[i], x[i + head_dim/2])).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def inverse_frequencies(rotary_dim: int, theta: float) -> jnp.ndarray:
    """theta^(-2j/rotary_dim) for j in [0, rotary_dim/2)."""
    if rotary_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rotary_dim}")
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def rope_angles(positions: jnp.ndarray, head_dim: int, theta: float) -> jnp.ndarray:
    """Plain 1-D RoPE. positions (B, L) -> angles (B, L, head_dim/2)."""
    return positions[..., None].astype(jnp.float32) * inverse_frequencies(head_dim, theta)


def mrope_angles(positions: jnp.ndarray, head_dim: int, sections: Sequence[int],
                 theta: float) -> jnp.ndarray:
    """Multimodal RoPE (Qwen2-VL): frequency pairs split among (t, h, w).

    positions: (3, B, L) temporal/height/width ids. Pair j uses the id of the
    axis whose section contains j; with t == h == w this is exactly 1-D RoPE.
    """
    if positions.shape[0] != len(sections):
        raise ValueError(f"positions has {positions.shape[0]} axes but sections={tuple(sections)}")
    if sum(sections) != head_dim // 2:
        raise ValueError(f"mrope sections {tuple(sections)} must sum to head_dim/2 = {head_dim // 2}")
    inv_freq = inverse_frequencies(head_dim, theta)
    axis_of_pair = jnp.repeat(jnp.arange(len(sections)), jnp.asarray(sections),
                              total_repeat_length=head_dim // 2)
    # (3, B, L, D/2) -> pick per pair the axis it belongs to.
    all_angles = positions[..., None].astype(jnp.float32) * inv_freq
    one_hot = (axis_of_pair[None, :] == jnp.arange(len(sections))[:, None]).astype(jnp.float32)
    return jnp.einsum("abld,ad->bld", all_angles, one_hot)


def vision_2d_rope_angles(hw_positions: jnp.ndarray, head_dim: int, theta: float = 10000.0) -> jnp.ndarray:
    """2-D RoPE of the Qwen2-VL ViT: half the pairs rotate by row, half by column.

    hw_positions: (2, ..., N) row and column ids -> angles (..., N, head_dim/2).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    inv_freq = inverse_frequencies(head_dim // 2, theta)  # head_dim/4 frequencies
    rows = hw_positions[0][..., None].astype(jnp.float32) * inv_freq
    cols = hw_positions[1][..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([rows, cols], axis=-1)


def apply_rotary(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
    """x: (B, L, heads, head_dim); angles: (B, L, head_dim/2). Computed in fp32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)

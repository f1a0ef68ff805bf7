"""Rotary position embeddings: 1-D RoPE, M-RoPE (LLM) and 2-D RoPE (vision).

All functions return rotation angles of shape (..., L, head_dim // 2);
`apply_rotary` rotates query/key heads by them (the "rotate half" layout
used by Llama and Qwen2-VL: pair i is (x[i], x[i + head_dim/2])).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(rotary_dim: int, theta: float) -> jnp.ndarray:
    """theta^(-2j/rotary_dim) for j in [0, rotary_dim/2)."""
    if rotary_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rotary_dim}")
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


ROPE_SCALINGS = ("none", "llama3")


def llama3_scaled_frequencies(inv_freq: jnp.ndarray, factor: float, low_freq_factor: float,
                              high_freq_factor: float, original_max_len: int) -> jnp.ndarray:
    """Llama-3.1's long-context RoPE: frequencies whose wavelength exceeds
    original_max_len / low_freq_factor turn `factor` times slower, those shorter than
    original_max_len / high_freq_factor are kept, and the band between ramps smoothly."""
    wavelen = 2 * np.pi / inv_freq
    slowed = jnp.where(wavelen > original_max_len / low_freq_factor, inv_freq / factor, inv_freq)
    ramp = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - ramp) * slowed / factor + ramp * slowed
    medium = (wavelen >= original_max_len / high_freq_factor) & (wavelen <= original_max_len / low_freq_factor)
    return jnp.where(medium, smoothed, slowed)


def rope_angles(positions: jnp.ndarray, head_dim: int, theta: float) -> jnp.ndarray:
    """Plain 1-D RoPE. positions (B, L) -> angles (B, L, head_dim/2)."""
    return positions[..., None].astype(jnp.float32) * inverse_frequencies(head_dim, theta)


MROPE_LAYOUTS = ("sectioned", "interleaved")


def mrope_axis_of_pair(sections: Sequence[int], layout: str = "sectioned") -> np.ndarray:
    """(head_dim/2,) the position axis (0 = t, 1 = h, 2 = w) each frequency pair rotates by.

    "sectioned" (Qwen2-VL, M2-omni): contiguous runs, t takes the highest frequencies and w
    the lowest. "interleaved" (Qwen3-VL): t, h, w, t, h, w, ... while each axis has pairs
    left, then the rest are t; every axis spans the whole frequency range, so the height and
    width ids of a small image grid are not left to frequencies that barely turn.
    """
    if layout not in MROPE_LAYOUTS:
        raise ValueError(f"M-RoPE layout {layout!r}; use one of {MROPE_LAYOUTS}")
    num_pairs = sum(sections)
    if layout == "sectioned":
        return np.repeat(np.arange(len(sections)), sections)
    axis_of_pair, left = np.zeros(num_pairs, np.int32), list(sections)
    for j in range(num_pairs):
        preferred = j % len(sections)
        axis = preferred if left[preferred] else next(a for a in range(len(sections)) if left[a])
        axis_of_pair[j], left[axis] = axis, left[axis] - 1
    return axis_of_pair


def mrope_angles(positions: jnp.ndarray, head_dim: int, sections: Sequence[int],
                 theta: float, layout: str = "sectioned", inv_freq: jnp.ndarray | None = None) -> jnp.ndarray:
    """Multimodal RoPE: frequency pairs split among (t, h, w) (`mrope_axis_of_pair`).

    positions: (3, B, L) temporal/height/width ids. Pair j uses the id of the
    axis it belongs to; with t == h == w this is exactly 1-D RoPE. `inv_freq`
    (head_dim/2,): the frequencies when not plain theta^(-2j/head_dim) (e.g. Llama-3.1 scaled).
    """
    if positions.shape[0] != len(sections):
        raise ValueError(f"positions has {positions.shape[0]} axes but sections={tuple(sections)}")
    if sum(sections) != head_dim // 2:
        raise ValueError(f"mrope sections {tuple(sections)} must sum to head_dim/2 = {head_dim // 2}")
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, theta)
    axis_of_pair = jnp.asarray(mrope_axis_of_pair(sections, layout))
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

"""Image and video preprocessing for the NaViT vision encoder (numpy only).

Pipeline: `smart_resize` to multiples of 28 within the pixel bounds →
`normalize` (CLIP mean/std) → `patchify` into 14×14×2 patches in merger
order → `pack_patches` of many images/frames into one fixed-size bucket
with segment ids, so `jit` sees a handful of shapes, not one per image size.

Patch feature layout is (channel, time, row, col), flattened: the layout of
Qwen2-VL's Conv3d weight (out, C, T, P, P), so its patch-embed weight loads
as a reshape. Patch order within an image is (t, block_row, block_col,
row_in_block, col_in_block): each 2×2 block that the PatchMerger fuses is
four consecutive patches.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: image sides are multiples of this
MIN_PIXELS = 100 * FACTOR * FACTOR  # 78,400 -> at least 100 merged tokens
MAX_PIXELS = 2560 * FACTOR * FACTOR  # 2,007,040 -> at most 2,560 merged tokens
MAX_ASPECT_RATIO = 200

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Patch counts per pack; multiples of 1024 (and of 4, so merger groups never
# straddle the padding). The largest must hold the largest image: 10,240 patches.
DEFAULT_BUCKET_SIZES = (1024, 2048, 4096, 8192, 16384)


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS,
                 max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """Qwen2-VL resize rule: sides multiples of `factor`, area within bounds, aspect kept.

    Raises ValueError for non-positive sizes, an aspect ratio above
    `max_aspect_ratio`, or bounds that no such size can meet.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} > max_pixels {max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(f"image {height}x{width} has aspect ratio {ratio:.1f} > {max_aspect_ratio}; "
                         "crop or pad it first")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    if not min_pixels <= new_h * new_w <= max_pixels:
        raise ValueError(f"no {factor}-multiple size near {height}x{width} has an area within "
                         f"[{min_pixels}, {max_pixels}] (got {new_h}x{new_w})")
    return new_h, new_w


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 frames (T, H, W, 3) or one image (H, W, 3)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        return resize_frames(frames[None], height, width)[0]
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                     for f in frames])


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] or float in [0, 1] -> float32 with CLIP mean/std."""
    frames = np.asarray(frames)
    scaled = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    return (scaled - CLIP_MEAN) / CLIP_STD


def patchify(frames: np.ndarray, patch_size: int = PATCH_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
             merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames (T, H, W, C) or an image (H, W, C) -> (patches (t·h·w, C·2·14·14), (t, h, w)).

    A still image is repeated to fill the temporal patch; an odd frame count is
    padded by repeating the last frame. (t, h, w) counts patches per axis.
    """
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 3:
        frames = frames[None]
    num_frames, height, width, channels = frames.shape
    side = patch_size * merge_size
    if height % side or width % side:
        raise ValueError(f"frame size {height}x{width} must be a multiple of {side}; use smart_resize")
    if num_frames % temporal_patch_size:
        pad = temporal_patch_size - num_frames % temporal_patch_size
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t = frames.shape[0] // temporal_patch_size
    h, w = height // patch_size, width // patch_size
    m = merge_size
    blocks = frames.reshape(t, temporal_patch_size, h // m, m, patch_size, w // m, m, patch_size, channels)
    # -> (t, block_row, block_col, row_in_block, col_in_block, C, time, py, px)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return blocks.reshape(t * h * w, -1), (t, h, w)


def hw_positions(grid_thw: Sequence[int], merge_size: int = MERGE_SIZE) -> np.ndarray:
    """(2, t·h·w) int32 row and column of each patch, in `patchify` order."""
    t, h, w = grid_thw
    m = merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    def to_merge_order(a):
        return a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    per_frame = np.stack([to_merge_order(rows), to_merge_order(cols)])
    return np.tile(per_frame, (1, t)).astype(np.int32)


def num_merged_tokens(grid_thw: Sequence[int], merge_size: int = MERGE_SIZE) -> int:
    t, h, w = grid_thw
    return t * (h // merge_size) * (w // merge_size)


def sample_video_frames(num_frames_available: int, src_fps: float, target_fps: float = 2.0,
                        min_frames: int = 4, max_frames: int = 120) -> np.ndarray:
    """Indices of frames to keep: `target_fps`, an even count within [min_frames, max_frames].

    Evenly spaced over the whole clip; a clip with fewer frames than
    `min_frames` repeats frames.
    """
    if num_frames_available < 1 or src_fps <= 0 or target_fps <= 0:
        raise ValueError(f"need frames >= 1 and positive fps, got {num_frames_available} frames, "
                         f"src_fps={src_fps}, target_fps={target_fps}")
    lo, hi = max(2, 2 * math.ceil(min_frames / 2)), 2 * (max_frames // 2)
    if lo > hi:
        raise ValueError(f"no even frame count >= 2 in [{min_frames}, {max_frames}]")
    wanted = 2 * round(num_frames_available / src_fps * target_fps / 2)
    count = min(max(wanted, lo), hi)
    count = max(lo, min(count, 2 * (num_frames_available // 2)))
    return np.round(np.linspace(0, num_frames_available - 1, count)).astype(np.int64)


def preprocess_image(image: np.ndarray, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     side: int = 0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 image (H, W, 3) -> (patches, grid_thw): at its smart_resize size, or, with
    `side` > 0, squashed to side x side whatever its aspect (LLaVA's fixed resize)."""
    if side:
        if side % FACTOR:
            raise ValueError(f"image side {side} is not a multiple of {FACTOR}")
        height = width = side
    else:
        height, width = smart_resize(image.shape[0], image.shape[1], min_pixels=min_pixels,
                                     max_pixels=max_pixels)
    return patchify(normalize(resize_frames(image, height, width)))


def preprocess_video(frames: np.ndarray, src_fps: float, target_fps: float = 2.0,
                     min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     min_frames: int = 4, max_frames: int = 120):
    """uint8 frames (T, H, W, 3) -> (patches, grid_thw) at `target_fps`."""
    keep = sample_video_frames(len(frames), src_fps, target_fps, min_frames, max_frames)
    height, width = smart_resize(frames.shape[1], frames.shape[2], min_pixels=min_pixels,
                                 max_pixels=max_pixels)
    return patchify(normalize(resize_frames(np.asarray(frames)[keep], height, width)))


# ---------------------------------------------------------------- packing


def bucket_for(num_patches: int, bucket_sizes: Sequence[int] = DEFAULT_BUCKET_SIZES) -> int:
    """Smallest bucket that holds `num_patches`."""
    fitting = [b for b in sorted(bucket_sizes) if b >= num_patches]
    if not fitting:
        raise ValueError(f"{num_patches} patches exceed the largest bucket {max(bucket_sizes)}; "
                         "add a bucket or lower max_pixels")
    return fitting[0]


def first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups item indices, in order, into bins of at most `capacity` (first fit)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index, size in enumerate(sizes):
        if size > capacity:
            raise ValueError(f"item {index} has {size} patches, more than the largest bucket "
                             f"{capacity}; split long videos with split_by_frames")
        slot = next((b for b, load in enumerate(loads) if load + size <= capacity), None)
        if slot is None:
            bins.append([])
            loads.append(0)
            slot = len(bins) - 1
        bins[slot].append(index)
        loads[slot] += size
    return bins


def split_by_frames(patches: np.ndarray, grid_thw: Sequence[int],
                    max_patches: int) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Splits a long video into items of whole temporal frames, each <= `max_patches`.

    Frames are separate attention segments, so encoding the pieces gives the
    same features as encoding the whole video; concatenate them in order.
    """
    t, h, w = grid_thw
    frames_per_item = max_patches // (h * w)
    if frames_per_item < 1:
        raise ValueError(f"one frame of {h}x{w} patches exceeds {max_patches} patches")
    return [(patches[start * h * w:min(start + frames_per_item, t) * h * w],
             (min(frames_per_item, t - start), h, w)) for start in range(0, t, frames_per_item)]


def _check_buckets(bucket_sizes: Sequence[int], merge_size: int) -> None:
    if any(b % (merge_size * merge_size) for b in bucket_sizes):
        raise ValueError(f"bucket sizes {tuple(bucket_sizes)} must be multiples of {merge_size ** 2}")


def pack_patches(items: Sequence[tuple[np.ndarray, Sequence[int]]],
                 bucket_sizes: Sequence[int] = DEFAULT_BUCKET_SIZES,
                 merge_size: int = MERGE_SIZE) -> dict[str, np.ndarray]:
    """Packs (patches, grid_thw) items into one pack padded to the smallest fitting bucket.

    Returns patches (N, D); segment_ids (N,) int32, one id per item and
    temporal frame (1, 2, ...; 0 = padding), since attention stays within one
    image/frame; hw_positions (2, N); frame_ids (N,) temporal index within its
    item; grid_thw (items, 3); num_patches (real, unpadded).
    """
    _check_buckets(bucket_sizes, merge_size)
    if not items:
        raise ValueError("pack_patches needs at least one item")
    grids = np.asarray([tuple(g) for _, g in items], np.int32).reshape(-1, 3)
    total = int(np.prod(grids, axis=1).sum())
    size = bucket_for(total, bucket_sizes)
    dim = items[0][0].shape[1]
    packed = dict(patches=np.zeros((size, dim), np.float32), segment_ids=np.zeros(size, np.int32),
                  hw_positions=np.zeros((2, size), np.int32), frame_ids=np.zeros(size, np.int32))
    start, next_segment = 0, 1
    for (patches, _), (t, h, w) in zip(items, grids):
        n = t * h * w
        if patches.shape != (n, dim) or h % merge_size or w % merge_size:
            raise ValueError(f"patches {patches.shape} do not match grid {(t, h, w)} (dim {dim}, "
                             f"sides multiples of {merge_size})")
        frame = np.repeat(np.arange(t, dtype=np.int32), h * w)
        packed["patches"][start:start + n] = patches
        packed["segment_ids"][start:start + n] = next_segment + frame
        packed["hw_positions"][:, start:start + n] = hw_positions((t, h, w), merge_size)
        packed["frame_ids"][start:start + n] = frame
        start, next_segment = start + n, next_segment + t
    packed.update(grid_thw=grids, num_patches=np.int32(total))
    return packed


def pack_dataset(items: Sequence[tuple[np.ndarray, Sequence[int]]],
                 bucket_sizes: Sequence[int] = DEFAULT_BUCKET_SIZES,
                 merge_size: int = MERGE_SIZE) -> list[dict[str, np.ndarray]]:
    """First-fit packs of whole items, each padded to its bucket."""
    sizes = [int(np.prod(grid)) for _, grid in items]
    groups = first_fit(sizes, max(bucket_sizes))
    return [pack_patches([items[i] for i in group], bucket_sizes, merge_size) for group in groups]


def count_distinct_shapes(grid_thws: Sequence[Sequence[int]],
                          bucket_sizes: Sequence[int] = DEFAULT_BUCKET_SIZES) -> int:
    """How many pack shapes (hence jit compilations) `pack_dataset` makes for these items."""
    sizes = [int(np.prod(grid)) for grid in grid_thws]
    groups = first_fit(sizes, max(bucket_sizes))
    return len({bucket_for(sum(sizes[i] for i in group), bucket_sizes) for group in groups})

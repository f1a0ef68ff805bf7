import numpy as np
import pytest

from m2omni_jax.data import image_preprocessing as ip


def test_smart_resize_multiples_of_28_within_bounds_for_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        short = int(rng.integers(1, 3000))
        long = int(min(short * rng.uniform(1, 200), 40000))
        height, width = (short, long) if rng.random() < 0.5 else (long, short)
        new_h, new_w = ip.smart_resize(height, width)
        assert new_h % 28 == 0 and new_w % 28 == 0
        assert ip.MIN_PIXELS <= new_h * new_w <= ip.MAX_PIXELS
        assert (new_h >= new_w) == (height >= width) or abs(new_h - new_w) <= 28


def test_smart_resize_matches_qwen2vl_rule_on_known_sizes():
    assert ip.smart_resize(1080, 1920) == (1036, 1876)  # shrunk under max_pixels
    assert ip.smart_resize(100, 100) == (280, 280)  # grown to exactly min_pixels
    assert ip.smart_resize(448, 672) == (448, 672)  # already valid: unchanged


def test_smart_resize_rejects_absurd_aspect_ratio_and_bad_sizes():
    with pytest.raises(ValueError, match="aspect ratio"):
        ip.smart_resize(10, 2500)
    with pytest.raises(ValueError, match="positive"):
        ip.smart_resize(0, 100)


def test_normalize_uint8_and_unit_float_agree():
    image = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(ip.normalize(image), ip.normalize(image / 255.0), atol=1e-6)
    np.testing.assert_allclose(ip.normalize(np.full((1, 1, 3), ip.CLIP_MEAN)), 0, atol=1e-6)


def test_patchify_order_puts_each_2x2_block_on_consecutive_patches():
    height, width = 56, 84
    rows, cols = np.meshgrid(np.arange(height) // 14, np.arange(width) // 14, indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)
    patches, grid = ip.patchify(image)
    assert grid == (1, 4, 6) and patches.shape == (24, 3 * 2 * 14 * 14)
    by_channel = patches.reshape(24, 3, -1)
    patch_rows, patch_cols = by_channel[:, 0, 0], by_channel[:, 1, 0]
    assert np.all(by_channel[:, 0] == patch_rows[:, None])  # every pixel of a patch is one patch
    positions = ip.hw_positions(grid)
    np.testing.assert_array_equal(positions, np.stack([patch_rows, patch_cols]))
    blocks = np.stack([patch_rows // 2, patch_cols // 2], -1).reshape(6, 4, 2)
    assert np.all(blocks == blocks[:, :1])  # four consecutive patches share one 2x2 block
    np.testing.assert_array_equal(blocks[:, 0], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


def test_patchify_still_image_fills_both_temporal_slots_and_odd_videos_are_padded():
    image = np.random.default_rng(0).normal(size=(28, 28, 3))
    patches, grid = ip.patchify(image)
    assert grid == (1, 2, 2)
    per_time = patches.reshape(4, 3, 2, 14 * 14)
    np.testing.assert_array_equal(per_time[:, :, 0], per_time[:, :, 1])
    _, video_grid = ip.patchify(np.zeros((5, 28, 56, 3)))
    assert video_grid == (3, 2, 4)
    with pytest.raises(ValueError, match="multiple of 28"):
        ip.patchify(np.zeros((30, 28, 3)))


def test_hw_positions_repeat_per_temporal_frame_and_merged_token_count():
    grid = (3, 4, 6)
    positions = ip.hw_positions(grid)
    assert positions.shape == (2, 72)
    np.testing.assert_array_equal(positions[:, :24], positions[:, 48:])
    assert ip.num_merged_tokens(grid) == 3 * 2 * 3


def test_sample_video_frames_even_counts_within_bounds():
    rng = np.random.default_rng(0)
    for _ in range(1000):
        available = int(rng.integers(1, 20000))
        fps = float(rng.uniform(1, 60))
        indices = ip.sample_video_frames(available, fps)
        assert len(indices) % 2 == 0 and 4 <= len(indices) <= 120
        assert indices.min() >= 0 and indices.max() < available
        assert np.all(np.diff(indices) >= 0)
    assert len(ip.sample_video_frames(300, 30.0)) == 20  # 10 s at 2 fps
    assert len(ip.sample_video_frames(11, 1.0, min_frames=3, max_frames=9)) == 8


def test_preprocess_image_and_video_shapes():
    rng = np.random.default_rng(0)
    patches, grid = ip.preprocess_image(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    height, width = ip.smart_resize(300, 200)
    assert grid == (1, height // 14, width // 14) and patches.shape == (grid[1] * grid[2], 1176)
    video = rng.integers(0, 256, (30, 60, 90, 3), dtype=np.uint8)
    patches, grid = ip.preprocess_video(video, src_fps=10.0)
    assert grid[0] == 3 and patches.shape[0] == np.prod(grid)  # 6 frames -> 3 temporal patches


def test_a_fixed_side_squashes_any_aspect_to_that_square():
    image = np.zeros((112, 224, 3), np.uint8)
    image[:, 112:] = 255  # right half white: after the squash, the right half of the patch columns
    patches, grid = ip.preprocess_image(image, side=84)
    assert grid == (1, 6, 6) and patches.shape == (36, 1176)
    brightness = patches.reshape(3, 3, 2, 2, -1).mean(-1)  # merged (row, col), then 2x2 within
    columns = brightness.transpose(0, 2, 1, 3).reshape(6, 6)  # (row, col) of each patch
    assert np.all(columns[:, :3] < 0) and np.all(columns[:, 3:] > 0)
    with pytest.raises(ValueError, match="image side 80 is not a multiple of 28"):
        ip.preprocess_image(image, side=80)


def test_split_by_frames_keeps_whole_frames_in_order():
    patches = np.arange(5 * 8, dtype=np.float32)[:, None]
    pieces = ip.split_by_frames(patches, (5, 2, 4), max_patches=20)
    assert [g for _, g in pieces] == [(2, 2, 4), (2, 2, 4), (1, 2, 4)]
    np.testing.assert_array_equal(np.concatenate([p for p, _ in pieces]), patches)
    with pytest.raises(ValueError, match="one frame"):
        ip.split_by_frames(patches, (5, 2, 4), max_patches=4)


def _random_items(rng, grids, dim=3):
    return [(rng.normal(size=(int(np.prod(g)), dim)).astype(np.float32), g) for g in grids]


def test_pack_patches_segments_per_frame_positions_and_padding():
    rng = np.random.default_rng(0)
    items = _random_items(rng, [(1, 2, 4), (2, 2, 2), (1, 4, 2)])
    packed = ip.pack_patches(items, bucket_sizes=(16, 32, 64))
    assert packed["patches"].shape == (32, 3) and packed["num_patches"] == 24
    expected_segments = [1] * 8 + [2] * 4 + [3] * 4 + [4] * 8 + [0] * 8
    np.testing.assert_array_equal(packed["segment_ids"], expected_segments)
    np.testing.assert_array_equal(packed["frame_ids"][8:16], [0] * 4 + [1] * 4)
    np.testing.assert_array_equal(packed["patches"][8:16], items[1][0])
    np.testing.assert_array_equal(packed["hw_positions"][:, 16:24], ip.hw_positions((1, 4, 2)))
    assert np.all(packed["patches"][24:] == 0)
    with pytest.raises(ValueError, match="largest bucket"):
        ip.pack_patches(items, bucket_sizes=(16,))
    with pytest.raises(ValueError, match="multiples of 4"):
        ip.pack_patches(items, bucket_sizes=(30,))


def _epoch_grids(rng, num_images=300, num_videos=20):
    grids = []
    for _ in range(num_images):
        height, width = ip.smart_resize(int(rng.integers(60, 2500)), int(rng.integers(60, 2500)))
        grids.append((1, height // 14, width // 14))
    for _ in range(num_videos):
        height, width = ip.smart_resize(int(rng.integers(100, 600)), int(rng.integers(100, 600)))
        frames = len(ip.sample_video_frames(int(rng.integers(20, 400)), 25.0))
        grid = (frames // 2, height // 14, width // 14)
        patches = np.zeros((int(np.prod(grid)), 1), np.float32)
        grids += [g for _, g in ip.split_by_frames(patches, grid, max(ip.DEFAULT_BUCKET_SIZES))]
    return grids


def test_epoch_of_mixed_resolutions_has_at_most_one_shape_per_bucket():
    grids = _epoch_grids(np.random.default_rng(0))
    per_image_shapes = len({int(np.prod(g)) for g in grids})
    assert per_image_shapes > 100  # unpacked, nearly every image would recompile
    assert ip.count_distinct_shapes(grids) <= len(ip.DEFAULT_BUCKET_SIZES)


def test_count_distinct_shapes_matches_pack_dataset():
    rng = np.random.default_rng(1)
    grids = [(int(rng.integers(1, 3)), 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))
             for _ in range(40)]
    buckets = (32, 64, 128)
    packs = ip.pack_dataset(_random_items(rng, grids), buckets)
    shapes = {p["patches"].shape for p in packs}
    assert len(shapes) == ip.count_distinct_shapes(grids, buckets) <= len(buckets)
    assert sum(len(p["grid_thw"]) for p in packs) == len(grids)
    assert sum(int(p["num_patches"]) for p in packs) == sum(int(np.prod(g)) for g in grids)

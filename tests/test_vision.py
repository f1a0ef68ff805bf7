import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.models.vision import PatchMerger, VisionConfig, VisionEncoder
from m2omni_jax.parallel import sharding

CONFIG = VisionConfig.tiny(out_width=32)
IMAGE_SIZES = [(56, 56), (28, 84), (56, 28)]  # 16, 12 and 8 patches


def _images(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in IMAGE_SIZES]


def _pack(images, bucket=48):
    packed = ip.pack_patches([ip.patchify(image) for image in images], bucket_sizes=(bucket,))
    return packed["patches"][None], packed["segment_ids"][None], packed["hw_positions"][None]


@pytest.fixture(scope="module")
def model_and_params():
    model = VisionEncoder(CONFIG)
    return model, model.init(jax.random.PRNGKey(0), *_pack(_images(0)))


@pytest.fixture(scope="module")
def encode(model_and_params):
    model, params = model_and_params
    return jax.jit(lambda *inputs: model.apply(params, *inputs))


def test_output_shapes_and_merged_segments(encode):
    features, merged_segments = encode(*_pack(_images(0)))
    assert features.shape == (1, 12, CONFIG.out_width)
    np.testing.assert_array_equal(merged_segments[0], [1] * 4 + [2] * 3 + [3] * 2 + [0] * 3)
    assert np.all(np.asarray(features[0, 9:]) == 0)  # padding yields zeros
    assert np.all(np.abs(np.asarray(features[0, :9])).sum(-1) > 0)


def test_changing_one_image_leaves_other_images_in_the_pack_unchanged(encode):
    images = _images(0)
    before, _ = encode(*_pack(images))
    images[1] = images[1] + np.random.default_rng(1).normal(size=images[1].shape).astype(np.float32)
    after, _ = encode(*_pack(images))
    before, after = np.asarray(before[0]), np.asarray(after[0])
    own = slice(4, 7)  # merged tokens of image 1
    assert np.abs(after[own] - before[own]).max() > 1e-3
    np.testing.assert_allclose(after[:4], before[:4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(after[7:], before[7:], atol=1e-6, rtol=0)


def test_padding_patches_do_not_affect_real_patches(encode):
    patches, segments, positions = _pack(_images(0))
    clean, _ = encode(patches, segments, positions)
    rng = np.random.default_rng(2)
    patches, positions = patches.copy(), positions.copy()
    patches[0, 36:] = rng.normal(size=patches[0, 36:].shape) * 100
    positions[0, :, 36:] = rng.integers(0, 50, size=positions[0, :, 36:].shape)
    noisy, _ = encode(patches, segments, positions)
    np.testing.assert_allclose(noisy, clean, atol=1e-6, rtol=0)


def test_image_features_do_not_depend_on_pack_neighbours_or_offset(model_and_params):
    model, params = model_and_params
    images = _images(0)
    packed, _ = model.apply(params, *_pack(images))
    alone, _ = model.apply(params, *_pack(images[2:], bucket=8))
    np.testing.assert_allclose(packed[0, 7:9], alone[0], atol=1e-5)


def test_patchify_then_merger_fuses_exactly_each_2x2_block():
    image = np.random.default_rng(0).normal(size=(56, 84, 3)).astype(np.float32)
    merger = PatchMerger(out_width=8)
    patches, _ = ip.patchify(image)
    params = merger.init(jax.random.PRNGKey(0), patches[None])
    merge = jax.jit(lambda x: merger.apply(params, x[None])[0])
    base = np.asarray(merge(patches))
    noise = np.random.default_rng(1).normal(size=(28, 28, 3)).astype(np.float32)
    for block_row, block_col in [(0, 0), (0, 2), (1, 1)]:
        changed = image.copy()
        changed[28 * block_row:28 * block_row + 28, 28 * block_col:28 * block_col + 28] += noise
        moved = np.abs(np.asarray(merge(ip.patchify(changed)[0])) - base).max(axis=-1) > 1e-4
        expected = np.zeros(6, bool)
        expected[block_row * 3 + block_col] = True
        np.testing.assert_array_equal(moved, expected)


def test_patch_embedding_linear_equals_stride_kernel_conv3d():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, 28, 56, 3)).astype(np.float32)
    kernel = rng.normal(size=(CONFIG.patch_dim, 5)).astype(np.float32)
    patches, grid = ip.patchify(frames)
    linear = patches @ kernel
    conv_kernel = kernel.reshape(3, 2, 14, 14, 5).transpose(1, 2, 3, 0, 4)  # (T, P, P, C, out)
    conv = jax.lax.conv_general_dilated(frames[None], conv_kernel, window_strides=(2, 14, 14),
                                        padding="VALID",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))[0, 0]
    rows, cols = ip.hw_positions(grid)
    np.testing.assert_allclose(linear, np.asarray(conv)[rows, cols], rtol=1e-4, atol=1e-4)


def test_remat_and_query_chunking_do_not_change_the_output(model_and_params):
    model, params = model_and_params
    inputs = _pack(_images(0))
    reference, _ = model.apply(params, *inputs)
    variant = VisionEncoder(VisionConfig.tiny(out_width=32, remat_policy="full", attention_query_chunk=16))

    def loss(p):
        return jnp.sum(variant.apply(p, *inputs)[0] ** 2)

    features, _ = variant.apply(params, *inputs)
    np.testing.assert_allclose(features, reference, atol=1e-5)
    grads = jax.grad(loss)(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_every_parameter_has_logical_axis_names(model_and_params):
    _, params = model_and_params
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def _sharded_forward(model, batch, mesh):
    def init(rng):
        return model.init(rng, *batch)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    param_shardings = sharding.logical_to_mesh_sharding(abstract, mesh)
    with sharding.activate(mesh):
        params = jax.jit(init, out_shardings=param_shardings)(jax.random.PRNGKey(0))
        inputs = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in batch]
        features, _ = jax.jit(model.apply)(params, *inputs)
    return params, features


@pytest.fixture(scope="module")
def sharded_run(model_and_params):
    model, _ = model_and_params
    batch = [np.concatenate(parts) for parts in zip(*[_pack(_images(seed)) for seed in range(4)])]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    return model, batch, mesh, *_sharded_forward(model, batch, mesh)


def test_sharded_forward_equals_single_device_forward(sharded_run):
    model, batch, _, params, sharded = sharded_run
    query_kernel = params["params"]["blocks"]["attention"]["query"]["kernel"].value
    assert query_kernel.sharding.spec == P(None, "fsdp", "tensor", None)
    single, _ = jax.jit(model.apply)(jax.device_get(params), *batch)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_activation_constraints_take_effect_under_activate(sharded_run):
    _, _, mesh, _, sharded = sharded_run
    assert sharded.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 3), 3), (
        f"features came out as {sharded.sharding.spec}: nn.with_logical_constraint was a no-op, "
        "i.e. sharding.activate did not make the mesh visible to flax (jax.set_mesh)")


@pytest.mark.parametrize("fractions", [0, 4])
def test_training_flops_formula_matches_xla_forward_count(fractions):
    """The 6·N + attention formula is 3× the forward FLOPs XLA counts (unrolled layers,
    so the cost analysis sees every block), to within the elementwise ops it leaves out."""
    from m2omni_jax.models.vision import training_flops_per_pack
    cfg = VisionConfig.tiny(width=64, depth=2, scan=False, fractional_position_frequencies=fractions)
    pack = 64
    patches = jnp.zeros((1, pack, cfg.patch_dim))
    segments = jnp.ones((1, pack), jnp.int32)
    hw = jnp.zeros((1, 2, pack), jnp.int32)
    model = VisionEncoder(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), patches, segments, hw))
    forward = jax.jit(lambda p: model.apply(p, patches, segments, hw)[0])
    xla_flops = forward.lower(params).compile().cost_analysis()["flops"]
    assert training_flops_per_pack(cfg, pack) / 3 == pytest.approx(xla_flops, rel=0.15)


def _tower_params(config, patches):
    model = VisionEncoder(config)
    return model, model.init(jax.random.PRNGKey(0), *patches)


def test_zero_init_residual_tower_starts_as_patch_embedding_and_merger():
    """With zero_init_residual the blocks are the identity at init: the depth-2 tower equals a
    depth-0 one (patch embedding, then the merger) with the same weights."""
    inputs = _pack(_images(0))
    deep, deep_params = _tower_params(VisionConfig.tiny(out_width=32, zero_init_residual=True), inputs)
    shallow = VisionEncoder(VisionConfig.tiny(out_width=32, depth=0, scan=False))
    shallow_params = {"params": {k: v for k, v in deep_params["params"].items() if k != "blocks"}}
    np.testing.assert_allclose(deep.apply(deep_params, *inputs)[0], shallow.apply(shallow_params, *inputs)[0],
                               atol=1e-6)
    plain, plain_params = _tower_params(VisionConfig.tiny(out_width=32), inputs)
    assert np.abs(np.asarray(plain.apply(plain_params, *inputs)[0] - shallow.apply(shallow_params, *inputs)[0])).max() > 1e-3


@pytest.mark.parametrize("epsilon, quiet", [(1e-6, False), (1.0, True)])
def test_layer_norm_epsilon_keeps_a_near_empty_image_near_zero(epsilon, quiet):
    """A faint background (tiny pixel values) next to a strong one in the same pack: with
    Qwen2-VL's 1e-6 the LayerNorms blow the faint one up to the strong one's size."""
    rng = np.random.default_rng(0)
    faint, strong = (scale * rng.normal(size=(56, 56, 3)).astype(np.float32) for scale in (1e-3, 3.0))
    inputs = _pack([faint, strong], bucket=32)
    model, params = _tower_params(VisionConfig.tiny(out_width=32, layer_norm_epsilon=epsilon,
                                                    zero_init_residual=True), inputs)
    features = np.asarray(model.apply(params, *inputs)[0][0])
    ratio = np.linalg.norm(features[:4], axis=-1).mean() / np.linalg.norm(features[4:8], axis=-1).mean()
    assert (ratio < 0.05) if quiet else (ratio > 0.3), ratio


def test_patch_grid_fractions_are_each_patchs_centre_within_its_image():
    from m2omni_jax.models.vision import patch_grid_fractions
    packed = ip.pack_patches([ip.patchify(np.zeros((28, 56, 3), np.float32)),  # 2x4 patches
                              ip.patchify(np.zeros((28, 28, 3), np.float32))], bucket_sizes=(16,))
    fractions = np.asarray(patch_grid_fractions(packed["hw_positions"][None], packed["segment_ids"][None]))[0]
    rows, cols = packed["hw_positions"][:, :8]
    np.testing.assert_allclose(fractions[:8], np.stack([(rows + 0.5) / 2, (cols + 0.5) / 4], -1))
    np.testing.assert_allclose(fractions[8:12], (packed["hw_positions"][:, 8:12].T + 0.5) / 2)


FRACTIONS = VisionConfig.tiny(out_width=32, fractional_position_frequencies=3)


def test_fractional_positions_tell_the_places_of_a_uniform_image_apart():
    """Identical patches everywhere: 2-D RoPE is relative, so without absolute positions every
    merged token comes out the same; with them, each knows where in the image it is."""
    uniform = _pack([np.ones((56, 56, 3), np.float32)], bucket=16)
    for config, distinct in ((VisionConfig.tiny(out_width=32), False), (FRACTIONS, True)):
        model, params = _tower_params(config, uniform)
        features = np.asarray(model.apply(params, *uniform)[0][0])
        spread = np.abs(features - features[:1]).max()
        assert (spread > 1e-3) if distinct else (spread < 1e-5), (config, spread)
    model, params = _tower_params(FRACTIONS, uniform)
    assert params["params"]["position_embed"]["kernel"].names == (None, "embed")


def test_fractional_position_tower_keeps_images_and_padding_apart():
    model, params = _tower_params(FRACTIONS, _pack(_images(0)))
    patches, segments, positions = _pack(_images(0))
    clean, _ = model.apply(params, patches, segments, positions)
    changed, moved = patches.copy(), positions.copy()
    changed[0, 16:28] += 1.0  # image 1
    changed[0, 36:], moved[0, :, 36:] = 100.0, 40  # the padding, far away
    after, _ = model.apply(params, changed, segments, moved)
    np.testing.assert_allclose(after[0, :4], clean[0, :4], atol=1e-6)
    np.testing.assert_allclose(after[0, 7:], clean[0, 7:], atol=1e-6)
    assert np.abs(np.asarray(after[0, 4:7] - clean[0, 4:7])).max() > 1e-3
    alone, _ = model.apply(params, *_pack(_images(0)[2:], bucket=8))
    np.testing.assert_allclose(clean[0, 7:9], alone[0], atol=1e-5)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.models import connectors
from m2omni_jax.models.connectors import make_connector
from m2omni_jax.parallel import sharding

IN_WIDTH, OUT_WIDTH = 16, 24


def _init_apply(module, x, *args):
    params = module.init(jax.random.PRNGKey(0), x, *args)
    return params, module.apply(params, x, *args)


def _grid(side, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, side, side, IN_WIDTH)).astype(np.float32)


@pytest.mark.parametrize("num_tokens", [64, 144])
@pytest.mark.parametrize("kind", connectors.CONNECTOR_KINDS)
def test_every_connector_yields_the_configured_token_count(kind, num_tokens):
    side = 12 if kind == "linear" and num_tokens == 144 else (8 if kind == "linear" else 14)
    connector = make_connector(kind, OUT_WIDTH, num_tokens, num_heads=4, hidden_width=8, depth=1)
    params, out = _init_apply(connector, _grid(side))
    assert out.shape == (2, num_tokens, OUT_WIDTH)
    assert np.isfinite(np.asarray(out)).all()
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim for leaf in leaves)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert jax.tree.leaves(sharding.logical_to_mesh_sharding(params, mesh))  # names map to the mesh


def test_c_abstractor_default_depth_three_on_a_non_square_grid():
    grid = np.random.default_rng(0).normal(size=(1, 20, 12, IN_WIDTH)).astype(np.float32)
    connector = make_connector("c_abstractor", OUT_WIDTH, 64)
    params, out = _init_apply(connector, grid)
    assert out.shape == (1, 64, OUT_WIDTH)
    blocks = [name for name in params["params"] if "block" in name]
    assert len(blocks) == 6  # depth 3 before and 3 after pooling


def test_c_abstractor_blocks_are_honeybees():
    """A learned position embedding per grid cell, a depthwise 3×3 and squeeze-excite to 0.25 of
    the block's input width (timm's RegBottleneck); the gates depend on the image (a per-channel scale in (0, 1))."""
    connector = make_connector("c_abstractor", OUT_WIDTH, 4, hidden_width=8, depth=1, max_grid_side=7)
    params, _ = _init_apply(connector, _grid(6))
    p = nn.unbox(params["params"])
    assert p["position_embedding"].shape == (7, 7, IN_WIDTH) and np.abs(p["position_embedding"]).max() > 0
    with pytest.raises(ValueError, match=r"a 8x8 grid is larger than .* \(7x7, model.connector.max_grid_side\)"):
        connector.apply(params, _grid(8))
    block = p["stage1_block0"]
    assert block["spatial"]["kernel"].shape == (3, 3, 1, 8)  # depthwise: one input channel per group
    se = block["squeeze_excite"]
    assert se["reduce"]["kernel"].shape == (8, 4) and se["expand"]["kernel"].shape == (4, 8)
    assert p["stage2_block0"]["squeeze_excite"]["reduce"]["kernel"].shape == (8, 2)
    gates = [connectors.SqueezeExcite(4).apply({"params": se}, x[..., :8]) for x in (_grid(6, seed=1), _grid(6, seed=2))]
    assert all(0 < float(g.min()) and float(g.max()) < 1 for g in gates)
    assert float(jnp.abs(gates[0] - gates[1]).max()) > 1e-4
    # The position embedding is a function of the cell: moving it changes the tokens.
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.roll(x, 1, axis=0) if "position_embedding" in jax.tree_util.keystr(path) else x, params)
    assert float(jnp.abs(connector.apply(shifted, _grid(6)) - connector.apply(params, _grid(6))).max()) > 1e-6


@pytest.mark.parametrize("mlp", [False, True])
def test_linear_connector_outputs_unit_norm_tokens_and_keeps_packed_length(mlp):
    tokens = np.random.default_rng(0).normal(size=(2, 37, IN_WIDTH)).astype(np.float32) * 5
    _, out = _init_apply(make_connector("linear", OUT_WIDTH, mlp=mlp), tokens)
    assert out.shape == (2, 37, OUT_WIDTH)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, atol=1e-5)


def test_linear_connector_rejects_a_token_count_other_than_configured():
    with pytest.raises(ValueError, match="configured for 64"):
        _init_apply(make_connector("linear", OUT_WIDTH, 64), _grid(12))


def test_attention_pooling_ignores_masked_tokens():
    connector = make_connector("attn_pool", OUT_WIDTH, 64, num_heads=4)
    tokens = np.random.default_rng(0).normal(size=(1, 30, IN_WIDTH)).astype(np.float32)
    mask = np.arange(30)[None] < 20
    params, out = _init_apply(connector, tokens, mask)
    tokens[:, 20:] = 1e3
    np.testing.assert_allclose(connector.apply(params, tokens, mask), out, atol=1e-6)


def test_adaptive_average_pool_matches_block_mean_and_covers_every_input():
    grid = _grid(16, batch=1)
    pooled = np.asarray(connectors.adaptive_avg_pool_2d(grid, 8, 8))
    block_mean = grid.reshape(1, 8, 2, 8, 2, IN_WIDTH).mean(axis=(2, 4))
    np.testing.assert_allclose(pooled, block_mean, atol=1e-5)
    weights = connectors.adaptive_pool_matrix(14, 12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(weights.sum(axis=0) > 0)


def test_make_connector_errors_are_clear():
    with pytest.raises(ValueError, match="unknown connector"):
        make_connector("qformer", OUT_WIDTH, 64)
    with pytest.raises(ValueError, match="perfect square"):
        make_connector("c_abstractor", OUT_WIDTH, 50)
    with pytest.raises(ValueError, match="needs num_tokens"):
        make_connector("avg_pool", OUT_WIDTH)
    with pytest.raises(ValueError, match="token grid"):
        _init_apply(make_connector("avg_pool", OUT_WIDTH, 64), np.zeros((1, 64, IN_WIDTH), np.float32))


@pytest.mark.parametrize("kind", ["avg_pool", "c_abstractor", "attn_pool"])
def test_padded_grid_with_extent_equals_the_image_alone(kind):
    """The packed omni model pads each image's grid to (Hmax, Wmax); the padding must not
    matter, whatever it holds, and the pooling bins must be the image's own."""
    image = np.random.default_rng(1).normal(size=(1, 5, 3, IN_WIDTH)).astype(np.float32)
    padded = np.full((1, 8, 7, IN_WIDTH), 1e3, np.float32)  # garbage, not zeros
    padded[:, :5, :3] = image
    extent = np.array([[5, 3]], np.int32)
    connector = make_connector(kind, OUT_WIDTH, 4, num_heads=4, hidden_width=8, depth=2, max_grid_side=8)
    params, alone = _init_apply(connector, image)
    if kind == "attn_pool":
        mask = np.asarray(connectors.grid_mask(extent, 8, 7)).reshape(1, -1)
        out = connector.apply(params, padded.reshape(1, -1, IN_WIDTH), mask)
    else:
        out = connector.apply(params, padded, extent)
    np.testing.assert_allclose(out, alone, atol=1e-5)


def test_extent_pool_matrices_are_the_actual_sizes_bins():
    weights = np.asarray(connectors.extent_pool_matrices(6, 2, np.array([3, 6, 0])))
    np.testing.assert_allclose(weights[0, :, :3], connectors.adaptive_pool_matrix(3, 2))
    assert not weights[0, :, 3:].any() and not weights[2].any()  # no weight on padding, none for n = 0
    np.testing.assert_allclose(weights[1], connectors.adaptive_pool_matrix(6, 2))

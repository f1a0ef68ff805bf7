import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.models.audio import AudioConfig, AudioEncoder, FSMNMemory
from m2omni_jax.parallel import sharding

CONFIG = AudioConfig.tiny(num_audio_tokens=8, out_width=32)  # 24 LFR frames fill the output
LENGTHS = np.array([17, 9, 24, 1], np.int32)


def _features(num_frames, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(LENGTHS), num_frames, CONFIG.input_dim)).astype(np.float32)
    # Garbage past each length: it must not matter.
    pad = np.arange(num_frames)[None, :, None] >= LENGTHS[:, None, None]
    return np.where(pad, rng.normal(size=feats.shape) * 50, feats).astype(np.float32)


@pytest.fixture(scope="module")
def model_and_params():
    model = AudioEncoder(CONFIG)
    return model, jax.jit(model.init)(jax.random.key(0), _features(24), LENGTHS)


@pytest.fixture(scope="module")
def encode(model_and_params):
    model, params = model_and_params
    return jax.jit(lambda feats, lengths: model.apply(params, feats, lengths))


def test_padding_frames_do_not_change_outputs(encode):
    tokens, valid = encode(_features(24), LENGTHS)
    feats = _features(24)
    longer = np.concatenate([feats, np.random.default_rng(1).normal(size=(4, 11, 560)) * 9], axis=1)
    shorter = feats[:, :18]  # still covers every length but 24
    np.testing.assert_allclose(encode(longer.astype(np.float32), LENGTHS)[0], tokens, atol=1e-5, rtol=0)
    cut = LENGTHS < 18
    np.testing.assert_allclose(np.asarray(encode(shorter, LENGTHS)[0])[cut], np.asarray(tokens)[cut],
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(encode(longer.astype(np.float32), LENGTHS)[1], valid)


def test_fixed_token_count_padded_with_end_of_audio(model_and_params, encode):
    model, params = model_and_params
    tokens, valid = encode(_features(24), LENGTHS)
    assert tokens.shape == (4, CONFIG.num_audio_tokens, CONFIG.out_width)
    np.testing.assert_array_equal(valid.sum(axis=1), [6, 3, 8, 1])  # ceil(length / 3)
    end_of_audio = np.asarray(params["params"]["end_of_audio"].value)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    np.testing.assert_array_equal(tokens[~valid], np.broadcast_to(end_of_audio, tokens[~valid].shape))
    np.testing.assert_allclose(np.linalg.norm(tokens[valid], axis=-1), 1.0, atol=1e-5)
    given = np.full((CONFIG.out_width,), 7.0, np.float32)
    with_given, _ = jax.jit(model.apply)(params, _features(24), LENGTHS, given)
    assert np.all(np.asarray(with_given)[~valid] == 7.0)
    np.testing.assert_allclose(np.asarray(with_given)[valid], tokens[valid], atol=1e-6)


def test_frames_past_the_token_budget_are_ignored(encode):
    feats = _features(24)
    longer = np.concatenate([feats, np.ones((4, 30, 560), np.float32)], axis=1)
    tokens, valid = encode(longer, LENGTHS + 30)
    reference, reference_valid = encode(feats, np.minimum(LENGTHS + 30, 24))
    np.testing.assert_allclose(tokens, reference, atol=1e-5, rtol=0)
    assert np.all(np.asarray(valid) == np.asarray(reference_valid)) and np.all(np.asarray(valid))


def test_fsmn_memory_is_masked_window_sum_plus_values():
    values = np.arange(1, 9, dtype=np.float32).reshape(1, 8, 1, 1)
    mask = np.arange(8)[None] < 6
    fsmn = FSMNMemory(kernel_size=3)
    params = {"params": {"kernel": jnp.ones((3, 1, 1))}}
    out = np.asarray(fsmn.apply(params, values, mask))[0, :, 0, 0]
    masked = np.where(mask[0], values[0, :, 0, 0], 0)
    window = np.convolve(masked, np.ones(3), mode="same")
    np.testing.assert_allclose(out, np.where(mask[0], window + masked, 0))
    assert out[5] == 5 + 6 + 6  # frame 6 (value 7) is padding and contributes nothing


def test_every_param_has_known_logical_axes(model_and_params):
    _, params = model_and_params
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_sharded_forward_matches_single_device(model_and_params, encode):
    model, _ = model_and_params
    expected, _ = encode(_features(24), LENGTHS)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # The shardings are computed outside `activate`, as train_step.create_train_state does.
    abstract = jax.eval_shape(model.init, jax.random.key(0), _features(24), LENGTHS)
    shardings = sharding.logical_to_mesh_sharding(abstract, mesh)
    with sharding.activate(mesh):
        sharded_params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), _features(24), LENGTHS)
        feats = jax.device_put(_features(24), sharding.batch_sharding(mesh, 3))
        lengths = jax.device_put(LENGTHS, sharding.batch_sharding(mesh, 1))
        tokens, _ = jax.jit(model.apply)(sharded_params, feats, lengths)
    kernel = sharded_params["params"]["blocks"]["attention"]["query"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(tokens, expected, atol=1e-5, rtol=0)


def test_remat_and_unscanned_blocks_give_the_same_output(model_and_params, encode):
    _, params = model_and_params
    expected, _ = encode(_features(24), LENGTHS)
    remat = AudioEncoder(AudioConfig.tiny(num_audio_tokens=8, out_width=32, remat_policy="full"))
    np.testing.assert_allclose(jax.jit(remat.apply)(params, _features(24), LENGTHS)[0], expected, atol=1e-5)
    unscanned = AudioEncoder(AudioConfig.tiny(num_audio_tokens=8, out_width=32, scan=False))
    inner = dict(params["params"])
    blocks = inner.pop("blocks")
    for i in range(CONFIG.depth - 1):
        inner[f"block_{i}"] = jax.tree.map(lambda x: x[i], nn.unbox(blocks))
    np.testing.assert_allclose(jax.jit(unscanned.apply)({"params": inner}, _features(24), LENGTHS)[0], expected, atol=1e-5)


def test_paraformer_preset_shapes():
    config = AudioConfig.paraformer()
    model = AudioEncoder(config)
    feats = jax.ShapeDtypeStruct((1, 300, 560), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), feats, lengths)
    (tokens, valid) = jax.eval_shape(model.apply, params, feats, lengths)
    assert tokens.shape == (1, 256, 4096) and valid.shape == (1, 256)
    num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))
    encoder_params = num_params - (3 * 512 * 4096 + 4096) - 4096  # minus projector and end_of_audio
    assert 155e6 < encoder_params < 160e6  # Paraformer-large's SAN-M encoder: ~158M


def test_config_validation():
    with pytest.raises(ValueError, match="unknown fields"):
        AudioConfig.from_config({"width": 64, "bogus": 1})
    with pytest.raises(ValueError, match="projector"):
        AudioConfig(projector="conv")
    with pytest.raises(ValueError, match="model.audio.attention_implementation"):
        AudioConfig(attention_implementation="flash")
    config = AudioConfig.from_config({"width": 32, "projector": "mlp", "num_audio_tokens": 4})
    feats, lengths = jnp.zeros((1, 5, 560)), jnp.array([5])
    params = jax.eval_shape(AudioEncoder(config).init, jax.random.key(0), feats, lengths)
    assert set(params["params"]["projector"]) == {"fc1", "fc2"}
    tokens, _ = jax.eval_shape(AudioEncoder(config).apply, params, feats, lengths)
    assert tokens.shape == (1, 4, config.out_width)


def test_dropout_only_with_a_dropout_rng_one_mask_per_key(model_and_params, encode):
    _, params = model_and_params
    expected, valid = encode(_features(24), LENGTHS)
    model = AudioEncoder(AudioConfig.tiny(num_audio_tokens=8, out_width=32, dropout=0.3))
    apply = jax.jit(lambda rngs: model.apply(params, _features(24), LENGTHS, rngs=rngs)[0])
    np.testing.assert_allclose(apply({}), expected, atol=1e-6)  # evaluation: no RNG, no dropout
    a, b = np.asarray(apply({"dropout": jax.random.key(1)})), np.asarray(apply({"dropout": jax.random.key(2)}))
    valid = np.asarray(valid)
    assert np.abs(a - np.asarray(expected))[valid].max() > 1e-2 and np.abs(a - b)[valid].max() > 1e-2
    np.testing.assert_array_equal(a, apply({"dropout": jax.random.key(1)}))  # a key is one mask
    with pytest.raises(ValueError, match=r"model.audio.dropout=1.0"):
        AudioConfig(dropout=1.0)
    assert AudioConfig.paraformer().dropout == 0.1  # Paraformer's

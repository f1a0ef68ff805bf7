"""The omni model: feature scattering, towers wired to the LLM, freezing, sharded = single device."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.models.audio import AudioConfig
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.models.omni import (ConnectorConfig, OmniConfig, OmniModel, fourier_features, grid_fractions,
                                    scatter_features)
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import optimizers, train_step

PATCH = 6  # placeholder token id (the tokenizer's <imagePatch>)
LLM_CONFIG = LLMConfig(vocab_size=128, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=64, mrope_sections=(2, 3, 3))
CONFIG = OmniConfig(llm=LLM_CONFIG, vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
                    connector=ConnectorConfig(output_scale=4.0, position_frequencies=2), placeholder_ids=(PATCH, 9))
BATCH, LENGTH, PATCHES = 8, 24, 48


def make_batch(seed=0):
    """Rows: text, one 56x56 image (4 merged tokens) as placeholders at 3..6, then text."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 128, (BATCH, LENGTH + 1)).astype(np.int32)
    tokens[:, 3:7] = PATCH
    image_patches, grid = ip.patchify(rng.normal(size=(56, 56, 3)).astype(np.float32))  # 16 patches
    patches = np.zeros((BATCH, PATCHES, image_patches.shape[1]), np.float32)
    segments = np.zeros((BATCH, PATCHES), np.int32)
    hw = np.zeros((BATCH, 2, PATCHES), np.int32)
    for row in range(BATCH):
        patches[row, :16] = image_patches + row
        segments[row, :16] = 1
        hw[row, :, :16] = ip.hw_positions(grid)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, 3, LENGTH)).copy()
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((BATCH, LENGTH), np.float32),
            "segment_ids": np.ones((BATCH, LENGTH), np.int32), "positions": positions,
            "modality": np.ones((BATCH, LENGTH), np.int32), "vision_patches": patches,
            "vision_segment_ids": segments, "vision_hw": hw}


def shapes(batch):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


@pytest.fixture(scope="module")
def model_and_params():
    model = OmniModel(CONFIG)
    inputs = train_step.model_inputs(make_batch())
    params = jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs)
    return model, jax.tree.map(np.asarray, nn.unbox(params))


def test_scatter_takes_valid_features_in_order():
    embeddings = jnp.zeros((2, 6, 1))
    is_placeholder = jnp.array([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    features = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1)  # row 0: 1..4, row 1: 5..8
    valid = jnp.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool)  # a gap in row 0, one feature in row 1
    out = scatter_features(embeddings, is_placeholder, features, valid)[..., 0]
    # Row 0: placeholders take features 1, 3, 4; the fourth has none and keeps its embedding.
    np.testing.assert_array_equal(out, [[0, 1, 3, 0, 4, 0], [6, 0, 0, 0, 0, 0]])


def test_grid_fractions_locate_tokens_in_their_image():
    # A 4x6-patch image (2x3 merged tokens), two 2x2-patch video frames, padding.
    hw = np.concatenate([ip.hw_positions((1, 4, 6)), ip.hw_positions((2, 2, 2)), np.zeros((2, 8), np.int32)], 1)
    segments = np.array([[1] * 6 + [2, 3, 0, 0]])
    fractions = np.asarray(grid_fractions(jnp.asarray(hw[None]), jnp.asarray(segments)))[0]
    np.testing.assert_allclose(fractions[:6], [[.25, 1 / 6], [.25, .5], [.25, 5 / 6], [.75, 1 / 6], [.75, .5], [.75, 5 / 6]])
    np.testing.assert_allclose(fractions[6:8], [[.5, .5], [.5, .5]])
    assert fourier_features(jnp.asarray(fractions), 3).shape == (10, 12)


def test_text_rows_equal_the_llm_alone(model_and_params):
    model, params = model_and_params
    batch = make_batch()
    batch["tokens"][:, 3:7] = 11  # no placeholders: the vision tower must not matter
    omni_logits = jax.jit(lambda p, b: model.apply({"params": p}, **train_step.model_inputs(b)))(params, batch)
    llm = LLM(LLM_CONFIG)
    llm_logits = jax.jit(lambda p, b: llm.apply({"params": p}, b["tokens"], jnp.moveaxis(b["positions"], 1, 0),
                                                b["segment_ids"]))(params["llm"], batch)
    np.testing.assert_allclose(omni_logits, llm_logits, atol=1e-5, rtol=1e-5)


def test_image_reaches_only_tokens_from_its_placeholders_on(model_and_params):
    model, params = model_and_params
    batch = make_batch()
    forward = jax.jit(lambda b: model.apply({"params": params}, **train_step.model_inputs(b)))
    before = np.asarray(forward(batch))
    batch["vision_patches"][0, :16] += 1.0  # change row 0's image
    after = np.asarray(forward(batch))
    np.testing.assert_allclose(after[0, :3], before[0, :3], atol=1e-6)  # causal: text before the image
    assert np.abs(after[0, 3:] - before[0, 3:]).max() > 1e-4
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-6)  # other rows untouched


def test_padding_patches_do_not_matter(model_and_params):
    model, params = model_and_params
    batch = make_batch()
    forward = jax.jit(lambda b: model.apply({"params": params}, **train_step.model_inputs(b)))
    before = np.asarray(forward(batch))
    batch["vision_patches"][:, 16:] = 7.0
    batch["vision_hw"][:, :, 16:] = 3
    np.testing.assert_allclose(forward(batch), before, atol=1e-5)


def test_parameters_live_under_their_tower(model_and_params):
    model, params = model_and_params
    position = {"position_embedding"} if model.config.connector.position_frequencies else set()
    assert set(params) == {"llm", "vision", "connector"} | position


def test_frozen_tower_does_not_change_after_a_train_step():
    batch = make_batch()
    model = OmniModel(CONFIG)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = nn.unbox(train_step.abstract_boxed_params(model, shapes(batch)))
    opt = ml_collections.ConfigDict(dict(peak_lr=1e-2, warmup_steps=0, frozen=(r"^vision/",)))
    tx = optimizers.make_optimizer(opt, 10, abstract)
    state, _, state_shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                              shapes(batch), seed=0)
    before = jax.device_get(state.params)
    step = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, state_shardings,
                                     batch_keys=tuple(batch))
    state, _ = step(state, batch, jnp.ones(NUM_MODALITIES))
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, after["vision"], before["vision"])
    for tower in ("llm", "connector"):
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[tower], before[tower]))
        assert all(changed), tower


def test_sharded_forward_equals_single_device(model_and_params):
    model, params = model_and_params
    batch = make_batch(1)
    inputs = train_step.model_inputs(batch)
    single = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, inputs))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = train_step.abstract_boxed_params(model, shapes(batch))
    param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh)
    sharded_params = jax.device_put(params, param_shardings)
    sharded_batch = jax.device_put(batch, train_step.batch_shardings(mesh, tuple(batch)))
    with sharding.activate(mesh):
        sharded = jax.jit(lambda p, b: model.apply({"params": p}, **train_step.model_inputs(b)))(
            sharded_params, sharded_batch)
    assert sharded_params["vision"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(sharded), single, atol=2e-5, rtol=2e-5)


def test_unsupported_connector_is_named():
    with pytest.raises(ValueError, match="supports 'linear' only"):
        ConnectorConfig(kind="c_abstractor")
    model_cfg = ml_collections.ConfigDict(dict(llm=dict(vars(LLM_CONFIG)), vision=dict(widht=3), connector={}))
    with pytest.raises(ValueError, match=r"config.model.vision has unknown fields \['widht'\]"):
        OmniConfig.from_config(model_cfg, (PATCH,))


# ----------------------------------------------------------------------------- audio

AUDIO_PATCH, END_OF_AUDIO = 12, 13  # the tokenizer's <audioPatch>, <end_of_audio>
AUDIO = AudioConfig.tiny(width=16, depth=2, num_heads=2, mlp_dim=32, num_audio_tokens=4, out_width=32)
AUDIO_CONFIG = dataclasses.replace(CONFIG, audio=AUDIO, audio_output_scale=4.0, audio_placeholder_id=AUDIO_PATCH,
                                   end_of_audio_id=END_OF_AUDIO)
CLIPS, FRAMES = 2, AUDIO.max_frames  # 2 clip slots of 12 LFR frames (4 tokens) per row
AUDIO_LENGTHS = np.array([[12, 5], [7, 0], [2, 12], [12, 0], [4, 4], [9, 0], [1, 1], [12, 12]], np.int32)


def make_audio_batch(seed=0):
    """make_batch's rows (image at 3..6) plus clips: clip j's 4 placeholders at 10 + 6j, 0 = empty slot."""
    batch = make_batch(seed)
    rng = np.random.default_rng(seed + 100)
    tokens = batch["tokens"]
    tokens[np.isin(tokens, (AUDIO_PATCH, END_OF_AUDIO))] = 20  # random text must not look like audio
    for row, lengths in enumerate(AUDIO_LENGTHS):
        for clip in range(int(np.count_nonzero(lengths))):
            tokens[row, 10 + 6 * clip:14 + 6 * clip] = AUDIO_PATCH
    features = rng.normal(size=(BATCH, CLIPS, FRAMES, AUDIO.input_dim)).astype(np.float32)
    features *= np.arange(FRAMES)[None, None, :, None] < AUDIO_LENGTHS[:, :, None, None]
    return dict(batch, tokens=tokens, audio_features=features, audio_lengths=AUDIO_LENGTHS.copy())


@pytest.fixture(scope="module")
def audio_model_and_params():
    model = OmniModel(AUDIO_CONFIG)
    inputs = train_step.model_inputs(make_audio_batch())
    params = jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs)
    return model, jax.tree.map(np.asarray, nn.unbox(params))


def test_audio_tower_lives_under_audio(audio_model_and_params):
    _, params = audio_model_and_params
    assert set(params) == {"llm", "vision", "connector", "position_embedding", "audio"}
    assert "end_of_audio" not in params["audio"]  # the LLM's <end_of_audio> embedding pads the clips


def test_audio_placeholder_j_takes_audio_token_j(audio_model_and_params):
    model, params = audio_model_and_params
    batch = make_audio_batch()
    inputs = {k: v for k, v in train_step.model_inputs(batch).items() if k not in ("positions", "segment_ids")}
    embedded = np.asarray(model.apply({"params": params}, **inputs, method=OmniModel.embed))
    tokens, present = model.apply({"params": params}, batch["audio_features"], batch["audio_lengths"],
                                  method=OmniModel.audio_tokens)
    tokens, present = np.asarray(tokens), np.asarray(present)
    eoa = params["llm"]["embedding"][END_OF_AUDIO]
    for row, lengths in enumerate(AUDIO_LENGTHS):
        slots = np.flatnonzero(batch["tokens"][row] == AUDIO_PATCH)
        assert len(slots) == 4 * np.count_nonzero(lengths) == present[row].sum()
        np.testing.assert_allclose(embedded[row, slots], tokens[row, :len(slots)], atol=1e-6)
        for clip, length in enumerate(lengths[lengths > 0]):
            valid = -(-length // 3)  # 3 frames per token; the rest is <end_of_audio>
            clip_tokens = embedded[row, slots[4 * clip:4 * clip + 4]]
            np.testing.assert_allclose(np.linalg.norm(clip_tokens[:valid], axis=-1), 4.0, rtol=1e-5)  # scale·L2
            np.testing.assert_allclose(clip_tokens[valid:], np.broadcast_to(eoa, clip_tokens[valid:].shape),
                                       rtol=1e-6)
    others = batch["tokens"] != AUDIO_PATCH
    without_audio = model.apply({"params": params}, **{k: v for k, v in inputs.items() if "audio" not in k},
                                method=OmniModel.embed)
    np.testing.assert_array_equal(embedded[others], np.asarray(without_audio)[others])


def test_clip_reaches_only_its_row_from_its_placeholders_on(audio_model_and_params):
    model, params = audio_model_and_params
    batch = make_audio_batch()
    forward = jax.jit(lambda b: model.apply({"params": params}, **train_step.model_inputs(b)))
    before = np.asarray(forward(batch))
    # Row 0's second clip (placeholders 16..19); not a constant shift, which the first LayerNorm removes.
    batch["audio_features"][0, 1, :5] += np.random.default_rng(0).normal(size=(5, AUDIO.input_dim))
    after = np.asarray(forward(batch))
    np.testing.assert_allclose(after[0, :16], before[0, :16], atol=1e-6)
    assert np.abs(after[0, 16:] - before[0, 16:]).max() > 1e-4
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-6)


def test_sharded_forward_with_audio_equals_single_device(audio_model_and_params):
    model, params = audio_model_and_params
    batch = make_audio_batch(1)
    single = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **train_step.model_inputs(b)))(params, batch))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = train_step.abstract_boxed_params(model, shapes(batch))
    sharded_params = jax.device_put(params, sharding.logical_to_mesh_sharding(boxed, mesh))
    sharded_batch = jax.device_put(batch, train_step.batch_shardings(mesh, tuple(batch)))
    with sharding.activate(mesh):
        sharded = jax.jit(lambda p, b: model.apply({"params": p}, **train_step.model_inputs(b)))(
            sharded_params, sharded_batch)
    assert sharded_batch["audio_features"].sharding == sharding.batch_sharding(mesh, 4)
    assert sharded_params["audio"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(sharded), single, atol=2e-5, rtol=2e-5)


def test_frozen_audio_tower_does_not_change_after_a_train_step():
    batch = make_audio_batch()
    model = OmniModel(AUDIO_CONFIG)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = nn.unbox(train_step.abstract_boxed_params(model, shapes(batch)))
    opt = ml_collections.ConfigDict(dict(peak_lr=1e-2, warmup_steps=0, frozen=(r"^audio/",)))
    tx = optimizers.make_optimizer(opt, 10, abstract)
    state, _, state_shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                              shapes(batch), seed=0)
    before = jax.device_get(state.params)
    step = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, state_shardings,
                                     batch_keys=tuple(batch))
    state, _ = step(state, batch, jnp.ones(NUM_MODALITIES))
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, after["audio"], before["audio"])
    for tower in ("llm", "vision", "connector"):
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[tower], before[tower]))
        assert all(changed), tower
    # The audio tokens reach the loss: unfrozen, every audio tensor would get a gradient.
    grads = jax.jit(jax.grad(lambda p: train_step.loss_fn(p, batch, jnp.ones(NUM_MODALITIES), model=model,
                                                          z_loss_weight=0.0)[0]))(before)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["audio"]))


def test_audio_config_errors_name_the_field():
    model_cfg = ml_collections.ConfigDict(dict(llm=dict(vars(LLM_CONFIG)), vision={}, connector={},
                                               audio=dict(enabled=True, width=16, num_heads=2)))
    config = OmniConfig.from_config(model_cfg, (PATCH,), audio_placeholder_id=AUDIO_PATCH, end_of_audio_id=END_OF_AUDIO)
    assert config.audio.out_width == LLM_CONFIG.width and config.audio.width == 16
    model_cfg.audio.out_width = 7
    with pytest.raises(ValueError, match=r"config.model.audio.out_width=7 must equal config.model.llm.width=32"):
        OmniConfig.from_config(model_cfg, (PATCH,))
    model_cfg.audio.enabled = False
    assert OmniConfig.from_config(model_cfg, (PATCH,)).audio is None  # off: no tower, no width check
    model_cfg.audio.widht = 3
    with pytest.raises(ValueError, match=r"config.model.audio has unknown fields \['widht'\]"):
        OmniConfig.from_config(model_cfg, (PATCH,))
    with pytest.raises(ValueError, match="audio_placeholder_id and end_of_audio_id"):
        OmniModel(dataclasses.replace(AUDIO_CONFIG, end_of_audio_id=-1)).init(
            jax.random.key(0), **train_step.model_inputs(make_audio_batch()))

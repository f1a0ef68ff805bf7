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
from m2omni_jax.models.connectors import make_connector, tokens_to_grid
from m2omni_jax.models import omni as omni_lib
from m2omni_jax.models.layers import kernel_init, zeros_init
from m2omni_jax.models.omni import (ConnectorConfig, ConnectorExtras, OmniConfig, OmniModel, connector_macs_per_pack,
                                    fourier_features, grid_fractions, scatter_features, segment_grids,
                                    vision_training_flops_per_pack)
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import optimizers, train_step

PATCH = 6  # placeholder token id (the tokenizer's <imagePatch>)
LLM_CONFIG = LLMConfig(vocab_size=128, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=64, mrope_sections=(2, 3, 3))
CONFIG = OmniConfig(llm=LLM_CONFIG, vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
                    connector=ConnectorConfig(output_scale=4.0, position_frequencies=2), placeholder_ids=(PATCH, 9))
BATCH, LENGTH, PATCHES = 8, 24, 48
VISION_INPUTS = ("vision_patches", "vision_segment_ids", "vision_hw")


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

    # With the frozen mask the tower gets no backward pass: the same update, fewer FLOPs.
    frozen = optimizers.frozen_mask(opt, abstract)
    assert all(jax.tree.leaves(frozen["vision"])) and not any(jax.tree.leaves(frozen["llm"]))
    fresh, _, _ = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES, shapes(batch), seed=0)
    masked = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, state_shardings,
                                       batch_keys=tuple(batch), frozen=frozen)
    flops = {name: fn.jitted.lower(fresh, batch, jnp.ones(NUM_MODALITIES)).compile().cost_analysis()["flops"]
             for name, fn in (("all", step), ("masked", masked))}
    fresh, _ = masked(fresh, batch, jnp.ones(NUM_MODALITIES))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(fresh.params), after)
    assert flops["masked"] < flops["all"]


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


def test_connector_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model.connector.kind='qformer'; use one of"):
        ConnectorConfig(kind="qformer")
    with pytest.raises(ValueError, match=r"model.connector.num_tokens=50 must be a perfect square for 'avg_pool'"):
        ConnectorConfig(kind="avg_pool", num_tokens=50)
    ConnectorConfig(kind="attn_pool", num_tokens=50)  # queries need no grid
    with pytest.raises(ValueError, match=r"model.connector.num_tokens=0 must be positive for 'c_abstractor'"):
        ConnectorConfig(kind="c_abstractor", num_tokens=0)
    with pytest.raises(ValueError, match=r"model.connector.max_segments_per_row=0 must be positive"):
        ConnectorConfig(kind="avg_pool", max_segments_per_row=0)
    with pytest.raises(ValueError, match=r"model.connector.mlp=True is for kind='linear' only"):
        ConnectorConfig(kind="avg_pool", mlp=True)
    with pytest.raises(ValueError, match=r"model.connector.num_heads=3 must divide model.vision.out_width=16"):
        dataclasses.replace(CONFIG, connector=ConnectorConfig(kind="attn_pool", num_heads=3))
    model_cfg = ml_collections.ConfigDict(dict(llm=dict(vars(LLM_CONFIG)), vision=dict(widht=3), connector={}))
    with pytest.raises(ValueError, match=r"config.model.vision has unknown fields \['widht'\]"):
        OmniConfig.from_config(model_cfg, (PATCH,))
    model_cfg = ml_collections.ConfigDict(dict(llm=dict(vars(LLM_CONFIG)), vision={},
                                               connector=dict(kind="c_abstractor", num_tokens=16, depth=1)))
    assert OmniConfig.from_config(model_cfg, (PATCH,)).connector.pooled_grid == (4, 4)


def test_flops_count_the_pooling_connectors():
    pack = 64
    tower = vision_training_flops_per_pack(dataclasses.replace(CONFIG, connector=ConnectorConfig()), pack)
    for kind in ("avg_pool", "attn_pool", "c_abstractor"):
        small, large = (vision_training_flops_per_pack(dataclasses.replace(CONFIG, connector=ConnectorConfig(
            kind=kind, num_tokens=4, num_heads=2, max_segments_per_row=s)), pack) for s in (2, 4))
        assert small > tower - 6.0 * (pack // 4) * 16 * 32 and large > small, kind  # minus the linear's
    # avg_pool by hand: per segment, pool rows (2·16 cells) then columns (2·2·4), then a Linear to k tokens.
    avg = dataclasses.replace(CONFIG, connector=ConnectorConfig(kind="avg_pool", num_tokens=4, max_segments_per_row=3,
                                                                max_grid_side=4))
    assert connector_macs_per_pack(avg, pack // 4) == 3 * ((2 * 16 + 2 * 2 * 4) * 16 + 4 * 16 * 32)


# ----------------------------------------------------------------------------- pooling connectors

POOL_PATCHES, POOL_LENGTH, POOL_ROWS = 96, 24, 4
POOL_IMAGES = {"a": (56, 84), "b": (112, 56), "c": (84, 84)}  # merged grids 2x3, 4x2, 3x3
POOLING = {kind: ConnectorConfig(kind=kind, num_tokens=k, max_segments_per_row=3, max_grid_side=4, hidden_width=8,
                                 depth=1, num_heads=2, output_scale=4.0, position_frequencies=2)
           for kind, k in (("avg_pool", 4), ("attn_pool", 3), ("c_abstractor", 4))}  # 3: not a square


def _pixels(name, seed=0):
    rng = np.random.default_rng(seed + sorted(POOL_IMAGES).index(name))
    return rng.normal(size=POOL_IMAGES[name] + (3,)).astype(np.float32)


def make_pool_batch(rows, k, seed=0):
    """rows: per row a list of media ("a", "b", "c": images; "v": a 2-frame-pair 56x56 video),
    packed in order; their placeholders (k per image, 2k per video) follow one text token each."""
    batch = make_batch(seed)
    batch = {key: value[:POOL_ROWS, :POOL_LENGTH] if value.ndim == 2 else value[:POOL_ROWS] for key, value in
             batch.items() if not key.startswith("vision")}
    batch["positions"] = batch["positions"][:, :, :POOL_LENGTH]
    batch["tokens"][np.isin(batch["tokens"], (PATCH, 9))] = 20
    batch["vision_patches"] = np.zeros((POOL_ROWS, POOL_PATCHES, 1176), np.float32)
    batch["vision_segment_ids"] = np.zeros((POOL_ROWS, POOL_PATCHES), np.int32)
    batch["vision_hw"] = np.zeros((POOL_ROWS, 2, POOL_PATCHES), np.int32)
    for row, media in enumerate(rows):
        offset, segment, slot = 0, 1, 1
        for name in media:
            frames = np.random.default_rng(seed + 7).normal(size=(4, 56, 56, 3)) if name == "v" else _pixels(name, seed)
            patches, grid = ip.patchify(frames)
            n = len(patches)
            batch["vision_patches"][row, offset:offset + n] = patches
            batch["vision_segment_ids"][row, offset:offset + n] = segment + np.repeat(np.arange(grid[0]), n // grid[0])
            batch["vision_hw"][row, :, offset:offset + n] = ip.hw_positions(grid)
            batch["tokens"][row, slot:slot + grid[0] * k] = PATCH
            offset, segment, slot = offset + n, segment + grid[0], slot + grid[0] * k + 1
    return batch


def test_segment_grids_place_each_segment_top_left():
    # Row: a 2x3 image (segment 7), a 1x1 image (9), padding, then a 3rd segment past S = 2.
    hw = np.concatenate([ip.hw_positions((1, 4, 6)), ip.hw_positions((1, 2, 2)), np.zeros((2, 4), np.int32),
                         ip.hw_positions((1, 2, 2))], 1)[None]
    ids = np.array([[7] * 6 + [9, 0, 5]])
    features = np.arange(1, 10, dtype=np.float32).reshape(1, 9, 1)
    grids, extents = segment_grids(jnp.asarray(features), jnp.asarray(ids), jnp.asarray(hw), 2, 3)
    grids = np.asarray(grids)[0, ..., 0]
    np.testing.assert_array_equal(grids[0], [[1, 2, 3], [4, 5, 6], [0, 0, 0]])
    np.testing.assert_array_equal(grids[1], [[7, 0, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(extents)[0], [[2, 3], [1, 1]])  # the third segment is dropped


@pytest.fixture(scope="module", params=sorted(POOLING))
def pooled_model(request):
    config = dataclasses.replace(CONFIG, connector=POOLING[request.param])
    model = OmniModel(config)
    inputs = train_step.model_inputs(make_pool_batch([["a", "b"]], config.connector.num_tokens))
    params = jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs)
    return model, jax.tree.map(np.asarray, nn.unbox(params))


def test_pooling_connector_gives_k_tokens_per_segment_in_placeholder_order(pooled_model):
    model, params = pooled_model
    cfg = model.config.connector
    k = cfg.num_tokens

    def inputs(batch):
        return {key: batch[key] for key in ("tokens", "vision_patches", "vision_segment_ids", "vision_hw")}
    embed = jax.jit(lambda b: model.apply({"params": params}, **inputs(b), method=OmniModel.embed))
    # Rows: two images of different sizes; a alone; b alone; nothing (text only).
    batch = make_pool_batch([["a", "b"], ["a"], ["b"], []], k)
    embedded = np.asarray(embed(batch))
    slots = [np.flatnonzero(batch["tokens"][row] == PATCH) for row in range(POOL_ROWS)]
    assert [len(s) for s in slots] == [2 * k, k, k, 0]

    # The standalone connector on each image's own merged grid gives that image's k slots.
    features, merged_ids = model.apply({"params": params}, *[batch[key] for key in VISION_INPUTS],
                                       method=OmniModel.vision_features)
    connector = make_connector(cfg.kind, LLM_CONFIG.width, k, hidden_width=cfg.hidden_width,
                               num_heads=cfg.num_heads, depth=cfg.depth, max_grid_side=cfg.max_grid_side)

    def standalone(row, first, name):
        h, w = (side // 28 for side in POOL_IMAGES[name])
        grid = tokens_to_grid(features[row:row + 1, first:first + h * w], h, w)
        return np.asarray(connector.apply({"params": params["connector"]}, grid))[0] * cfg.output_scale
    a, b = standalone(0, 0, "a"), standalone(0, 6, "b")
    for row, tokens in ((0, np.concatenate([a, b])), (1, a), (2, b)):
        np.testing.assert_allclose(embedded[row, slots[row]], tokens, atol=1e-5)  # alone or packed: same
    others = batch["tokens"] != PATCH
    text_only = model.apply({"params": params}, batch["tokens"], method=OmniModel.embed)
    np.testing.assert_array_equal(embedded[others], np.asarray(text_only)[others])

    # New pixels for b: a's tokens stay, b's change.
    batch["vision_patches"][0, 24:56] += np.random.default_rng(5).normal(size=(32, 1176))
    changed = np.asarray(embed(batch))
    np.testing.assert_allclose(changed[0, slots[0][:k]], embedded[0, slots[0][:k]], atol=1e-6)
    assert np.abs(changed[0, slots[0][k:]] - embedded[0, slots[0][k:]]).max() > 1e-4

    # Other sizes and a video (2 frame-pair segments, 2k tokens): the same compiled program.
    other = make_pool_batch([["c"], ["v", "a"], ["c", "b"], ["a", "b", "b"]], k, seed=1)
    embedded = np.asarray(embed(other))
    tokens, valid = (np.asarray(x) for x in model.apply({"params": params}, *[other[key] for key in VISION_INPUTS],
                                                         method=OmniModel.vision_tokens))
    assert tokens.shape == (POOL_ROWS, cfg.max_segments_per_row * k, LLM_CONFIG.width)
    assert valid.sum(1).tolist() == [k, 3 * k, 2 * k, 3 * k]
    for row in range(POOL_ROWS):
        slots = np.flatnonzero(other["tokens"][row] == PATCH)
        np.testing.assert_allclose(embedded[row, slots], tokens[row, valid[row]], atol=1e-5)  # jit vs eager
    assert embed._cache_size() == 1


def test_pooling_connector_sharded_equals_single_device():
    model = OmniModel(dataclasses.replace(CONFIG, connector=POOLING["c_abstractor"]))
    batch = make_pool_batch([["a", "b"], ["c"], ["v"], []], 4)
    inputs = train_step.model_inputs(batch)
    params = jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs)
    single = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x))(nn.unbox(params), inputs))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded_params = jax.device_put(nn.unbox(params), sharding.logical_to_mesh_sharding(params, mesh))
    sharded_batch = jax.device_put(batch, train_step.batch_shardings(mesh, tuple(batch)))
    with sharding.activate(mesh):
        sharded = jax.jit(lambda p, b: model.apply({"params": p}, **train_step.model_inputs(b)))(
            sharded_params, sharded_batch)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=2e-5, rtol=2e-5)


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


def test_position_features_after_the_norm_start_at_zero_and_learn():
    """position_frequencies: the tokens at init equal those without position features
    (zero-initialised projection after the L2 norm), and the projection gets a gradient."""
    batch = make_batch()
    inputs = train_step.model_inputs(batch)
    with_pos = OmniModel(dataclasses.replace(CONFIG, connector=ConnectorConfig(output_scale=4.0, position_frequencies=2)))
    without = OmniModel(dataclasses.replace(CONFIG, connector=ConnectorConfig(output_scale=4.0)))
    params = nn.unbox(with_pos.init(jax.random.key(0), **inputs)["params"])
    assert params["position_embedding"]["kernel"].shape == (8, LLM_CONFIG.width)
    media = {k: inputs[k] for k in ("tokens",) + VISION_INPUTS}
    embed = lambda model, p: model.apply({"params": p}, **media, method=OmniModel.embed)  # noqa: E731
    no_position = {k: v for k, v in params.items() if k != "position_embedding"}
    np.testing.assert_allclose(embed(with_pos, params), embed(without, no_position), atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(embed(with_pos, p)[:, 3:7] * jnp.arange(LLM_CONFIG.width)))(params)
    assert np.abs(np.asarray(grads["position_embedding"]["kernel"])).max() > 0


@pytest.mark.parametrize("kind", ["linear", "avg_pool"])
def test_output_position_features_start_at_zero_for_every_kind(kind):
    batch = make_batch()
    inputs = {k: train_step.model_inputs(batch)[k] for k in ("tokens",) + VISION_INPUTS}
    connector = dict(kind=kind, output_scale=4.0, num_tokens=4, max_segments_per_row=2, max_grid_side=4)
    with_pos = OmniModel(dataclasses.replace(CONFIG, connector=ConnectorConfig(**connector, position_frequencies=2)))
    without = OmniModel(dataclasses.replace(CONFIG, connector=ConnectorConfig(**connector)))
    params = nn.unbox(with_pos.init(jax.random.key(0), **inputs)["params"])
    no_position = {k: v for k, v in params.items() if k != "position_embedding"}
    tokens = lambda model, p: model.apply({"params": p}, *(inputs[k] for k in VISION_INPUTS),  # noqa: E731
                                          method=OmniModel.vision_tokens)[0]
    np.testing.assert_allclose(tokens(with_pos, params), tokens(without, no_position), atol=1e-6)
    moved = jax.tree.map(lambda v: v + 0.1, params)  # a trained projection: tokens now depend on place
    shifted = np.asarray(tokens(with_pos, moved) - tokens(without, {k: v for k, v in moved.items()
                                                                    if k != "position_embedding"}))
    assert np.abs(shifted[0, 0] - shifted[0, 1]).max() > 1e-4


# ----------------------------------------------------------------------------- the connector plug-in point


class ToyExtras(ConnectorExtras):
    """2 learned features per merged token into the connector; the LLM's embedding of token 5 out."""

    @nn.compact
    def __call__(self, features, merged_segment_ids, vision_hw, embedding):
        inputs = nn.Dense(2, kernel_init=kernel_init(("embed", None)), bias_init=zeros_init((None,)),
                          name="tag")(features)
        return inputs, jnp.broadcast_to(embedding[5], features.shape[:2] + embedding.shape[-1:])

    def input_width(self) -> int:
        return 2

    def training_flops_per_merged_token(self, config) -> float:
        return 6.0 * config.vision.out_width * 2


def test_connector_extras_add_inputs_before_and_features_after_the_connector():
    inputs = train_step.model_inputs(make_batch())
    vision = [inputs[k] for k in VISION_INPUTS]
    model = OmniModel(CONFIG, connector_extras=ToyExtras())
    params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
    assert params["connector_extras"]["tag"]["kernel"].shape == (16, 2)  # its own scope: loaded / frozen by path
    assert params["connector"]["proj"]["kernel"].shape == (16 + 2, LLM_CONFIG.width)
    assert model.apply({"params": params}, *vision, method=OmniModel.vision_features)[0].shape[-1] == 16 + 2
    tokens, valid = (np.asarray(a) for a in model.apply({"params": params}, *vision, method=OmniModel.vision_tokens))
    # The output features are added after the L2 norm and the scale: moving the LLM's
    # embedding of token 5 moves every image token by exactly as much.
    delta = np.arange(LLM_CONFIG.width, dtype=np.float32) / LLM_CONFIG.width
    table = np.array(params["llm"]["embedding"])
    table[5] += delta
    moved = model.apply({"params": dict(params, llm=dict(params["llm"], embedding=table))}, *vision,
                        method=OmniModel.vision_tokens)[0]
    np.testing.assert_allclose((np.asarray(moved) - tokens)[valid], np.broadcast_to(delta, tokens[valid].shape),
                               atol=1e-5)
    plain = vision_training_flops_per_pack(CONFIG, 64)
    merged = 16  # 64 patches / 4
    assert vision_training_flops_per_pack(CONFIG, 64, ToyExtras()) - plain == merged * (6.0 * 16 * 2 + 6.0 * 2 * 32)


def test_connector_extras_need_the_linear_connector():
    with pytest.raises(ValueError, match=r"model.connector.extras='toy' adds features per merged token: "
                                         r"it needs kind='linear', not 'avg_pool'"):
        ConnectorConfig(kind="avg_pool", extras="toy")
    named = dataclasses.replace(CONFIG, connector=ConnectorConfig(extras="toy"))
    with pytest.raises(ValueError, match=r"model.connector.extras='toy', but the OmniModel has no connector_extras"):
        OmniModel(named).init(jax.random.key(0), **train_step.model_inputs(make_batch()))
    pooled = dataclasses.replace(CONFIG, connector=POOLING["avg_pool"])
    with pytest.raises(ValueError, match="needs model.connector.kind='linear', not 'avg_pool'"):
        OmniModel(pooled, connector_extras=ToyExtras()).init(
            jax.random.key(0), **train_step.model_inputs(make_pool_batch([["a"]], 4)))


def test_connector_extras_are_chosen_by_their_registered_name(monkeypatch):
    monkeypatch.setattr(omni_lib, "_CONNECTOR_EXTRAS", {})
    seen = []

    def factory(config, tokenizer):
        seen.append(tokenizer)
        return ToyExtras()
    omni_lib.register_connector_extras("toy", factory)
    config = ml_collections.ConfigDict(dict(model=dict(connector=dict(extras="toy"))))
    assert isinstance(omni_lib.make_connector_extras(config, "the tokenizer"), ToyExtras) and seen == ["the tokenizer"]
    config.model.connector.extras = ""
    assert omni_lib.make_connector_extras(config, None) is None
    config.model.connector.extras = "tyo"
    with pytest.raises(ValueError, match=r"model.connector.extras='tyo' is not registered; registered: \['toy'\]"):
        omni_lib.make_connector_extras(config, None)
    with pytest.raises(ValueError, match="'toy' is already registered"):
        omni_lib.register_connector_extras("toy", lambda config, tokenizer: None)

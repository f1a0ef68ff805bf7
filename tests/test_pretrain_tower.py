"""Vision-tower pre-training: caption-token targets, per-image pooling, a run whose tower the
omni model loads with init_from."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from m2omni_jax.experiments.shapes_world import tower as pt
from m2omni_jax import build
from m2omni_jax.data import media as media_lib
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.models.vision import VisionConfig, VisionEncoder
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step
from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VISION = VisionConfig(width=16, depth=1, num_heads=2, out_width=16)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("tower")
    sys.path.insert(0, REPO)
    from configs.experiments import shapes_world_vqa
    config = shapes_world_vqa.get_config()
    config.model.llm.update(dict(vocab_size=512, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                 mlp_dim=64, mrope_sections=(2, 3, 3)))
    config.model.vision.update(dict(width=16, depth=1, num_heads=2, out_width=16))
    config.data.dir = str(root / "data")
    config.data.sources.text.update(dict(num_docs=200, tokenizer_docs=200))
    config.data.sources.shapes_world.update(dict(num_train=70, num_eval=14, tokenizer_chats=50))
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=512))
    config.tower_pretrain.update(dict(steps=16, batch_size=8, images_per_row=2, patches_per_row=128,
                                      warmup_steps=1, peak_lr=1e-2, log_every=1, checkpoint_every=100,
                                      objective="caption"))  # "regions": its own test below
    return config


def test_targets_are_the_caption_tokens_of_the_scene(config):
    tokenizer = get_tokenizer(config)
    opts = media_lib.VisionOptions.from_config(config)
    record = sw.make_record(0, "train", 2, ("vqa_shape",))  # a question record: its scene's caption all the same
    example = pt.CaptionedImage(tokenizer, 512, opts)(sw.encode_record(record))
    caption_ids = set(tokenizer.encode(sw.caption_text(record["attributes"])))
    assert set(np.flatnonzero(example["targets"])) == caption_ids
    assert example["patches"].shape[0] == int(np.prod(example["grid_thw"]))
    assert pt.CaptionedImage(tokenizer, 512, opts)(b"not msgpack") == {"bad_record": 1}


@pytest.mark.parametrize("pooling", pt.POOLINGS)
def test_an_images_logits_ignore_the_other_images_of_its_row(pooling):
    model = pt.TowerClassifier(TINY_VISION, vocab_size=7, images_per_row=2, pooling=pooling)
    rng = np.random.default_rng(0)
    grids = [(1, 4, 6), (1, 4, 4)]
    images = [{"patches": rng.normal(size=(int(np.prod(g)), media_lib.PATCH_DIM)).astype(np.float32), "grid_thw": g,
               "targets": np.zeros(7, np.float32)} for g in grids]
    row = pt.pack_row(images, 64)
    assert list(np.unique(row["segment_ids"])) == [0, 1, 2] and row["targets"].shape == (2, 7)
    inputs = [row[k][None] for k in ("patches", "segment_ids", "hw")]
    params = model.init(jax.random.key(0), *inputs)["params"]
    logits = model.apply({"params": params}, *inputs)["caption"]
    images[1]["patches"] = images[1]["patches"] + 1.0
    changed = pt.pack_row(images, 64)
    logits2 = model.apply({"params": params}, *[changed[k][None] for k in ("patches", "segment_ids", "hw")])["caption"]
    np.testing.assert_allclose(logits[0, 0], logits2[0, 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[0, 1], logits2[0, 1])


def test_max_pooling_takes_each_words_best_token_of_the_image():
    model = pt.TowerClassifier(TINY_VISION, vocab_size=7, images_per_row=3, pooling="max")
    rng = np.random.default_rng(0)
    images = [{"patches": rng.normal(size=(16, media_lib.PATCH_DIM)).astype(np.float32), "grid_thw": (1, 4, 4),
               "targets": np.zeros(7, np.float32)} for _ in range(2)]  # the third slot stays empty
    row = pt.pack_row(images, 64)
    inputs = [row[k][None] for k in ("patches", "segment_ids", "hw")]
    params = model.init(jax.random.key(0), *inputs)["params"]
    logits = np.asarray(model.apply({"params": params}, *inputs)["caption"])[0]
    features, merged_ids = VisionEncoder(TINY_VISION).apply({"params": params["vision"]}, *inputs)
    token_logits = np.asarray(pt.CaptionTokenHead(7).apply({"params": params["head"]}, features))[0]
    for k in (1, 2):
        np.testing.assert_allclose(logits[k - 1], token_logits[np.asarray(merged_ids[0]) == k].max(0), rtol=1e-5)
    assert np.all(logits[2] == -1e9)
    with pytest.raises(ValueError, match="pooling='sum'"):
        pt.TowerClassifier(TINY_VISION, vocab_size=7, images_per_row=3, pooling="sum").init(jax.random.key(0), *inputs)


def test_a_row_too_small_for_its_images_is_one_clear_error(config):
    bad = config.copy_and_resolve_references()
    bad.tower_pretrain.patches_per_row = 64  # two images of up to 64 patches need 128
    with pytest.raises(ValueError, match="tower_pretrain.patches_per_row=64"):
        pt.make_dataset(bad, get_tokenizer(bad))


def test_pretrain_learns_and_the_omni_model_loads_its_tower(config, tmp_path):
    last = pt.pretrain(config, str(tmp_path / "tower"))
    assert last["bad_records"] == 0 and np.isfinite(last["loss"])
    losses = [record["loss"] for _, record in sorted(read_metrics(tmp_path / "tower" / "metrics.jsonl").items())]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])  # batches differ: means
    written = json.loads((tmp_path / "tower" / "tower_eval.json").read_text())
    assert written["step"] == 16 and sum(written["num_scenes"].values()) == 32  # 2 batches of 8 rows of 2
    assert all(0 <= a <= 1 for attr in ("shape", "color") for a in written[attr].values())

    omni = config.copy_and_resolve_references()
    omni.init_from_include = ("^vision/",)
    fresh, loaded, tower = _load_tower_into_omni(omni, tmp_path)
    for got, want in zip(jax.tree.leaves(loaded["vision"]), jax.tree.leaves(tower["vision"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The LLM and the connector keep this run's fresh initialisation.
    for name in ("llm", "connector"):
        for got, want in zip(jax.tree.leaves(loaded[name]), jax.tree.leaves(fresh[name])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _load_tower_into_omni(omni, tmp_path):
    """(fresh, loaded) omni params of a run with init_from = tmp_path/tower, and the tower's
    checkpoint read with the omni model's layout."""
    omni.init_from = str(tmp_path / "tower")
    model, tx, shapes = build.make_model_and_optimizer(omni, get_tokenizer(omni))
    mesh = sharding.make_mesh(omni.mesh)
    state, abstract, shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                               shapes, seed=1)
    loaded = build.init_from_previous_stage(omni, str(tmp_path), state, abstract, shardings).params
    tower_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract.params, shardings.params)
    tower, _ = checkpointing.load_params(tmp_path / "tower", tower_abstract, include=tuple(omni.init_from_include))
    return state.params, loaded, tower


def test_caption_token_prior_is_each_tokens_share_of_images():
    targets = np.zeros((2, 2, 4), np.float32)  # 2 rows of 2 image slots, vocabulary of 4
    targets[0, 0, [0, 1]] = targets[0, 1, [0]] = targets[1, 0, [0, 2]] = 1  # 3 images; slot (1, 1) empty
    prior = pt.caption_token_prior([{"targets": targets[:1]}, {"targets": targets[1:]}], num_images=3)
    np.testing.assert_allclose(prior, [1 - 0.5 / 3, 1 / 3, 1 / 3, 0.5 / 3])


def test_a_fresh_tower_heads_biases_start_at_the_caption_prior(config, tmp_path):
    """After an update at lr 0: "a" opens every caption, so its bias starts high; a token no caption holds, low."""
    fresh = config.copy_and_resolve_references()
    fresh.tower_pretrain.update(dict(steps=1, warmup_steps=1))  # lr(0) = 0: one step that changes nothing
    # The omni run's optimizer groups and frozen paths are not the tower's.
    fresh.opt.update(dict(param_groups=((r"^vision/", "vision"),), lr_multipliers={"vision": 0.1},
                          frozen=(r"^vision/",)))
    pt.pretrain(fresh, str(tmp_path / "tower"))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"head": {"classifier": {"bias": jax.ShapeDtypeStruct((512,), np.float32, sharding=one_device)}}}
    params, missing = checkpointing.load_params(tmp_path / "tower", abstract)
    assert not missing
    bias = np.asarray(params["head"]["classifier"]["bias"])
    tokenizer = get_tokenizer(fresh)
    article = tokenizer.encode("a red circle")[0]
    assert bias[article] > 4 and np.sum(bias < -4) > 400  # 4 batches of 16 images: logit(1 - 1/128) = 4.8
    with pytest.raises(ValueError, match="head_bias='zero'"):
        fresh.tower_pretrain.head_bias = "zero"
        pt.pretrain(fresh, str(tmp_path / "other"))


def test_attribute_accuracy_scores_the_top_words_against_the_scenes_objects():
    def scene(*objects):
        return {"objects": [{"shape": s, "color": c} for s, c in objects]}
    shape_ids, color_ids = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]
    logits = np.full((3, 13), -1.0, np.float32)
    logits[0, [3, 5]] = 1  # star, red: right
    logits[1, [0, 1, 6]], logits[1, 11] = 1, 0.5  # circle, square (truth: circle, triangle); orange, purple
    logits[2, [2, 7]] = 1  # triangle, yellow
    scenes = [scene(("star", "red")), scene(("circle", "red"), ("triangle", "blue")), scene(("square", "yellow"))]
    got = pt.attribute_accuracy(logits, scenes, shape_ids, color_ids)
    assert sw.SHAPES[3] == "star" and list(sw.COLORS)[:3] == ["red", "orange", "yellow"]
    assert got == {"shape": {"1": 0.5, "2": 0.5}, "color": {"1": 1.0, "2": 0.0}, "num_scenes": {"1": 2, "2": 1}}


def _scene(*objects, width=112, height=112):
    return {"width": width, "height": height, "objects": [
        {"shape": s, "color": c, "size": z, "center": list(center), "radius": r,
         "position": sw.POSITIONS[min(int(center[1] * 3 / height), 2) * 3 + min(int(center[0] * 3 / width), 2)]}
        for s, c, z, center, r in objects]}


def test_region_labels_give_each_token_the_object_covering_it():
    """112x112 at grid (1, 8, 8): 4x4 merged tokens of 28 px."""
    scene = _scene(("star", "red", "small", (14, 14), 10),  # inside token (0, 0)
                   ("circle", "blue", "large", (56, 56), 20),  # 20x20 px of each of the four middle tokens
                   ("square", "green", "small", (84, 84), 5))  # between four tokens: only the one at its centre
    owner = pt.region_owners(scene, (1, 8, 8)).reshape(4, 4)
    np.testing.assert_array_equal(owner, [[0, -1, -1, -1], [-1, 1, 1, -1], [-1, 1, 1, -1], [-1, -1, -1, 2]])
    labels = pt.region_labels(scene, (1, 8, 8))
    star = [1 + sw.SHAPES.index("star"), 1 + list(sw.COLORS).index("red"), 1 + sw.SIZES.index("small"),
            1 + sw.POSITIONS.index("top left")]
    assert labels.shape == (16, 4) and list(labels[0]) == star and list(labels[1]) == [0, 0, 0, 0]
    assert labels[5, 3] == labels[10, 3] == 1 + sw.POSITIONS.index("center")
    assert labels[5, 0] == labels[10, 0] == 1 + sw.SHAPES.index("circle")
    # The scene's pixels map onto the resized image's grid: at (1, 4, 4), tokens of 56 scene px.
    np.testing.assert_array_equal(pt.region_owners(_scene(("star", "red", "small", (70, 20), 10)),
                                                   (1, 4, 4)), [-1, 0, -1, -1])


def test_at_a_fixed_84_pixel_side_each_object_owns_exactly_its_grid_cells_token():
    """data.vision.image_side=84: 3x3 merged tokens, one per cell of the world's 3x3 grid,
    whatever the scene's size and aspect."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sw.sample_scene(rng)
        owner = pt.region_owners(scene, (1, 6, 6))
        expected = np.full(9, -1)
        for k, obj in enumerate(scene["objects"]):
            expected[sw.POSITIONS.index(obj["position"])] = k
        np.testing.assert_array_equal(owner, expected)


def test_record_region_labels_line_up_with_the_packed_merged_tokens(config):
    tokenizer = get_tokenizer(config)
    opts = media_lib.VisionOptions.from_config(config)
    raws = [sw.encode_record(sw.make_record(0, "train", i, ("caption",))) for i in (1, 2)]
    images = [pt.CaptionedImage(tokenizer, 512, opts)(raw) for raw in raws]
    row = pt.pack_row(images, 128)
    sizes = [len(im["region_labels"]) for im in images]
    assert sizes == [int(np.prod(im["grid_thw"])) // 4 for im in images]
    np.testing.assert_array_equal(row["region_labels"][:sum(sizes)], np.concatenate([im["region_labels"] for im in images]))
    assert np.all(row["region_labels"][sum(sizes):] == -1) and row["region_labels"].shape == (32, 4)
    merged_ids = row["segment_ids"][::4]
    assert np.all((merged_ids > 0) == (row["region_labels"][:, 0] >= 0))


def test_region_loss_skips_padding_and_scores_object_tokens():
    labels = np.array([[[2, 3, 1, 9], [0, 0, 0, 0], [-1, -1, -1, -1]]], np.int32)  # an object, background, padding
    perfect = np.full((1, 3, sum(pt.REGION_CLASSES)), -20.0, np.float32)
    for token, label in enumerate(labels[0]):
        for part, offset in zip(label, np.cumsum((0,) + pt.REGION_CLASSES[:-1])):
            perfect[0, token, offset + max(part, 0)] = 20.0
    out = pt.region_loss(perfect, labels)
    assert float(out["region_loss"]) < 1e-6 and float(out["region_shape_accuracy"]) == 1.0
    wrong_padding = perfect.copy()
    wrong_padding[0, 2] = np.random.default_rng(0).normal(size=sum(pt.REGION_CLASSES)) * 5
    assert float(pt.region_loss(wrong_padding, labels)["region_loss"]) < 1e-6  # padding: no loss
    uniform = pt.region_loss(np.zeros_like(perfect), labels)["region_loss"]
    np.testing.assert_allclose(float(uniform), sum(np.log(pt.REGION_CLASSES)), rtol=1e-5)


def test_region_accuracy_reads_each_objects_tokens():
    scene = _scene(("star", "red", "small", (14, 14), 10), ("circle", "blue", "large", (56, 56), 20))
    logits = np.zeros((16, sum(pt.REGION_CLASSES)), np.float32)
    shape, color = pt.split_regions(np.arange(sum(pt.REGION_CLASSES)))[:2]
    logits[0, shape[1 + sw.SHAPES.index("star")]] = 1  # the star right, its colour wrong (purple)
    logits[0, color[1 + list(sw.COLORS).index("purple")]] = 1
    for token in (5, 6, 9):  # the circle's tokens: three say square, one (10) strongly circle
        logits[token, shape[1 + sw.SHAPES.index("square")]] = 1
    logits[10, shape[1 + sw.SHAPES.index("circle")]] = 5
    logits[[5, 6, 9, 10], color[1 + list(sw.COLORS).index("blue")]] = 1
    got = pt.region_accuracy([logits], [scene], [(1, 8, 8)])
    # Position logits all 0: both objects read as the first class, "top left" (the star's).
    assert got == {"shape": {"2": 1.0}, "color": {"2": 0.5}, "position": {"2": 0.5}, "num_scenes": {"2": 1}}


def test_pretrain_on_regions_learns_and_scores_its_region_head(config, tmp_path):
    regions = config.copy_and_resolve_references()
    regions.tower_pretrain.update(dict(objective="regions", steps=12))
    last = pt.pretrain(regions, str(tmp_path / "tower"))
    losses = [record["region_loss"] for _, record in sorted(read_metrics(tmp_path / "tower" / "metrics.jsonl").items())]
    assert last["bad_records"] == 0 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    written = json.loads((tmp_path / "tower" / "tower_eval.json").read_text())
    assert written["head"] == "regions" and sum(written["num_scenes"].values()) == 32
    # The omni run of this config loads the region head where its connector plug-in reads it.
    fresh, loaded, tower = _load_tower_into_omni(regions.copy_and_resolve_references(), tmp_path)
    assert "connector_extras" in tower and "connector_extras" in loaded
    for got, want, init in zip(*(jax.tree.leaves(p["connector_extras"]) for p in (loaded, tower, fresh))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert not np.array_equal(np.asarray(got), np.asarray(init)) or not np.any(np.asarray(init))
    with pytest.raises(ValueError, match="objective='words'"):
        regions.tower_pretrain.objective = "words"
        pt.pretrain(regions, str(tmp_path / "other"))

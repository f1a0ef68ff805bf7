"""Vision-tower pre-training: caption-token targets, per-image pooling, a run whose tower the
omni model loads with init_from."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from m2omni_jax import pretrain_tower as pt
from m2omni_jax import train
from m2omni_jax.data import omni_pipeline as op
from m2omni_jax.data import shapes_world as sw
from m2omni_jax.data import write_shapes_world
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
    from configs import tiny
    config = tiny.get_config("vqa")
    config.model.llm.update(dict(vocab_size=512, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                 mlp_dim=64, mrope_sections=(2, 3, 3)))
    config.model.vision.update(dict(width=16, depth=1, num_heads=2, out_width=16))
    config.data.update(dict(dir=str(root / "data"), num_text_docs=200))
    config.data.shapes_world.update(dict(num_train=70, num_eval=14))
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), train_docs=200, vocab_size=512, train_chats=50))
    config.tower_pretrain.update(dict(steps=16, batch_size=8, images_per_row=2, patches_per_row=128,
                                      warmup_steps=1, peak_lr=1e-2, log_every=1, checkpoint_every=100))
    return config


def test_targets_are_the_caption_tokens_of_the_scene(config):
    tokenizer = get_tokenizer(config)
    opts = op.VisionOptions.from_config(config)
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
    images = [{"patches": rng.normal(size=(int(np.prod(g)), op.PATCH_DIM)).astype(np.float32), "grid_thw": g,
               "targets": np.zeros(7, np.float32)} for g in grids]
    row = pt.pack_row(images, 64)
    assert list(np.unique(row["segment_ids"])) == [0, 1, 2] and row["targets"].shape == (2, 7)
    inputs = [row[k][None] for k in ("patches", "segment_ids", "hw")]
    params = model.init(jax.random.key(0), *inputs)["params"]
    logits = model.apply({"params": params}, *inputs)
    images[1]["patches"] = images[1]["patches"] + 1.0
    changed = pt.pack_row(images, 64)
    logits2 = model.apply({"params": params}, *[changed[k][None] for k in ("patches", "segment_ids", "hw")])
    np.testing.assert_allclose(logits[0, 0], logits2[0, 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[0, 1], logits2[0, 1])


def test_max_pooling_takes_each_words_best_token_of_the_image():
    model = pt.TowerClassifier(TINY_VISION, vocab_size=7, images_per_row=3, pooling="max")
    rng = np.random.default_rng(0)
    images = [{"patches": rng.normal(size=(16, op.PATCH_DIM)).astype(np.float32), "grid_thw": (1, 4, 4),
               "targets": np.zeros(7, np.float32)} for _ in range(2)]  # the third slot stays empty
    row = pt.pack_row(images, 64)
    inputs = [row[k][None] for k in ("patches", "segment_ids", "hw")]
    params = model.init(jax.random.key(0), *inputs)["params"]
    logits = np.asarray(model.apply({"params": params}, *inputs))[0]
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
    omni.init_from, omni.init_from_include = str(tmp_path / "tower"), ("^vision/",)
    tokenizer = get_tokenizer(omni)
    model, tx, shapes = train.make_model_and_optimizer(omni, tokenizer)
    mesh = sharding.make_mesh(omni.mesh)
    state, abstract, shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                               shapes, seed=1)
    loaded = train.init_from_previous_stage(omni, str(tmp_path), state, abstract, shardings).params
    tower_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract.params, shardings.params)
    tower, _ = checkpointing.load_params(tmp_path / "tower", tower_abstract, include=("^vision/",))
    for got, want in zip(jax.tree.leaves(loaded["vision"]), jax.tree.leaves(tower["vision"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The LLM and the connector keep this run's fresh initialisation.
    for name in ("llm", "connector"):
        for got, fresh in zip(jax.tree.leaves(loaded[name]), jax.tree.leaves(state.params[name])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(fresh))


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

"""The gen_image attribute checker: request targets, scoring, save/load, training."""
import numpy as np
import pytest

from m2omni_jax.experiments.shapes_world import image_checker as ic, world as sw

SCENE = {"objects": [
    {"shape": "star", "color": "red", "size": "small", "position": "top left"},
    {"shape": "circle", "color": "blue", "size": "large", "position": "center"},
]}


def test_request_targets_of_scene_caption_and_record():
    targets = ic.request_targets(SCENE)
    expected = np.tile([0, -1, -1], (9, 1))
    expected[0] = [ic.COLOR_SLOTS.index("red"), sw.SHAPES.index("star"), sw.SIZES.index("small")]
    expected[4] = [ic.COLOR_SLOTS.index("blue"), sw.SHAPES.index("circle"), sw.SIZES.index("large")]
    np.testing.assert_array_equal(targets, expected)
    np.testing.assert_array_equal(ic.request_targets("Draw " + sw.caption_text(SCENE) + "."), expected)
    record = sw.make_record(0, "eval", 3, tasks=("gen_image",))
    np.testing.assert_array_equal(ic.request_targets(record), ic.request_targets(record["attributes"]))
    np.testing.assert_array_equal(ic.request_targets(record), ic.request_targets(record["messages"][0]["content"]))


def test_score_predictions_arithmetic():
    targets = np.stack([ic.request_targets(SCENE)] * 2)
    predictions = targets.copy()
    predictions[1, 0, 1] = sw.SHAPES.index("square")  # image 1: the red star drawn as a square
    predictions[1, 8] = [ic.COLOR_SLOTS.index("green"), 0, 0]  # and an unrequested object
    result = ic.score_predictions(targets, predictions)
    assert result["position"] == result["color"] == result["size"] == 1.0
    assert result["shape"] == result["object"] == 3 / 4
    assert result["empty_cells"] == 13 / 14 and result["all_correct"] == 1 / 2
    assert (result["num_images"], result["num_objects"]) == (2, 4)
    nothing = ic.score_predictions(targets, np.tile([0, -1, -1], (2, 9, 1)))
    assert nothing["position"] == nothing["object"] == nothing["all_correct"] == 0.0 and nothing["empty_cells"] == 1.0


def test_save_load_round_trip(tmp_path):
    checker = ic.ImageChecker.init(ic.CheckerConfig(side=32, widths=(8, 16), hidden=32), seed=3)
    path = str(tmp_path / "checker.msgpack")
    ic.save_checker(checker, path)
    loaded = ic.load_checker(path)
    assert loaded.config == checker.config
    images = [sw.render_scene(sw.sample_scene(np.random.default_rng(i), size=(64, 64))) for i in range(3)]
    np.testing.assert_array_equal(loaded.predict(images), checker.predict(images))


def test_brief_training_tells_requested_scenes_from_others():
    """Trained a few seconds at 32x32: real renders of the requests score far above the same
    images paired with other requests, or noise."""
    checker, figures = ic.train_checker(num_train=1500, steps=300, batch_size=32, config=ic.CheckerConfig(side=32),
                                        num_eval=50, log_every=400, log=lambda line: None)
    records = ic.heldout_records(seed=2, num=50)
    images = [r["images"][0] for r in records]
    real = ic.gen_image_accuracy(checker, records, images)
    shuffled = ic.gen_image_accuracy(checker, records, images[1:] + images[:1])
    noise = ic.gen_image_accuracy(checker, records, list(np.random.default_rng(0).integers(0, 256, (50, 64, 64, 3), np.uint8)))
    assert real["position"] > 0.9 and real["color"] > 0.8 and real["object"] > 0.25
    for other in (shuffled, noise):
        assert real["object"] > other["object"] + 0.2 and real["color"] > other["color"] + 0.5
    assert figures["heldout"]["num_images"] == 50


@pytest.mark.slow
def test_default_training_reaches_98_percent_per_attribute():
    _, figures = ic.train_checker(num_eval=500, log=lambda line: None)
    heldout = figures["heldout"]
    assert min(heldout[a] for a in ("position", "color", "shape", "size", "empty_cells")) >= 0.98, heldout

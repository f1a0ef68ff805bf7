"""Shapes world: determinism, rendering vs metadata, tasks, encoding, writing, TFDS, metrics."""
import os
import re
import sys

import numpy as np
import pytest

from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import writer as wsw
from m2omni_jax.modalities import MODALITIES

SEED = 7
N_PER_TASK = 10


def records(split="train", seed=SEED, n=N_PER_TASK * len(sw.TASKS)):
    return [sw.make_record(seed, split, i) for i in range(n)]


@pytest.fixture(scope="module")
def train_records():
    return records()


def by_task(recs, task):
    return [r for r in recs if r["task"] == task]


def pixel(image, xy):
    return tuple(int(v) for v in image[int(xy[1]), int(xy[0])])


def colors_present(image):
    flat = {tuple(p) for p in image.reshape(-1, 3).tolist()}
    return {name for name, rgb in sw.COLORS.items() if tuple(rgb) in flat}


def check_scene_pixels(scene, image):
    assert image.shape == (scene["height"], scene["width"], 3) and image.dtype == np.uint8
    for obj in scene["objects"]:
        assert pixel(image, obj["center"]) == sw.COLORS[obj["color"]], obj
    # Exactly the named colours appear as exact pixels: none is hidden, none extra.
    assert colors_present(image) == {o["color"] for o in scene["objects"]}


def cell_of(scene, obj):
    col = int(obj["center"][0] // (scene["width"] / 3))
    row = int(obj["center"][1] // (scene["height"] / 3))
    return row, col


# ------------------------------------------------------------ determinism


def test_same_seed_same_bytes_and_different_seeds_differ():
    a = [sw.encode_record(r) for r in records(n=len(sw.TASKS))]
    b = [sw.encode_record(r) for r in records(n=len(sw.TASKS))]
    c = [sw.encode_record(r) for r in records(seed=SEED + 1, n=len(sw.TASKS))]
    assert a == b
    assert all(x != y for x, y in zip(a, c))


def test_sample_regenerable_alone(train_records):
    np.random.seed(123)  # global numpy state must not matter
    for i in (0, 5, len(train_records) - 1):
        alone = sw.make_record(SEED, "train", i)
        assert sw.encode_record(alone) == sw.encode_record(train_records[i])


def test_splits_are_disjoint(train_records):
    eval_records = records("eval", n=len(train_records))
    images = lambda recs: {sw.png_bytes(im) for r in recs for im in r["images"] + r["video"]}
    assert not images(train_records) & images(eval_records)
    assert all(a["id"] != b["id"] for a, b in zip(train_records, eval_records))


# ---------------------------------------------------------------- schema


def test_schema_and_placeholders(train_records):
    assert {r["task"] for r in train_records} == set(sw.TASKS)
    for r in train_records:
        assert r["modality"] in MODALITIES and r["modality"] == sw.TASK_MODALITY[r["task"]]
        text = "".join(m["content"] for m in r["messages"])
        assert text.count("<image>") == len(r["images"])
        assert text.count("<video>") == (1 if r["video"] else 0)
        assert all(m["role"] in ("user", "assistant") for m in r["messages"])
        assert r["messages"][-1]["role"] == "assistant"
        for frame in r["images"] + r["video"]:
            assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            assert 56 <= min(frame.shape[:2]) and max(frame.shape[:2]) <= 224
        if r["task"] not in ("gen_image", "interleaved", "vqa_dialog"):  # one answer each
            assert r["messages"][-1]["content"] == r["answer"]


def test_vocabulary_constants():
    assert len(sw.SHAPES) >= 4 and len(sw.COLORS) >= 6 and len(sw.POSITIONS) == 9
    rgb = np.array(list(sw.COLORS.values()), float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert gaps.min() > 90  # well separated
    backgrounds = np.array(list(sw.BACKGROUNDS.values()), float)
    assert np.linalg.norm(rgb[:, None] - backgrounds[None], axis=-1).min() > 90


# ------------------------------------------------- rendering vs metadata


def test_captions_match_scene_and_pixels(train_records):
    pattern = re.compile(r"a (small|large) (\w+) (\w+) at the ([a-z ]+?)(?:,| and |$)")
    for r in by_task(train_records, "caption"):
        scene, image = r["attributes"], r["images"][0]
        check_scene_pixels(scene, image)
        named = pattern.findall(r["answer"])
        assert named == [(o["size"], o["color"], o["shape"], o["position"]) for o in scene["objects"]]
        for obj in scene["objects"]:
            assert sw.POSITIONS[3 * cell_of(scene, obj)[0] + cell_of(scene, obj)[1]] == obj["position"]


def test_large_shapes_are_larger_than_small_ones(train_records):
    for r in train_records:
        if r["modality"] == "image" and r["task"] != "ocr":
            scene = r["attributes"]
            cell = min(scene["width"], scene["height"]) / 3
            for obj in scene["objects"]:
                expected = 0.9 if obj["size"] == "large" else 0.5
                assert obj["radius"] == pytest.approx(expected * cell / 2, abs=0.01)


def check_answer(scene, image, question, answer, kind, target):
    objects = scene["objects"]
    if kind == "color":
        obj = objects[target[0]]
        assert answer == obj["color"] and obj["shape"] in question and obj["position"] in question
        assert pixel(image, obj["center"]) == sw.COLORS[answer]
    elif kind == "color_by_shape":
        obj = objects[target[0]]
        assert question.removeprefix("<image>\n") == f"What color is the {obj['shape']}?"
        assert answer == obj["color"] and [o["shape"] for o in objects].count(obj["shape"]) == 1
        assert pixel(image, obj["center"]) == sw.COLORS[answer]
    elif kind == "shape":
        obj = objects[target[0]]
        assert answer == obj["shape"]
        assert f"the {obj['color']} object" in question or obj["position"] in question
    elif kind == "count":
        counted = re.search(r"How many (\w+?)s are", question).group(1)
        assert int(answer) == sum(counted in ("shape", o["shape"]) for o in objects)
    elif kind == "position":
        obj = objects[target[0]]
        assert answer == obj["position"] and f"{obj['color']} {obj['shape']}" in question
    elif kind == "locate":
        position = re.fullmatch(r"What is at the ([a-z ]+)\?", question.removeprefix("<image>\n")).group(1)
        here = [o for o in objects if o["position"] == position]
        assert answer == ("nothing" if not here else f"a {sw.object_phrase(here[0])}")
        assert target == [objects.index(o) for o in here]
    elif kind == "relation":
        a, b = (objects[i] for i in target)
        (ra, ca), (rb, cb) = cell_of(scene, a), cell_of(scene, b)
        (xa, ya), (xb, yb) = a["center"], b["center"]
        expected = {"left": xa < xb and ca < cb, "right": xa > xb and ca > cb,
                    "above": ya < yb and ra < rb and ca == cb,
                    "below": ya > yb and ra > rb and ca == cb}
        assert expected[answer], (question, answer)
    else:
        raise AssertionError(kind)


def test_vqa_answers_follow_metadata(train_records):
    for r in train_records:
        if not r["task"].startswith("vqa_") or r["task"] == "vqa_dialog":
            continue
        scene = r["attributes"]
        check_scene_pixels(scene, r["images"][0])
        check_answer(scene, r["images"][0], r["messages"][0]["content"], r["answer"],
                     scene["question_type"], scene.get("target"))


def test_vqa_dialog_asks_several_questions_about_one_image(train_records):
    dialogs = by_task(train_records, "vqa_dialog")
    assert dialogs
    for r in dialogs:
        scene, questions = r["attributes"], r["attributes"]["questions"]
        check_scene_pixels(scene, r["images"][0])
        assert 2 <= len(questions) <= 4 and len(r["messages"]) == 2 * len(questions)
        assert r["messages"][0]["content"].startswith("<image>\n") and len(r["images"]) == 1
        for k, q in enumerate(questions):
            assert r["messages"][2 * k]["content"].removeprefix("<image>\n") == q["question"]
            assert r["messages"][2 * k + 1]["content"] == q["answer"]
            check_answer(scene, r["images"][0], q["question"], q["answer"], q["question_type"], q.get("target"))
        assert r["answer"] == "\n".join(q["answer"] for q in questions)


def test_vqa_locate_names_the_object_at_a_position_or_nothing():
    records = [sw.make_record(SEED, "train", i, ("vqa_locate",)) for i in range(60)]
    answers = [r["answer"] for r in records]
    assert 3 <= answers.count("nothing") <= 25  # empty cells are asked about too
    for r in records:
        scene = r["attributes"]
        check_scene_pixels(scene, r["images"][0])
        check_answer(scene, r["images"][0], r["messages"][0]["content"], r["answer"], "locate", scene["target"])


def test_vqa_color_by_shape_asks_by_a_shape_the_scene_holds_once():
    records = [sw.make_record(SEED, "train", i, ("vqa_color_by_shape",)) for i in range(60)]
    kinds = [r["attributes"]["question_type"] for r in records]
    assert kinds.count("color_by_shape") >= 50  # "color" (with the position) only when every shape repeats
    for r in records:
        scene = r["attributes"]
        check_scene_pixels(scene, r["images"][0])
        check_answer(scene, r["images"][0], r["messages"][0]["content"], r["answer"],
                     scene["question_type"], scene["target"])


def test_held_out_split_has_no_train_only_tasks():
    tasks = ("caption", "vqa_color", "vqa_dialog")
    assert sw.split_tasks(tasks, "eval") == ("caption", "vqa_color")
    held_out = [sw.make_record(SEED, "eval", i, tasks) for i in range(6)]
    assert [r["task"] for r in held_out] == ["caption", "vqa_color"] * 3
    without = [sw.make_record(SEED, "eval", i, tasks[:2]) for i in range(6)]
    assert [sw.encode_record(r) for r in held_out] == [sw.encode_record(r) for r in without]
    with pytest.raises(ValueError, match="eval split holds none"):
        sw.make_record(SEED, "eval", 0, ("vqa_dialog",))


def test_video_motion_matches_pixels(train_records):
    videos = by_task(train_records, "video_motion")
    assert videos
    for r in videos:
        attrs, frames = r["attributes"], r["video"]
        assert 4 <= len(frames) == attrs["num_frames"] <= 8 and r["images"] == []
        assert r["answer"] == sw.motion_text(attrs["objects"])
        for obj in attrs["objects"]:
            mask0, mask1 = (np.all(f == sw.COLORS[obj["color"]], axis=-1) for f in (frames[0], frames[-1]))
            (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in (mask0, mask1))
            dx, dy = x1 - x0, y1 - y0
            moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[obj["direction"]]
            assert moved > 0.25 * attrs["width"] and abs(dx if obj["direction"] in ("up", "down") else dy) < 1


def test_ocr_gen_and_interleaved(train_records):
    for r in by_task(train_records, "ocr"):
        assert r["answer"] == r["attributes"]["text"] and r["answer"]
        assert sw.COLORS[r["attributes"]["color"]] in {tuple(p) for p in r["images"][0].reshape(-1, 3).tolist()}
    for r in by_task(train_records, "gen_image"):
        assert r["messages"][-1] == {"role": "assistant", "content": "<image>"} and r["answer"] == ""
        assert sw.caption_text(r["attributes"]) in r["messages"][0]["content"]
        check_scene_pixels(r["attributes"], r["images"][0])
    for r in by_task(train_records, "interleaved"):
        scenes = r["attributes"]["scenes"]
        assert 2 <= len(scenes) == len(r["images"]) <= 3
        replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        for scene, image, reply in zip(scenes, r["images"], replies):
            assert sw.caption_text(scene) in reply
            check_scene_pixels(scene, image)


# --------------------------------------------------------------- encoding


def assert_same_record(a, b):
    assert {k: v for k, v in a.items() if k not in ("images", "video")} == \
        {k: v for k, v in b.items() if k not in ("images", "video")}
    for key in ("images", "video"):
        assert len(a[key]) == len(b[key])
        for x, y in zip(a[key], b[key]):
            np.testing.assert_array_equal(x, y)


def test_encode_decode_round_trip(train_records):
    for r in train_records[: 2 * len(sw.TASKS)]:
        data = sw.encode_record(r)
        back = sw.decode_record(data)
        assert_same_record(back, r)
        assert sw.encode_record(back) == data
        lazy = sw.decode_record(data, decode_media=False)
        assert all(isinstance(b, bytes) for b in lazy["images"] + lazy["video"])


# ---------------------------------------------------------------- writing


def test_write_read_and_idempotent(tmp_path):
    out = str(tmp_path / "sw")
    manifest = wsw.write_shapes_world(out, seed=SEED, num_train=10, num_eval=4, progress=False)
    assert manifest["num_examples"] == {"train": 10, "eval": 4}
    train, evals = wsw.open_split(out, "train"), wsw.open_split(out, "eval")
    assert (len(train), len(evals)) == (10, 4)
    for i in (0, 9):
        assert train[i] == sw.encode_record(sw.make_record(SEED, "train", i))
    assert_same_record(sw.decode_record(evals[3]), sw.make_record(SEED, "eval", 3))

    path = wsw.split_path(out, "train")
    mtime = os.stat(path).st_mtime_ns
    wsw.write_shapes_world(out, seed=SEED, num_train=10, num_eval=4, progress=False)
    assert os.stat(path).st_mtime_ns == mtime  # skipped
    wsw.write_shapes_world(out, seed=SEED + 1, num_train=10, num_eval=4, progress=False)
    assert wsw.open_split(out, "train")[0] == sw.encode_record(sw.make_record(SEED + 1, "train", 0))
    with pytest.raises(ValueError):
        wsw.write_shapes_world(out, seed=0, num_train=1, num_eval=1, tasks=("nope",))


def test_parallel_write_is_byte_identical_to_one_process(tmp_path):
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    n = 2 * wsw._MIN_RECORDS_PER_WORKER  # just enough for the worker pool
    wsw.write_shapes_world(serial, seed=SEED, num_train=n, num_eval=4, progress=False, num_workers=1)
    wsw.write_shapes_world(parallel, seed=SEED, num_train=n, num_eval=4, progress=False, num_workers=2)
    for split in ("train", "eval"):
        with open(wsw.split_path(serial, split), "rb") as a, open(wsw.split_path(parallel, split), "rb") as b:
            assert a.read() == b.read()


def test_task_subset(tmp_path):
    wsw.write_shapes_world(str(tmp_path), seed=0, num_train=4, num_eval=2, tasks=("ocr", "caption"),
                           progress=False)
    tasks = [sw.decode_record(b, decode_media=False)["task"] for b in wsw.open_split(str(tmp_path), "train")]
    assert tasks == ["ocr", "caption", "ocr", "caption"]


# ------------------------------------------------------------------- TFDS


def test_tfds_builder_and_data_source(tmp_path):
    import tensorflow_datasets as tfds

    from m2omni_jax.experiments.shapes_world import tfds_builder as swt

    config = swt.make_config(seed=SEED, num_train=len(sw.TASKS) + 1, num_eval=3)
    data_dir = str(tmp_path / "tfds")
    swt.prepare(data_dir, config=config)
    sources = tfds.data_source(f"shapes_world/{config.name}", data_dir=data_dir, download=False)
    assert (len(sources["train"]), len(sources["eval"])) == (config.num_train, 3)
    for split, source in sources.items():
        for i in range(len(source)):
            example = source[i]
            expected = sw.make_record(SEED, split, i)
            assert example["index"] == i and example["task"].decode() == expected["task"]
            assert example["record"] == sw.encode_record(expected)
            assert_same_record(sw.decode_record(example["record"]), expected)
    builder = tfds.builder(f"shapes_world/{config.name}", data_dir=data_dir)
    assert builder.as_data_source(split="eval")[2]["record"] == sw.encode_record(
        sw.make_record(SEED, "eval", 2))
    assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------- metrics


def test_vqa_accuracy():
    recs = [{"task": "vqa_color", "answer": "red"}, {"task": "vqa_color", "answer": "blue"},
            {"task": "vqa_count", "answer": "2"}, {"task": "vqa_position", "answer": "top left"}]
    preds = ["Red.", "green", "two", "the  Top left!"]
    assert sw.vqa_accuracy(preds, recs) == {"vqa_color": 0.5, "vqa_count": 1.0,
                                            "vqa_position": 1.0, "overall": 0.75}
    with pytest.raises(ValueError):
        sw.vqa_accuracy(preds[:1], recs)


def test_caption_attribute_accuracy():
    attrs = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"},
                         {"color": "green", "shape": "star"}]}
    assert sw.caption_attribute_accuracy(
        "a large red circle at the top left, a small blue square and a green star", attrs) == 1.0
    assert sw.caption_attribute_accuracy("a red square and a blue circle", attrs) == 0.0
    assert sw.caption_attribute_accuracy("two red circles and a blue triangle", attrs) == pytest.approx(1 / 3)
    assert sw.caption_attribute_accuracy("", attrs) == 0.0


def test_video_motion_accuracy():
    recs = [{"attributes": {"objects": [{"color": "red", "shape": "circle", "direction": "left"},
                                        {"color": "blue", "shape": "star", "direction": "up"}]}},
            {"attributes": {"objects": [{"color": "green", "shape": "square", "direction": "down"}]}}]
    perfect = ["the red circle moves left and the blue star moves up", "the green square moves downward"]
    assert sw.video_motion_accuracy(perfect, recs) == 1.0
    partial = ["the blue star moves down, the red circle moves left", "a green circle moves down"]
    assert sw.video_motion_accuracy(partial, recs) == pytest.approx(1 / 3)
    assert sw.video_motion_accuracy(["the red circle at the top left moves right", ""], recs) == 0.0


def test_configs_with_different_tasks_get_their_own_files(tmp_path):
    """Two runs with different shapes-world settings must not rewrite each other's files."""
    import ml_collections
    from m2omni_jax.experiments.shapes_world import source

    config = ml_collections.ConfigDict({"data": {"dir": str(tmp_path), "seed": 0}})

    def world(tasks, num_train=4):
        return ml_collections.ConfigDict({"dir": "", "num_train": num_train, "num_eval": 2, "tasks": tasks})

    a, b = world(("caption", "ocr")), world(("ocr",))
    assert source.shapes_world_dir(config, a) != source.shapes_world_dir(config, b)
    assert source.shapes_world_dir(config, a) != source.shapes_world_dir(config, world(("caption", "ocr"), 5))
    assert source.shapes_world_dir(config, a) == source.shapes_world_dir(config, world(("caption", "ocr")))
    dir_a, _ = source.write_builtin_shapes_world(config, a)
    first = wsw.open_split(dir_a, "train")[0]
    source.write_builtin_shapes_world(config, b)
    assert wsw.open_split(dir_a, "train")[0] == first
    assert not [f for f in os.listdir(dir_a) if ".tmp" in f]

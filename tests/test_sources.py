"""Data sources (data/sources/): TFDS by field mapping, LLaVA-style JSONL with files, ArrayRecord
of records; and a few training steps from each of the first two.

TFDS, two ways: `tfds.testing.mock_data` on the real registered builders (`coco_captions`,
`librispeech`: random examples of their real features, no download; building their
`Image` / `Audio` features needs TensorFlow, which the test extra installs), and a tiny
TFDS data set really prepared on disk as ArrayRecord and read back by `tfds.data_source`
without TensorFlow (the path a user's prepared data takes; DESIGN §5).
"""
import json
import os
import sys
import wave

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from PIL import Image

from m2omni_jax.data import media, sources
from m2omni_jax.data import records as records_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """coco_captions' layout: image (H, W, 3) uint8, captions/text."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "captions": tfds.features.Sequence({"text": tfds.features.Tensor(shape=(), dtype=np.object_)})}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24), "validation": self._generate_examples(4, offset=100)}

    def _generate_examples(self, num, offset=0):
        for i in range(offset, offset + num):
            colour = ("red", "green", "blue")[i % 3]
            image = np.zeros((56 + 28 * (i % 2), 56, 3), np.uint8)
            image[..., i % 3] = 200
            yield i, {"image": image, "captions": {"text": [f"a {colour} picture", "something"]}}


class TinySpeech(tfds.core.GeneratorBasedBuilder):
    """librispeech's layout: speech int16 (N,), text."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "speech": tfds.features.Tensor(shape=(None,), dtype=np.int16),
            "text": tfds.features.Tensor(shape=(), dtype=np.object_)}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3)}

    def _generate_examples(self, num):
        for i in range(num):
            t = np.arange(8000 * (i + 1)) / 16000
            yield i, {"speech": (8000 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.int16), "text": f"tone {i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    TinyCaptions(data_dir=root).download_and_prepare()
    TinySpeech(data_dir=root).download_and_prepare()
    return root


def _config(root, **sources_cfg):
    sys.path.insert(0, REPO)
    from configs import base
    config = base.get_config()
    config.data.dir = str(root)
    config.data.sources.update(sources_cfg)
    return config


def coco_source(tfds_dir):
    return dict(kind="tfds", name="tiny_captions", data_dir=tfds_dir, modality="image", train_split="train",
                eval_split="validation", fields=dict(image="image", answer="captions/text"),
                prompt="Describe the image.")


def test_tfds_image_caption_records(tfds_dir, tmp_path):
    config = _config(tmp_path, coco=coco_source(tfds_dir))
    parts = sources.parts(config, "train")
    assert parts["coco"].modality == "image" and parts["text"].modality == "text"
    record = parts["coco"].records()[1]
    assert record["messages"] == [{"role": "user", "content": "<image>\nDescribe the image."},
                                  {"role": "assistant", "content": "a green picture"}]
    assert record["images"][0].shape == (84, 56, 3) and record["images"][0].dtype == np.uint8
    (item,) = media.record_media(record, media.VisionOptions())
    assert item.kind == "image" and item.grid_thw == (1, 6, 4)
    held_out = sources.eval_records(config, 10)
    assert [r["answer"] for r in held_out] == ["a green picture", "a blue picture", "a red picture", "a green picture"]


def test_tfds_audio_transcript_records(tfds_dir, tmp_path):
    libri = dict(kind="tfds", name="tiny_speech", data_dir=tfds_dir, modality="audio", train_split="train",
                 fields=dict(audio="speech", answer="text"), prompt="Transcribe the audio.", sample_rate=16000)
    config = _config(tmp_path, libri=libri)
    record = sources.parts(config, "train")["libri"].records()[2]
    assert record["messages"][0]["content"] == "<audio>\nTranscribe the audio." and record["answer"] == "tone 2"
    waveform, rate = records_lib.load_audio(record["audio"][0], record["sample_rate"])
    assert rate == 16000 and waveform.shape == (24000,) and waveform.dtype == np.float32
    assert 0.2 < np.abs(waveform).max() <= 0.25
    opts = media.AudioOptions(num_audio_tokens=8, max_frames=64, clips_per_row=1)
    (clip,) = media.record_media(record, media.VisionOptions(), audio_opts=opts)
    assert clip.features.shape[1] == 560 and 0 < len(clip.features) <= 64


COCO = dict(kind="tfds", name="coco_captions/2014", modality="image", train_split="train",
            eval_split="val", fields=dict(image="image", answer="captions/text"), prompt="Describe the image.")
LIBRISPEECH = dict(kind="tfds", name="librispeech", modality="audio", train_split="train_clean100",
                   eval_split="dev_clean", fields=dict(audio="speech", answer="text"),
                   prompt="Transcribe the audio.", sample_rate=16000)


def mock_tfds(num_examples: int):
    """The real builders' features, random examples, nothing downloaded."""
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def test_mocked_coco_captions_become_image_caption_records(tmp_path):
    config = _config(tmp_path, coco=COCO)
    with mock_tfds(5):
        records = sources.parts(config, "train")["coco"].records()
        assert len(records) == 5
        record = records[3]
        held_out = sources.eval_records(config, 10)
    image = record["images"][0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert record["messages"][0] == {"role": "user", "content": "<image>\nDescribe the image."}
    assert isinstance(record["answer"], str) and record["messages"][1]["content"] == record["answer"]
    (item,) = media.record_media(record, media.VisionOptions())
    assert item.kind == "image" and len(item.patches) == int(np.prod(item.grid_thw))
    assert len(held_out) == 5 and all("<image>" in r["messages"][0]["content"] for r in held_out)


def test_mocked_librispeech_becomes_asr_records(tmp_path):
    config = _config(tmp_path, libri=LIBRISPEECH)
    with mock_tfds(3):
        record = sources.parts(config, "train")["libri"].records()[1]
    assert record["messages"][0]["content"] == "<audio>\nTranscribe the audio." and isinstance(record["answer"], str)
    waveform, rate = records_lib.load_audio(record["audio"][0], record["sample_rate"])
    assert rate == 16000 and waveform.ndim == 1 and waveform.dtype == np.float32


def test_tfds_field_mapping_errors_name_the_field(tfds_dir, tmp_path):
    bad = dict(coco_source(tfds_dir), fields=dict(image="image", caption="captions/text"))
    with pytest.raises(ValueError, match=r"config.data.sources.coco.fields=.*known fields"):
        sources.parts(_config(tmp_path, coco=bad))
    with pytest.raises(ValueError, match="config.data.sources.coco.kind='tfds_v2'"):
        sources.parts(_config(tmp_path, coco=dict(coco_source(tfds_dir), kind="tfds_v2")))


def write_llava_set(root, num=24):
    """A LLaVA-style JSONL + PNG files (and one WAV clip), as a user's data set would be."""
    os.makedirs(root / "images", exist_ok=True)
    lines = []
    for i in range(num):
        colour = ("red", "green", "blue")[i % 3]
        pixels = np.zeros((56, 56, 3), np.uint8)
        pixels[..., i % 3] = 220
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        question = "What colour is the picture?" if i % 2 else "<image>\nWhat colour is the picture?"
        lines.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": f"Yes, {colour}."}]})
    with wave.open(str(root / "clip.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((3000 * np.sin(np.arange(4000) / 5)).astype("<i2").tobytes())
    lines.append({"id": "spoken", "audio": str(root / "clip.wav"),
                  "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A tone."}]})
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
        f.write("{not json\n")  # a bad line: skipped and counted
    return dict(kind="jsonl", modality="image", train_file=str(root / "train.jsonl"), image_root=str(root))


def test_jsonl_conversations_with_files(tmp_path):
    config = _config(tmp_path, llava=write_llava_set(tmp_path))
    records = sources.parts(config, "train")["llava"].records()
    first, second = records[0], records[1]
    assert first["messages"][0] == {"role": "user", "content": "<image>\nWhat colour is the picture?"}
    assert second["messages"][0]["content"] == "<image>\nWhat colour is the picture?"  # placeholder added
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert first["images"] == [str(tmp_path / "images" / "0.png")]
    (item,) = media.record_media(second, media.VisionOptions())
    assert item.grid_thw == (1, 4, 4)
    spoken = records[24]
    assert spoken["messages"][0]["content"] == "<audio>\nWhat is it?"
    waveform, rate = records_lib.load_audio(spoken["audio"][0])
    assert rate == 8000 and waveform.shape == (4000,)
    assert records_lib.is_bad(records[25])
    assert "images" not in sources.parts(config, "eval")  # no eval_file: no held-out part


def test_array_record_of_records(tmp_path):
    pixels = np.full((56, 84, 3), 90, np.uint8)
    good = {"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "grey"}],
            "images": [pixels], "modality": "image", "task": "mine", "id": "a"}
    spoken = {"messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "hum"}],
              "audio": [np.linspace(-0.5, 0.5, 1600, dtype=np.float32)], "sample_rate": 16000, "modality": "audio"}
    path = str(tmp_path / "mine-train.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for raw in (records_lib.encode_record(good), b"\x00 garbage", records_lib.encode_record(spoken)):
        writer.write(raw)
    writer.close()
    config = _config(tmp_path, mine=dict(kind="array_record", modality="image", train_files=str(tmp_path / "mine-*")))
    records = sources.parts(config, "train")["mine"].records()
    assert len(records) == 3 and records_lib.is_bad(records[1])
    np.testing.assert_array_equal(records[0]["images"][0], pixels)
    assert records[0]["task"] == "mine" and records[0]["messages"] == good["messages"]
    np.testing.assert_allclose(records[2]["audio"][0], spoken["audio"][0], atol=1 / 32768)
    missing = _config(tmp_path, mine=dict(kind="array_record", modality="image", train_files="/nowhere/*"))
    with pytest.raises(FileNotFoundError, match="config.data.sources.mine.train_files='/nowhere/\\*'"):
        sources.parts(missing)["mine"].records()


# ----------------------------------------------------------------------------- a few training steps


def train_config(root, **sources_cfg):
    """configs/tiny.py, audio tower off, a tiny model; only the given sources are trained on."""
    sys.path.insert(0, REPO)
    from configs import tiny
    config = tiny.get_config()
    del config.data.sources["shapes_world"]
    config.data.sources.update(sources_cfg)
    config.data.dir = str(root / "data")
    config.data.sources.text.update(dict(num_docs=200, tokenizer_docs=200))  # the tokenizer's text only
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=512))
    config.model.audio.enabled = False
    config.model.llm.update(dict(vocab_size=512, width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                 mlp_dim=64, mrope_sections=(2, 3, 3)))
    config.model.vision.update(dict(width=16, depth=1, num_heads=2, out_width=16))
    config.data.update(dict(seq_len=64))
    config.data.vision.patches_per_row = 64
    config.data.mixture = "custom"
    config.data.modality_weights = ml_collections.ConfigDict(dict(image=1.0))
    config.train.update(dict(steps=3, batch_size=8, log_every=1))
    config.opt.warmup_steps = 1
    config.checkpoint.update(dict(every=1000, async_save=False))
    config.eval.every = 0
    return config


def _train(config, workdir):
    from m2omni_jax import train
    metrics = train.train_and_evaluate(config, str(workdir))
    assert np.isfinite(metrics["loss"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]
    assert all("loss/image" in m for m in steps if "loss" in m)


def test_trains_three_steps_on_a_mocked_tfds_image_caption_corpus(tmp_path):
    with mock_tfds(40):
        _train(train_config(tmp_path, coco=COCO), tmp_path / "work")


def test_trains_three_steps_on_a_prepared_tfds_image_caption_corpus(tfds_dir, tmp_path):
    _train(train_config(tmp_path, coco=coco_source(tfds_dir)), tmp_path / "work")


def test_trains_three_steps_on_jsonl_conversations_with_image_files(tmp_path):
    _train(train_config(tmp_path, llava=write_llava_set(tmp_path)), tmp_path / "work")

import os
import threading

import numpy as np
import pytest

from m2omni_jax.data import audio
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import speech

pytest.importorskip("espeakng_loader")

TEXT = "How many stars are there at the top left?"


def test_tts_is_deterministic_and_not_silent():
    voice = speech.Voice("en-gb-x-rp", "Storm", rate=160, pitch=40)
    first = speech.synthesize(TEXT, voice)
    speech.synthesize("something else in between", speech.Voice("en-029", "shelby", 190, 65))
    second = speech.synthesize(TEXT, voice)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and 1.0 < len(first) / speech.SAMPLE_RATE < 5.0
    assert np.sqrt(np.mean(first ** 2)) > 0.02
    np.testing.assert_array_equal(np.rint(first * 32768), first * 32768)  # on the int16 grid


def test_voices_differ():
    a = speech.synthesize(TEXT, speech.Voice("en-us", "shelby", 150, 60))
    b = speech.synthesize(TEXT, speech.Voice("en-us", "Hugo", 190, 35))
    assert len(a) != len(b) or not np.array_equal(a, b)


def test_tts_is_safe_from_threads():
    voices = [speech.Voice(language, "Denis", 150 + 10 * i, 50) for i, language in enumerate(speech.LANGUAGES)]
    expected = [speech.synthesize(TEXT, v) for v in voices]
    results = [None] * len(voices)

    def run(i):
        results[i] = speech.synthesize(TEXT, voices[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(voices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_records_follow_the_schema_and_are_deterministic():
    records = [speech.make_record(0, "train", i) for i in range(len(speech.TASKS))]
    assert [r["task"] for r in records] == list(speech.TASKS)
    for record in records:
        assert record["modality"] == "audio" and record["sample_rate"] == speech.SAMPLE_RATE
        text = "".join(m["content"] for m in record["messages"] if m["role"] == "user")
        assert text.count(speech.AUDIO_TOKEN) == len(record["audio"]) == 1
        assert text.count("<image>") == len(record["images"])
        assert record["messages"][-1]["content"] == record["answer"] != ""
        assert len(record["audio"][0]) > speech.SAMPLE_RATE // 2
    asr, spoken_vqa, scene_qa, caption_qa = records
    assert asr["answer"] == sw.caption_text(asr["attributes"])
    assert len(spoken_vqa["images"]) == 1 and not scene_qa["images"] and not caption_qa["images"]
    assert sw.caption_text(scene_qa["attributes"]) in scene_qa["messages"][0]["content"]
    assert caption_qa["attributes"]["voices"][0]["text"] == sw.caption_text(caption_qa["attributes"])
    again = speech.make_record(0, "train", 1)
    np.testing.assert_array_equal(again["audio"][0], spoken_vqa["audio"][0])
    assert again["messages"] == spoken_vqa["messages"]
    assert speech.make_record(0, "eval", 1)["messages"] != spoken_vqa["messages"]


def test_record_encoding_round_trips():
    record = speech.make_record(3, "eval", 1)
    decoded = speech.decode_record(speech.encode_record(record))
    np.testing.assert_array_equal(decoded["audio"][0], record["audio"][0])
    np.testing.assert_array_equal(decoded["images"][0], record["images"][0])
    assert decoded["messages"] == record["messages"] and decoded["answer"] == record["answer"]
    raw = speech.decode_record(speech.encode_record(record), decode_media=False)
    assert raw["audio"][0] == speech.encode_audio(record["audio"][0])


def test_audio_bytes_are_int16_pcm():
    waveform = np.array([0.0, 0.5, -0.5, 1.5, -2.0, 3 / 32768], np.float32)
    data = speech.encode_audio(waveform)
    assert len(data) == 2 * len(waveform)
    np.testing.assert_array_equal(speech.decode_audio(data), [0.0, 0.5, -0.5, 32767 / 32768, -1.0, 3 / 32768])


def test_write_speech_split(tmp_path):
    path = speech.write_speech_split(str(tmp_path), "eval", seed=5, num=3, progress=False)
    source = speech.open_speech_split(str(tmp_path), "eval")
    assert path.endswith(".array_record") and len(source) == 3
    for i in range(3):
        stored = speech.decode_record(source[i])
        expected = speech.make_record(5, "eval", i)
        assert stored["id"] == expected["id"] and stored["answer"] == expected["answer"]
        np.testing.assert_array_equal(stored["audio"][0], expected["audio"][0])


def test_word_error_rate():
    assert speech.word_error_rate(["a red circle"], ["A red circle."]) == 0.0
    # 1 substitution over 6 reference words
    assert speech.word_error_rate(["the cat sat", "a red circle"], ["the cat sat", "a blue circle"]) == 1 / 6
    assert speech.word_error_rate(["one two three four"], ["one three four"]) == 0.25  # deletion
    assert speech.word_error_rate(["one two"], ["one two two two"]) == 1.0  # two insertions
    assert speech.word_error_rate(["hello world"], [""]) == 1.0
    with pytest.raises(ValueError):
        speech.word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        speech.word_error_rate([" ... "], ["a"])


def test_speech_world_is_written_once(tmp_path):
    manifest = speech.write_speech_world(str(tmp_path), seed=2, num_train=4, num_eval=2, progress=False)
    assert manifest["num_examples"] == {"train": 4, "eval": 2} and manifest["tasks"] == list(speech.TASKS)
    path = speech.speech_split_path(str(tmp_path), "train")
    written = os.stat(path).st_mtime_ns
    assert speech.write_speech_world(str(tmp_path), seed=2, num_train=4, num_eval=2, progress=False) == manifest
    assert os.stat(path).st_mtime_ns == written  # cached
    speech.write_speech_world(str(tmp_path), seed=2, num_train=5, num_eval=2, progress=False)
    assert len(speech.open_speech_split(str(tmp_path), "train")) == 5  # another config: rewritten
    with pytest.raises(ValueError, match="speech.tasks"):
        speech.write_speech_world(str(tmp_path), seed=2, num_train=4, num_eval=2, tasks=("tts",))


def test_cmvn_of_the_training_speech(tmp_path):
    speech.write_speech_world(str(tmp_path), seed=0, num_train=3, num_eval=1, progress=False)
    stats = speech.compute_cmvn(str(tmp_path), num_records=2)
    clips = [audio.audio_features(speech.make_record(0, "train", i)["audio"][0]) for i in range(2)]
    expected = audio.compute_cmvn_stats(clips)
    assert stats["count"] == sum(len(c) for c in clips) == expected["count"]
    np.testing.assert_allclose(stats["mean"], expected["mean"], rtol=1e-6)
    normalised = np.concatenate([audio.apply_cmvn(c, stats) for c in clips])
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-3)

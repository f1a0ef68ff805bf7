"""Omni sequence assembly (placeholders, M-RoPE ids, loss mask) and the packed grain pipeline."""
import dataclasses
import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from m2omni_jax.data import audio as audio_frontend
from m2omni_jax.data import chat as chat_lib
from m2omni_jax.data import media, sources
from m2omni_jax.data import omni_pipeline as op
from m2omni_jax.data import records as records_lib
from m2omni_jax.experiments.shapes_world import source as shapes_world_source
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import speech
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.modalities import modality_id
from m2omni_jax.models import omni
from m2omni_jax.config_fields import replace
from m2omni_jax.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, BATCH, PATCHES = 128, 4, 128


def small_config(root):
    sys.path.insert(0, REPO)
    from configs import base
    config = base.get_config()
    config.model.kind = "omni"
    config.data.update(dict(dir=str(root / "data"), seq_len=SEQ_LEN))
    config.data.sources.text.update(dict(num_docs=300, tokenizer_docs=300))
    config.data.sources.shapes_world = shapes_world_source.default_config()
    config.data.sources.shapes_world.update(dict(num_train=280, num_eval=70))
    config.data.vision.patches_per_row = PATCHES
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=512))
    config.train.batch_size = BATCH
    return config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return small_config(tmp_path_factory.mktemp("omni_pipeline"))


@pytest.fixture(scope="module")
def tok(config):
    return get_tokenizer(config)


@pytest.fixture(scope="module")
def batches(config, tok):
    it = op.make_train_iterator(config, tok, process_index=0, process_count=1)
    return [next(it) for _ in range(5)], it.stats


def test_mrope_positions_hand_worked():
    IMG, P, END = 4, 6, 5
    # text, text, <image>, 1x2x3 merged grid, </image>, text, text
    ids = [100, 101, IMG] + [P] * 6 + [END, 102, 103]
    positions = chat_lib.mrope_positions(ids, [(1, 2, 3)], patch_ids=(P,))
    # The block starts at running index 3: t = 3; h = 3 + row; w = 3 + col; max 5 -> </image> at 6.
    np.testing.assert_array_equal(positions, [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8],
    ])


def test_mrope_positions_video_advances_time():
    V = 9
    positions = chat_lib.mrope_positions([1, V, V, V, V, 2], [(2, 1, 2)], patch_ids=(V,))
    np.testing.assert_array_equal(positions, [[0, 1, 1, 2, 2, 3], [0, 1, 1, 1, 1, 3], [0, 1, 2, 1, 2, 3]])


def test_chat_assembly_expands_placeholders_and_masks_the_prompt(tok):
    image = sw.render_scene(sw.sample_scene(np.random.default_rng(0), size=(112, 56)))
    items = [media.preprocess_media("image", image, media.VisionOptions())]
    assert items[0].grid_thw == (1, 4, 8) and items[0].num_tokens == 8  # 56 rows x 112 cols
    messages = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}]
    chat = chat_lib.assemble_chat(tok, messages, items)
    ids, mask, positions = chat["ids"], chat["mask"], chat["positions"]
    start = int(np.flatnonzero(ids == tok.special_id("<image>"))[0])
    assert list(ids[start + 1:start + 9]) == [tok.special_id("<imagePatch>")] * 8
    assert ids[start + 9] == tok.special_id("</image>")
    np.testing.assert_array_equal(positions[:, :start + 1], np.tile(np.arange(start + 1), (3, 1)))
    first = start + 1
    np.testing.assert_array_equal(positions[0, first:first + 8], [first] * 8)
    np.testing.assert_array_equal(positions[1, first:first + 8], first + np.repeat([0, 1], 4))
    np.testing.assert_array_equal(positions[2, first:first + 8], first + np.tile([0, 1, 2, 3], 2))
    after = first + 8  # </image>: the block's max (first + 3) + 1
    np.testing.assert_array_equal(positions[:, after:], np.tile(np.arange(first + 4, first + 4 + len(ids) - after), (3, 1)))
    assert tok.decode(ids[mask == 1]) == "red<|eot_id|>"
    assert chat["patches"].shape == (32, media.PATCH_DIM) and chat["hw"].shape == (2, 32)
    np.testing.assert_array_equal(chat["frames"], np.ones(32))


def test_vqa_dialog_trains_every_answer(tok):
    record = sw.make_record(0, "train", 0, ("vqa_dialog",))
    items = [media.preprocess_media("image", record["images"][0], media.VisionOptions())]
    chat = chat_lib.assemble_chat(tok, record["messages"], items)
    answers = [m["content"] for m in record["messages"][1::2]]
    assert tok.decode(chat["ids"][chat["mask"] == 1]) == "".join(a + "<|eot_id|>" for a in answers)
    assert int((chat["ids"] == tok.special_id("<image>")).sum()) == 1


def test_centered_pixels_have_zero_median_colour():
    image = sw.render_scene(sw.sample_scene(np.random.default_rng(1), size=(84, 84)))
    plain = media.preprocess_media("image", image, media.VisionOptions())
    centered = media.preprocess_media("image", image, media.VisionOptions(pixel_norm="clip_centered"))
    by_channel = np.moveaxis(centered.patches.reshape(len(centered.patches), 3, -1), 1, 0).reshape(3, -1)
    np.testing.assert_allclose(np.median(by_channel, axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(np.diff(centered.patches - plain.patches, axis=0), 0, atol=1e-5)  # a shift only
    with pytest.raises(ValueError, match="pixel_norm='none'"):
        media.VisionOptions(pixel_norm="none")


def test_image_side_gives_every_image_the_same_token_grid():
    opts = media.VisionOptions(image_side=84)
    for size in ((56, 56), (224, 112), (96, 160)):
        item = media.preprocess_media("image", sw.render_scene(sw.sample_scene(np.random.default_rng(0), size=size)), opts)
        assert item.grid_thw == (1, 6, 6) and item.num_tokens == 9
    with pytest.raises(ValueError, match="data.vision.image_side=70"):
        media.VisionOptions(image_side=70)


def test_video_assembly_numbers_frames(tok):
    record = sw.make_record(0, "train", 0, ("video_motion",))
    items = media.record_media(record, media.VisionOptions())
    chat = chat_lib.assemble_chat(tok, record["messages"], items)
    t, h, w = items[0].grid_thw
    assert (h, w) == (4, 4) and t >= 2  # 56x56 frames, 2 frames per temporal patch
    np.testing.assert_array_equal(chat["frames"], np.repeat(np.arange(1, t + 1), 16))
    assert (ids := chat["ids"]).tolist().count(tok.special_id("<videoPatch>")) == t * 4
    assert tok.decode(ids[chat["mask"] == 1]) == record["answer"] + "<|eot_id|>"


def test_vision_segment_ids_one_per_sample_frame():
    samples = np.array([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0])
    frames = np.array([1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(op.vision_segment_ids(samples, frames), [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0])


def test_batch_format(config, batches):
    expected = op.example_batch_shapes(config)
    for batch in batches[0]:  # every batch has the same shapes: one compiled step
        assert set(batch) == set(op.BATCH_KEYS) == set(expected)
        for key, value in batch.items():
            assert (value.shape, value.dtype) == expected[key], key


def test_rows_pair_placeholders_with_patch_groups(batches, tok):
    media_ids = list(chat_lib.media_token_ids(tok).values())
    modalities = set()
    for batch in batches[0]:
        for row in range(BATCH):
            tokens, seg, vseg = batch["tokens"][row], batch["segment_ids"][row], batch["vision_segment_ids"][row]
            groups = vseg.reshape(-1, 4)
            assert (groups == groups[:, :1]).all(), "a merger group never straddles two frames"
            n_placeholders = int(np.isin(tokens, chat_lib.placeholder_ids(tok)).sum())
            assert n_placeholders == int((groups[:, 0] > 0).sum())
            trained_targets = batch["targets"][row][batch["loss_mask"][row] == 1]
            assert not np.isin(trained_targets, media_ids).any(), "media tokens are never trained"
            pos = batch["positions"][row]
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                assert pos[0, idx[0]] == 0, "positions restart per sample"
                text = ~np.isin(tokens[idx], chat_lib.placeholder_ids(tok))
                assert (pos[0, idx][text] == pos[1, idx][text]).all() and (pos[1, idx][text] == pos[2, idx][text]).all()
                assert (np.diff(pos[0, idx][text]) > 0).all(), "text positions increase"
                modalities.add(int(batch["modality"][row][idx[0]]))
    assert modalities >= {modality_id(m) for m in ("text", "image")}


def test_stats_count_oversized_samples(batches):
    stats = batches[1]
    assert stats["batches"] == len(batches[0])
    assert stats["bad_records"] > 0  # some interleaved chats exceed 128 tokens and are skipped


def test_sample_loss_averaging_gives_each_packed_sample_weight_one(config, tok, batches):
    sampled = ml_collections.ConfigDict(config.to_dict())
    sampled.data.loss_averaging = "sample"
    batch = next(op.make_train_iterator(sampled, tok, process_index=0, process_count=1))
    plain = batches[0][0]
    np.testing.assert_array_equal(batch["tokens"], plain["tokens"])
    np.testing.assert_array_equal(batch["loss_mask"] > 0, plain["loss_mask"] > 0)
    for row in range(BATCH):
        seg, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        for s in np.unique(seg[(seg > 0) & (mask > 0)]):
            np.testing.assert_allclose(mask[seg == s].sum(), 1.0, rtol=1e-5)


def test_iterator_state_resume_is_bitwise(config, tok):
    it = op.make_train_iterator(config, tok, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    resumed = op.make_train_iterator(config, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(2)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert resumed.stats == it.stats


def test_mixture_weights_and_presets(config):
    import ml_collections
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.mixture = "mm1"
    parts = {t: sources.Part("sw", sw.TASK_MODALITY[t], None) for t in sw.TASKS}
    parts["text"] = sources.Part("text", "text", None)
    weights = op.part_weights(data, parts)
    assert weights["text"] == pytest.approx(0.10) and weights["interleaved"] == pytest.approx(0.45)
    image_tasks = [t for t in sw.TASKS if sw.TASK_MODALITY[t] == "image"]
    assert sum(weights[t] for t in image_tasks) == pytest.approx(0.45)
    data.mixture = "custom"
    data.modality_weights = ml_collections.ConfigDict(dict(text=1.0, image=3.0, video=0.0, interleaved=0.0))
    few = {"text": parts["text"], "caption": parts["caption"], "video_motion": parts["video_motion"],
           "vqa_color": dataclasses.replace(parts["vqa_color"], weight=2.0)}  # a source's task_weights factor
    weights = op.part_weights(data, few)
    assert weights == pytest.approx({"text": 1.0, "caption": 1.0, "vqa_color": 2.0})
    data.mixture = "mm2"
    with pytest.raises(ValueError, match="mixture='mm2'"):
        op.part_weights(data, parts)
    data.mixture = "mm1"
    with pytest.raises(ValueError, match="have no interleaved part"):
        op.part_weights(data, {"caption": parts["caption"], "text": parts["text"]})


def test_shapes_world_task_weights_are_its_parts_weights(config):
    config = config.copy_and_resolve_references()
    config.data.sources.shapes_world.task_weights.vqa_color = 3.0
    parts = sources.parts(config, "train")
    assert parts["vqa_color"].weight == 3.0 and parts["caption"].weight == 1.0 and parts["text"].modality == "text"
    assert "asr" not in parts  # spoken tasks only with the audio tower
    config.data.sources.shapes_world.task_weights.vqa_colour = 1.0
    with pytest.raises(ValueError, match="task_weights names unknown tasks"):
        sources.parts(config, "train")


def test_eval_prompts_are_left_padded(config, tok):
    records = sources.eval_records(config, 3, names=("vqa_color", "video_motion"))
    assert [r["task"] for r in records] == ["vqa_color", "video_motion", "vqa_color"]
    opts = media.VisionOptions.from_config(config.data.vision)
    prompts = [chat_lib.eval_prompt(r, tok, opts) for r in records]
    batch = chat_lib.batch_prompts(prompts, 64, PATCHES)
    for row, prompt in enumerate(prompts):
        n = len(prompt["ids"])
        np.testing.assert_array_equal(batch["tokens"][row, -n:], prompt["ids"])
        assert (batch["segment_ids"][row, :64 - n] == 0).all() and (batch["segment_ids"][row, -n:] == 1).all()
        assert batch["next_position"][row] == prompt["positions"].max() + 1
        header = tok.apply_chat_template([], add_generation_prompt=True)[0][1:]
        assert list(prompt["ids"][-len(header):]) == header  # ends with the open assistant header


# ----------------------------------------------------------------------------- audio


def test_chat_assembly_mixes_audio_image_and_text(tok):
    image = media.MediaItem("image", np.ones((16, media.PATCH_DIM), np.float32), (1, 4, 4))  # 2x2 merged tokens
    clip = media.AudioClip(np.ones((5, 560), np.float32), num_tokens=3)
    messages = [{"role": "user", "content": "<image><audio>What color?"}, {"role": "assistant", "content": "red"}]
    chat = chat_lib.assemble_chat(tok, messages, [image, clip])
    ids, mask, positions = chat["ids"], chat["mask"], chat["positions"]
    IMG, END_IMG, P, AUD, END_AUD, A = (tok.special_id(f"<{n}>") for n in
                                        ("image", "/image", "imagePatch", "audio", "/audio", "audioPatch"))
    s = int(np.flatnonzero(ids == IMG)[0])
    assert ids[s:s + 11].tolist() == [IMG, P, P, P, P, END_IMG, AUD, A, A, A, END_AUD]
    np.testing.assert_array_equal(positions[:, :s], np.tile(np.arange(s), (3, 1)))  # text: t = h = w
    # The 2x2 grid at s+1 (t = s+1, h/w = s+1 + row/col), </image> at its max + 1 = s+3; the
    # audio block is 1-D like text: <audio> s+4, placeholders s+5..s+7, </audio> s+8.
    np.testing.assert_array_equal(positions[:, s:s + 11], s + np.array([
        [0, 1, 1, 1, 1, 3, 4, 5, 6, 7, 8],
        [0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8],
        [0, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8]]))
    np.testing.assert_array_equal(positions[:, s + 11:], np.tile(s + 9 + np.arange(len(ids) - s - 11), (3, 1)))
    assert tok.decode(ids[mask == 1]) == "red<|eot_id|>"  # placeholders and the prompt are not trained

    sample = chat_lib.sample_from_chat(chat, modality_id("audio"), media.AudioOptions(3, 9, clips_per_row=2))
    assert sample["audio_features"].shape == (1, 9, 560) and sample["audio_lengths"].tolist() == [5]
    assert (sample["audio_features"][0, :5] == 1).all() and (sample["audio_features"][0, 5:] == 0).all()
    assert sample["vision_patches"].shape == (16, media.PATCH_DIM) and (sample["modality"] == modality_id("audio")).all()


def test_spoken_vqa_record_media_in_placeholder_order():
    record = speech.make_record(0, "train", 1)  # spoken_vqa: "<image>\n<audio>"
    opts = media.AudioOptions(48, 144, clips_per_row=2)
    items = media.record_media(record, media.VisionOptions(), audio_opts=opts)
    assert [m.kind for m in items] == ["image", "audio"] and items[1].num_tokens == 48
    np.testing.assert_allclose(items[1].features, audio_frontend.audio_features(record["audio"][0]))
    with pytest.raises(ValueError, match="config.model.audio.enabled"):
        media.record_media(record, media.VisionOptions())
    with pytest.raises(ValueError, match="num_audio_tokens=2"):
        media.record_media(record, media.VisionOptions(), audio_opts=media.AudioOptions(2, 6, clips_per_row=2))


@pytest.fixture(scope="module")
def audio_config(config, tmp_path_factory):
    """Omni with the audio tower, 256-token rows (room for two clips), audio-heavy mixture."""
    config = config.copy_and_resolve_references()
    config.model.audio.enabled = True
    config.data.seq_len = 256
    config.data.sources.shapes_world.speech.update(dict(num_train=24, num_eval=8))
    config.data.audio.cmvn_samples = 12
    config.data.mixture = "custom"
    config.data.modality_weights.update(dict(text=1.0, image=1.0, video=0.5, interleaved=0.5, audio=3.0))
    return media.with_cmvn(RunConfig.of(config), str(tmp_path_factory.mktemp("workdir")))


def test_rows_pair_audio_placeholders_with_clips(audio_config, tok):
    it = op.make_train_iterator(audio_config, tok, process_index=0, process_count=1)
    expected = op.example_batch_shapes(audio_config)
    audio_patch, audio = tok.special_id("<audioPatch>"), modality_id("audio")
    mixed_rows = 0
    for _ in range(4):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected  # one compiled shape
        assert set(batch) == set(op.batch_keys(audio_config))
        for row in range(BATCH):
            tokens, lengths = batch["tokens"][row], batch["audio_lengths"][row]
            clips = int(np.count_nonzero(lengths))
            assert (lengths[:clips] > 0).all() and (lengths[clips:] == 0).all(), "clips fill the slots in order"
            assert int(np.sum(tokens == audio_patch)) == 48 * clips
            assert not batch["audio_features"][row, clips:].any()
            for clip in range(clips):
                assert not batch["audio_features"][row, clip, lengths[clip]:].any()
            seg = batch["segment_ids"][row]
            samples = {int(batch["modality"][row][seg == s][0]) for s in np.unique(seg[seg > 0])}
            mixed_rows += audio in samples and len(samples) > 1
            idx = np.flatnonzero(tokens == audio_patch)
            pos = batch["positions"][row][:, idx]
            assert (pos[0] == pos[1]).all() and (pos[1] == pos[2]).all(), "audio positions are 1-D"
    assert mixed_rows > 0, "audio samples share rows with other modalities"


def test_cmvn_is_computed_once_and_read_back(audio_config, tmp_path):
    path = audio_config.data.audio.cmvn_file
    stats = audio_frontend.load_cmvn(path)
    assert stats["mean"].shape == stats["std"].shape == (560,) and stats["count"] > 0
    before = os.stat(path).st_mtime_ns
    again = replace(audio_config, **{"data.audio.cmvn_file": ""})
    assert media.with_cmvn(again, os.path.dirname(path)).data.audio.cmvn_file == path
    assert os.stat(path).st_mtime_ns == before  # read back, not recomputed
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        media.with_cmvn(again, str(tmp_path), compute=False)
    with pytest.raises(ValueError, match="cmvn_file is empty"):
        media.AudioOptions.from_config(again)


def test_audio_in_the_mixture_needs_the_tower(audio_config):
    config = replace(audio_config, **{"model.audio.enabled": False})
    with pytest.raises(ValueError, match="'audio' weight 3.0, but config.model.audio.enabled=False"):
        op.check_audio_mixture(config)
    assert media.AudioOptions.from_config(config) is None and set(op.batch_keys(config)) == set(op.BATCH_KEYS)


def test_speech_eval_prompts_carry_their_clips(audio_config, tok):
    records = sources.eval_records(audio_config, 4, modalities=("audio",))
    assert [r["task"] for r in records] == list(speech.TASKS)
    opts = media.VisionOptions.from_config(audio_config.data.vision)
    audio_opts = media.AudioOptions.from_config(audio_config)
    prompts = [chat_lib.eval_prompt(r, tok, opts, audio_opts) for r in records]
    batch = chat_lib.batch_prompts(prompts, 192, PATCHES, audio_opts)
    assert batch["audio_features"].shape == (4, 2, 144, 560)
    for row, prompt in enumerate(prompts):
        length = len(prompt["audio"][0])
        assert batch["audio_lengths"][row].tolist() == [length, 0]
        np.testing.assert_array_equal(batch["audio_features"][row, 0, :length], prompt["audio"][0])
        assert int(np.sum(batch["tokens"][row] == tok.special_id("<audioPatch>"))) == 48


# ----------------------------------------------------------------------------- pooling connectors


def _block(t, h, w):
    return np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)


@pytest.mark.parametrize("kind,k,grid", [("avg_pool", 4, (2, 2)), ("c_abstractor", 9, (3, 3)),
                                         ("attn_pool", 3, (1, 3))])
def test_pooled_assembly_has_k_tokens_per_image_and_t_k_per_video(tok, kind, k, grid):
    connector = omni.ConnectorConfig(kind=kind, num_tokens=k, max_segments_per_row=3)
    image = media.MediaItem("image", np.ones((24, media.PATCH_DIM), np.float32), (1, 4, 6), connector)  # 2x3 merged
    video = media.MediaItem("video", np.ones((32, media.PATCH_DIM), np.float32), (2, 4, 4), connector)  # 2 frame-pairs
    messages = [{"role": "user", "content": "<image><video>Which?"}, {"role": "assistant", "content": "red"}]
    chat = chat_lib.assemble_chat(tok, messages, [image, video])
    ids, positions = chat["ids"], chat["positions"]
    IMG, END_IMG, P, VID, END_VID, VP = (tok.special_id(f"<{n}>") for n in
                                         ("image", "/image", "imagePatch", "video", "/video", "videoPatch"))
    s = int(np.flatnonzero(ids == IMG)[0])
    assert ids[s:s + 2 * k + k + 4].tolist() == [IMG] + [P] * k + [END_IMG, VID] + [VP] * 2 * k + [END_VID]
    np.testing.assert_array_equal(positions[:, :s + 1], np.tile(np.arange(s + 1), (3, 1)))
    h, w = grid
    np.testing.assert_array_equal(positions[:, s + 1:s + 1 + k], s + 1 + _block(1, h, w))  # (1, √k, √k) / (1, 1, k)
    end_image = s + 1 + max(h, w)  # </image>: the block's max + 1
    np.testing.assert_array_equal(positions[:, s + 1 + k:s + 3 + k], np.tile([[end_image, end_image + 1]], (3, 1)))
    np.testing.assert_array_equal(positions[:, s + 3 + k:s + 3 + 3 * k], end_image + 2 + _block(2, h, w))
    assert positions[0, s + 3 + 3 * k] == end_image + 2 + max(1, h - 1, w - 1) + 1  # </video>
    np.testing.assert_array_equal(chat["frames"], [1] * 24 + [2] * 16 + [3] * 16)  # the tower's segments
    assert chat["patches"].shape == (56, media.PATCH_DIM)  # patches do not depend on the connector

    too_few = dataclasses.replace(connector, max_segments_per_row=2)
    with pytest.raises(ValueError, match="3 image / video frame-pair segments exceed "
                                         "model.connector.max_segments_per_row=2"):
        chat_lib.assemble_chat(tok, messages, [dataclasses.replace(m, connector=too_few) for m in (image, video)])


def test_pooling_bounds_grid_side_and_segments(tok):
    opts = media.VisionOptions(connector=omni.ConnectorConfig(kind="avg_pool", num_tokens=4, max_segments_per_row=2,
                                                           max_grid_side=3))
    assert media.preprocess_media("image", np.zeros((84, 56, 3), np.uint8), opts).num_tokens == 4  # 3x2 merged
    with pytest.raises(ValueError, match=r"image of 4x2 merged tokens exceeds model.connector.max_grid_side=3"):
        media.preprocess_media("image", np.zeros((112, 56, 3), np.uint8), opts)
    # A record with three images: more than S = 2 segments is a bad record; S = 3 packs it.
    record = next(r for r in (sw.make_record(0, "train", i, ("interleaved",)) for i in range(20))
                  if len(r["images"]) == 3)
    record = records_lib.decode_record(sw.encode_record(record))  # as a source yields it
    opts = dataclasses.replace(opts, connector=dataclasses.replace(opts.connector, max_grid_side=16))
    assert op.OmniSample(tok, 1024, opts)(record) == records_lib.bad_record()
    roomy = dataclasses.replace(opts, connector=dataclasses.replace(opts.connector, max_segments_per_row=3))
    sample = op.OmniSample(tok, 1024, roomy)(record)
    np.testing.assert_array_equal(sample[chat_lib.SEGMENTS_KEY], [1, 2, 3])  # packed with length S
    assert int(np.isin(sample["tokens"], chat_lib.placeholder_ids(tok)).sum()) == 3 * 4
    prompt = {"ids": np.ones(4, np.int32), "positions": np.zeros((3, 4), np.int32), "audio": [],
              "patches": np.zeros((48, media.PATCH_DIM), np.float32), "hw": np.zeros((2, 48), np.int32),
              "frames": np.repeat(np.arange(1, 4, dtype=np.int32), 16)}
    with pytest.raises(ValueError, match="3 image / video frame-pair segments exceeds "
                                         "model.connector.max_segments_per_row=2"):
        chat_lib.batch_prompts([prompt], 8, 64, max_segments_per_row=opts.max_segments_per_row)
    assert chat_lib.batch_prompts([prompt], 8, 64, max_segments_per_row=3)["vision_segment_ids"].max() == 3


def test_vision_options_read_the_connector(config):
    config = config.copy_and_resolve_references()
    assert not media.VisionOptions.from_config(config).connector.pools
    config.model.connector.update(dict(kind="attn_pool", num_tokens=5, num_heads=4))
    opts = media.VisionOptions.from_config(config)
    assert opts.connector.kind == "attn_pool" and opts.max_segments_per_row == 8
    assert media.VisionOptions.from_config(config.data.vision).max_segments_per_row is None  # the section alone: linear
    config.model.kind = "llm"
    assert not media.VisionOptions.from_config(config).connector.pools
    config.data.vision.connector = "avg_pool"
    with pytest.raises(ValueError, match="set config.model.connector"):
        media.VisionOptions.from_config(config)


def test_pooled_rows_hold_at_most_s_segments_of_k_tokens(config, tok):
    config = config.copy_and_resolve_references()
    k, max_segments = 4, 2
    config.model.connector.update(dict(kind="avg_pool", num_tokens=k, max_segments_per_row=max_segments))
    config.data.seq_len = 256  # room for every chat: only segments past S are skipped
    config.data.mixture = "custom"
    config.data.modality_weights.update(dict(text=0.5, image=1.0, video=1.0, interleaved=1.0))
    it = op.make_train_iterator(config, tok, process_index=0, process_count=1)
    expected = op.example_batch_shapes(config)
    patch_ids, videos = chat_lib.placeholder_ids(tok), 0
    for _ in range(3):
        batch = next(it)
        assert {key: (v.shape, v.dtype) for key, v in batch.items()} == expected  # one compiled shape
        for row in range(BATCH):
            tokens, vseg = batch["tokens"][row], batch["vision_segment_ids"][row]
            segments = len(np.unique(vseg[vseg > 0]))
            assert segments <= max_segments
            is_patch = np.isin(tokens, patch_ids)
            assert int(is_patch.sum()) == k * segments
            # Each placeholder run is one item: t segments of a 2x2 pooled grid.
            edges = np.flatnonzero(np.diff(np.concatenate([[0], is_patch.astype(int), [0]])))
            for start, stop in zip(edges[::2], edges[1::2]):
                t = (stop - start) // k
                videos += t > 1
                pos = batch["positions"][row][:, start:stop]
                np.testing.assert_array_equal(pos - pos[0, 0], _block(t, 2, 2))
    assert videos > 0
    assert it.stats["bad_records"] > 0  # interleaved chats with 3 images, videos with 3-4 frame-pairs

"""Preference pairs from shapes-world VQA: right answer chosen, a wrong one of its type rejected;
omni rows carry their image's patches, shared by chosen and rejected."""
import numpy as np
import pytest

from m2omni_jax.data import image_preprocessing as ip, media as media_lib
from m2omni_jax.experiments.shapes_world import preference, world as shapes_world, text_corpus
from m2omni_jax.data.tokenizer import Tokenizer, train_tokenizer, training_text

SEQ_LEN = 96
VISION = media_lib.VisionOptions(patches_per_row=64, pixel_norm="clip_centered")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = map(training_text, text_corpus.iter_documents(300, seed=0))
    return Tokenizer(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "m"), 512))


def test_chosen_is_ground_truth_and_rejected_a_wrong_answer_of_its_type():
    types = set()
    for k in range(60):
        pair = preference.make_pair(0, "train", k)
        record = shapes_world.make_record(0, "train", 2 * k, (preference.VQA_TASKS[k % 4],))
        qtype = record["attributes"]["question_type"]
        types.add(qtype)
        assert pair["question_type"] == qtype and pair["id"] == record["id"]
        assert pair["prompt"] == record["messages"][:1] and pair["prompt"][0]["content"].startswith("<image>\n")
        assert pair["chosen"] == record["answer"] == record["messages"][1]["content"]
        assert pair["rejected"] != pair["chosen"]
        assert len(pair["images"]) == 1 and np.array_equal(pair["images"][0], record["images"][0])
        if qtype == "relation":
            assert pair["rejected"] == preference.OPPOSITE_RELATION[pair["chosen"]]
        else:
            assert pair["chosen"] in preference.ANSWERS[qtype]
            assert pair["rejected"] in preference.ANSWERS[qtype]
    assert types == {"color", "shape", "count", "position", "relation"}


def _text(pair):
    return {k: v for k, v in pair.items() if k not in ("images", "video")}


def test_deterministic_from_the_seed(tok):
    pairs = [preference.make_pair(0, "train", k) for k in range(20)]
    again = [preference.make_pair(0, "train", k) for k in range(20)]
    assert list(map(_text, pairs)) == list(map(_text, again))
    assert all(np.array_equal(p["images"][0], q["images"][0]) for p, q in zip(pairs, again))
    assert list(map(_text, pairs)) != [_text(preference.make_pair(1, "train", k)) for k in range(20)]
    assert list(map(_text, pairs)) != [_text(preference.make_pair(0, "eval", k)) for k in range(20)]
    a = preference.alignment_batch(tok, seed=0, split="train", step=1, batch_size=3, seq_len=SEQ_LEN, vision=VISION)
    b = next(preference.alignment_batches(tok, seed=0, batch_size=3, seq_len=SEQ_LEN, first_step=1, vision=VISION))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _response(tok, batch, prefix, i):
    mask = batch[f"{prefix}_loss_mask"][i] > 0
    return tok.decode(batch[f"{prefix}_targets"][i][mask])


def test_text_only_batch_layout(tok):
    n = 4
    batch = preference.alignment_batch(tok, seed=0, split="train", step=0, batch_size=n, seq_len=SEQ_LEN)
    expected = {f"{p}_{k}" for p in ("chosen", "rejected", "instruction") for k in preference.SAMPLE_KEYS}
    assert set(batch) == expected == set(preference.batch_ndims(vision=False))
    for key, value in batch.items():
        assert value.shape == ((n, 3, SEQ_LEN) if key.endswith("positions") else (n, SEQ_LEN)), key
        assert value.dtype == (np.float32 if key.endswith("loss_mask") else np.int32), key
    for i in range(n):
        pair = preference.make_pair(0, "train", i)
        assert _response(tok, batch, "chosen", i) == pair["chosen"] + "<|eot_id|>"
        assert _response(tok, batch, "rejected", i) == pair["rejected"] + "<|eot_id|>"
        instruction = preference.make_instruction(0, "train", i)
        assert instruction["index"] == 2 * i + 1  # never a pair's scene
        assert _response(tok, batch, "instruction", i) == instruction["answer"] + "<|eot_id|>"
        for side in ("chosen", "rejected"):
            tokens, seg = batch[f"{side}_tokens"][i], batch[f"{side}_segment_ids"][i]
            length = int(seg.sum())
            assert np.all(seg[:length] == 1) and np.all(tokens[length:] == 0)
            assert np.all(batch[f"{side}_loss_mask"][i][length - 1:] == 0)
            positions = batch[f"{side}_positions"][i]
            assert np.all(positions == positions[0])  # t = h = w for text
            np.testing.assert_array_equal(positions[0][:length], np.arange(length))
        # Same prompt: the two sides agree up to the first trained target.
        first = int(np.argmax(batch["chosen_loss_mask"][i]))
        np.testing.assert_array_equal(batch["chosen_tokens"][i][:first + 1], batch["rejected_tokens"][i][:first + 1])
        assert tok.special_id("<image>") in batch["chosen_tokens"][i][:first + 1]  # the text-only placeholder


def test_omni_rows_carry_their_image(tok):
    n, patches = 4, VISION.patches_per_row
    batch = preference.alignment_batch(tok, seed=0, split="train", step=0, batch_size=n, seq_len=SEQ_LEN,
                                       vision=VISION)
    ndims = preference.batch_ndims(vision=True)
    assert set(batch) == set(ndims)
    for key, value in batch.items():
        assert value.ndim == ndims[key] and value.shape[0] == n, key
    assert batch["chosen_vision_patches"].shape == (n, patches, media_lib.PATCH_DIM)
    assert batch["rejected_vision_hw"].shape == (n, 2, patches)
    placeholder = tok.special_id("<imagePatch>")
    for i in range(n):
        pair = preference.make_pair(0, "train", i)
        (item,) = media_lib.record_media(pair, VISION, pair["prompt"])
        for part, media in (("chosen", item), ("rejected", item),
                            ("instruction", media_lib.record_media(preference.make_instruction(0, "train", i),
                                                                       VISION)[0])):
            tokens, valid = batch[f"{part}_tokens"][i], batch[f"{part}_vision_segment_ids"][i] > 0
            num_patches = len(media.patches)
            # One placeholder per merged feature (4 patches), and the pack holds exactly this image.
            assert np.sum(tokens == placeholder) == valid.sum() // ip.MERGE_SIZE ** 2 == media.num_tokens
            assert np.all(valid[:num_patches]) and not np.any(valid[num_patches:])
            np.testing.assert_array_equal(batch[f"{part}_vision_patches"][i][:num_patches], media.patches)
            assert not np.any(batch[f"{part}_vision_patches"][i][num_patches:])
            np.testing.assert_array_equal(batch[f"{part}_vision_hw"][i][:, :num_patches],
                                          ip.hw_positions(media.grid_thw))
            # M-RoPE: the image block spans its (h, w) grid; the text after it resumes past the block.
            positions, at = batch[f"{part}_positions"][i], np.flatnonzero(tokens == placeholder)
            _, h, w = media.merged_grid
            assert len(set(map(tuple, positions[1:, at].T))) == h * w
            assert np.all(positions[:, at[-1] + 1] == positions[:, at].max() + 1)  # </image>
            assert not np.any(batch[f"{part}_loss_mask"][i][at])
        for key in ("tokens", "positions"):
            first = int(np.argmax(batch["chosen_loss_mask"][i]))
            np.testing.assert_array_equal(batch[f"chosen_{key}"][i][..., :first + 1],
                                          batch[f"rejected_{key}"][i][..., :first + 1])
        for key in preference.VISION_KEYS:  # the same image on both sides
            np.testing.assert_array_equal(batch[f"chosen_{key}"][i], batch[f"rejected_{key}"][i])
        assert _response(tok, batch, "chosen", i) == pair["chosen"] + "<|eot_id|>"
        assert _response(tok, batch, "rejected", i) == pair["rejected"] + "<|eot_id|>"


def test_too_long_for_seq_len_or_patch_pack_raises(tok):
    with pytest.raises(ValueError, match="seq_len=8"):
        preference.preference_batch(tok, seed=0, split="train", start=0, batch_size=1, seq_len=8)
    small = media_lib.VisionOptions(patches_per_row=4)
    with pytest.raises(ValueError, match="patches_per_row=4"):
        preference.preference_batch(tok, seed=0, split="train", start=0, batch_size=1, seq_len=SEQ_LEN,
                                    vision=small)

"""Pair packing (`data.pack_pairs`): consecutive image–text samples joined into one sequence."""
import json
import os
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.data import chat as chat_lib
from m2omni_jax.data import media, pipeline
from m2omni_jax.data import omni_pipeline as op
from m2omni_jax.config_fields import replace
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.experiments.shapes_world import source as shapes_world_source
from m2omni_jax.modalities import modality_id
from m2omni_jax.models.llm import attention_mask
from m2omni_jax.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE, TEXT = modality_id("image"), modality_id("text")


def hand_sample(ids, mask, positions, patches, modality=IMAGE):
    """An unpacked omni sample as `chat.sample_from_chat` makes it; patch p's pixels are all `first + p`."""
    sample = pipeline.make_sample(ids, mask, modality, len(ids))
    sample["positions"] = np.asarray(positions, np.int32)  # (L, 3): grain packs along axis 0
    first, count = patches
    sample["vision_patches"] = np.repeat(np.arange(first, first + count, dtype=np.float32)[:, None],
                                         media.PATCH_DIM, axis=1)
    sample["vision_hw"] = np.zeros((count, 2), np.int32)
    sample["vision_frames"] = np.ones(count, np.int32) if count else np.zeros(0, np.int32)
    sample["num_bad_records"] = 0
    return sample


# Tokens: 1 bos, 7 <image>, 9 <imagePatch>, 8 </image>, 3 <|eot_id|>; 50, 51, 60 caption words.
# Pair A: two merged tokens (grid 1×1×2) at positions (2,2,2), (2,2,3); the text after resumes at 4.
PAIR_A = hand_sample([1, 7, 9, 9, 8, 50, 51, 3], [0, 0, 0, 0, 0, 1, 1, 1],
                     [(0, 0, 0), (1, 1, 1), (2, 2, 2), (2, 2, 3), (4, 4, 4), (5, 5, 5), (6, 6, 6), (7, 7, 7)], (0, 8))
# Pair B: one merged token (grid 1×1×1).
PAIR_B = hand_sample([1, 7, 9, 8, 60, 3], [0, 0, 0, 0, 1, 1],
                     [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 5)], (100, 4))
DOC = hand_sample([1, 70], [0, 1], [(0, 0, 0), (1, 1, 1)], (0, 0), modality=TEXT)
LENGTHS = {**{k: 16 for k in ("tokens", "targets", "loss_mask", "modality", "positions")},
           **{k: 16 for k in ("vision_patches", "vision_hw", "vision_frames")}}


def packed_rows(samples, pack_pairs, lengths=LENGTHS):
    """The samples first-fit packed into rows as the omni pipeline does (one bin open), then joined."""
    it = grain.MapDataset.source(samples).to_iter_dataset()
    it = grain.experimental.FirstFitPackIterDataset(it, length_struct=lengths, num_packing_bins=1, seed=0,
                                                    shuffle_bins=True, meta_features=pipeline.COUNT_KEYS)
    if pack_pairs:
        it = it.map(pipeline.JoinRowPairs(frozenset(pack_pairs)))
    return [op.finalize_row(row) for row in it]


def test_hand_worked_packed_row():
    """A, a text doc, then B in one row: A and B become one sequence, B continuing A; the doc follows."""
    (row,) = packed_rows([PAIR_A, DOC, PAIR_B], {IMAGE})
    np.testing.assert_array_equal(row["tokens"], [1, 7, 9, 9, 8, 50, 51, 3, 1, 7, 9, 8, 60, 3, 1, 70])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 14 + [2, 2])
    # A's last target is B's bos (untrained); only the captions and their <|eot_id|> are trained.
    np.testing.assert_array_equal(row["targets"], [7, 9, 9, 8, 50, 51, 3, 1, 7, 9, 8, 60, 3, 0, 70, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(row["modality"], [IMAGE] * 14 + [TEXT] * 2)
    np.testing.assert_array_equal(row["positions"], np.array(
        [(0, 0, 0), (1, 1, 1), (2, 2, 2), (2, 2, 3), (4, 4, 4), (5, 5, 5), (6, 6, 6), (7, 7, 7)]
        + [(8, 8, 8), (9, 9, 9), (10, 10, 10), (11, 11, 11), (12, 12, 12), (13, 13, 13)]
        + [(0, 0, 0), (1, 1, 1)]).T)
    # The images keep their places: A's 8 patches (image 1), then B's 4 (image 2).
    np.testing.assert_array_equal(row["vision_patches"][:, 0], list(range(8)) + list(range(100, 104)) + [0] * 4)
    np.testing.assert_array_equal(row["vision_segment_ids"], [1] * 8 + [2] * 4 + [0] * 4)
    assert row["num_bad_records"] == 0 and row["num_truncated"] == 0
    mask = np.asarray(attention_mask(*(jnp.asarray(row["segment_ids"])[None],) * 2,
                                     *(jnp.arange(16)[None],) * 2))[0, 0]
    assert mask[8:14, :8].all(), "B's tokens attend to all of A"
    assert not mask[14:, :14].any(), "the doc sees neither"


def test_separate_segments_without_packing():
    (row,) = packed_rows([PAIR_A, DOC, PAIR_B], set())
    np.testing.assert_array_equal(row["tokens"], [1, 7, 9, 9, 8, 50, 51, 3, 1, 70, 1, 7, 9, 8, 60, 3])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 8 + [2] * 2 + [3] * 6)
    np.testing.assert_array_equal(row["positions"][0], [0, 1, 2, 2, 4, 5, 6, 7, 0, 1, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(row["targets"][7], 0)


def test_patches_follow_their_tokens():
    """A video sample between A and B keeps its patches after theirs once A and B are joined."""
    video = hand_sample([1, 7, 9, 8], [0, 0, 0, 0], [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)], (200, 4),
                        modality=modality_id("video"))
    lengths = {**LENGTHS, **{k: 18 for k in ("tokens", "targets", "loss_mask", "modality", "positions")}}
    (row,) = packed_rows([PAIR_A, video, PAIR_B], {IMAGE}, lengths)
    np.testing.assert_array_equal(row["segment_ids"], [1] * 14 + [2] * 4)
    np.testing.assert_array_equal(row["vision_patches"][:, 0], list(range(8)) + list(range(100, 104))
                                  + list(range(200, 204)))
    np.testing.assert_array_equal(row["vision_segment_ids"], [1] * 8 + [2] * 4 + [3] * 4)


def test_rows_hold_the_same_pairs_joined_or_not():
    """Joining is after first-fit packing: the same samples per row, only one sequence each."""
    samples = [PAIR_A, PAIR_A, DOC, PAIR_B, PAIR_A, DOC, PAIR_B, PAIR_B]
    for joined, separate in zip(packed_rows(samples, {IMAGE}), packed_rows(samples, set()), strict=True):
        np.testing.assert_array_equal(np.sort(joined["tokens"]), np.sort(separate["tokens"]))
        assert joined["loss_mask"].sum() == separate["loss_mask"].sum()
        image_segments = np.unique(joined["segment_ids"][joined["modality"] == IMAGE])
        assert len(image_segments) == 1


def test_unknown_modality_is_a_clear_error(config):
    with pytest.raises(ValueError, match=r"config.data.pack_pairs=\('pictures',\)"):
        pipeline.pack_pair_modalities(replace(config, **{"data.pack_pairs": ("pictures",)}).data)


@pytest.mark.parametrize("stage", ["pt1", "pt2", "pt3", "it1", "it2", "it3"])
def test_pt1_packs_pairs_and_the_other_stages_do_not(stage):
    sys.path.insert(0, REPO)
    import importlib
    config = importlib.import_module(f"configs.stages.{stage}").get_config("tiny")
    assert tuple(config.data.pack_pairs) == (("image",) if stage == "pt1" else ())


# ----------------------------------------------------------------------------- the omni pipeline


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    sys.path.insert(0, REPO)
    from configs import base
    root = tmp_path_factory.mktemp("pair_packing")
    config = base.get_config()
    config.model.kind = "omni"
    config.data.update(dict(dir=str(root / "data"), seq_len=128, mixture="custom"))
    config.data.modality_weights.update(dict(text=0.3, image=0.7, video=0.0, interleaved=0.0))
    config.data.sources.text.update(dict(num_docs=300, tokenizer_docs=300))
    config.data.sources.shapes_world = shapes_world_source.default_config()
    config.data.sources.shapes_world.update(dict(num_train=200, num_eval=20, tasks=("caption", "ocr")))
    config.data.vision.patches_per_row = 256
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=512))
    config.train.batch_size = 4
    return RunConfig.of(config)


@pytest.fixture(scope="module")
def tok(config):
    return get_tokenizer(config)


def batches_of(config, tok, pack_pairs, num=3):
    config = replace(config, **{"data.pack_pairs": tuple(pack_pairs)})
    it = op.make_train_iterator(config, tok, process_index=0, process_count=1)
    return [next(it) for _ in range(num)], it


def test_off_rows_are_unchanged(config, tok):
    """Off, and on for a modality the mixture lacks (every row passes the join as it is): the same bytes."""
    off, _ = batches_of(config, tok, ())
    passed, _ = batches_of(config, tok, ("video",))
    for a, b in zip(off, passed):
        assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_pipeline_rows_join_image_pairs(config, tok):
    packed, _ = batches_of(config, tok, ("image",))
    separate, _ = batches_of(config, tok, ())
    for a, b in zip(packed, separate):  # the same rows, only the sequences differ
        np.testing.assert_array_equal(np.sort(a["tokens"], axis=-1), np.sort(b["tokens"], axis=-1))
        np.testing.assert_array_equal(np.sort(a["vision_patches"][..., 0], axis=-1),
                                      np.sort(b["vision_patches"][..., 0], axis=-1))
    image_open, patch_ids = tok.special_id("<image>"), chat_lib.placeholder_ids(tok)
    media_ids = list(chat_lib.media_token_ids(tok).values())
    joined = 0
    for batch in packed:
        for row in range(len(batch["tokens"])):
            tokens, seg, pos = batch["tokens"][row], batch["segment_ids"][row], batch["positions"][row]
            groups = batch["vision_segment_ids"][row].reshape(-1, 4)
            assert int(np.isin(tokens, patch_ids).sum()) == int((groups[:, 0] > 0).sum())
            assert not np.isin(batch["targets"][row][batch["loss_mask"][row] > 0], media_ids).any()
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                images = int(np.sum(tokens[idx] == image_open))
                if images < 2:
                    continue
                joined += 1
                assert (batch["modality"][row][idx] == IMAGE).all()
                text = idx[~np.isin(tokens[idx], patch_ids)]
                assert pos[0, idx[0]] == 0 and (np.diff(pos[0, text]) > 0).all(), "positions continue"
                assert int(np.sum(tokens[idx] == tok.bos_id)) == images, "one pair per image"
                # The segment's images are consecutive vision segments, in order.
                vseg = groups[:, 0][groups[:, 0] > 0]
                firsts = np.flatnonzero(np.isin(tokens, patch_ids))
                mine = vseg[np.isin(firsts, idx)]
                assert len(np.unique(mine)) == images and (np.diff(mine) >= 0).all()
    assert joined >= 4


def test_packed_iterator_resume_is_bitwise(config, tok):
    _, it = batches_of(config, tok, ("image",), num=2)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    resumed = op.make_train_iterator(replace(config, **{"data.pack_pairs": ("image",)}), tok,
                                     process_index=0, process_count=1)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(2)]
    for a, b in zip(expected, got):
        assert all(np.array_equal(a[k], b[k]) for k in a)

"""Preference pairs from shapes-world VQA: right answer chosen, a wrong one of its type rejected."""
import numpy as np
import pytest

from m2omni_jax.data import preference, shapes_world, text_corpus
from m2omni_jax.data.tokenizer import Tokenizer, train_tokenizer, training_text

SEQ_LEN = 96


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
        if qtype == "relation":
            assert pair["rejected"] == preference.OPPOSITE_RELATION[pair["chosen"]]
        else:
            assert pair["chosen"] in preference.ANSWERS[qtype]
            assert pair["rejected"] in preference.ANSWERS[qtype]
    assert types == {"color", "shape", "count", "position", "relation"}


def test_deterministic_from_the_seed(tok):
    pairs = [preference.make_pair(0, "train", k) for k in range(20)]
    assert pairs == [preference.make_pair(0, "train", k) for k in range(20)]
    assert pairs != [preference.make_pair(1, "train", k) for k in range(20)]
    assert pairs != [preference.make_pair(0, "eval", k) for k in range(20)]
    a = preference.alignment_batch(tok, seed=0, split="train", step=1, batch_size=3, seq_len=SEQ_LEN)
    b = next(preference.alignment_batches(tok, seed=0, batch_size=3, seq_len=SEQ_LEN, first_step=1))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _response(tok, batch, prefix, i):
    mask = batch[f"{prefix}_loss_mask"][i] > 0
    return tok.decode(batch[f"{prefix}_targets"][i][mask])


def test_batch_layout(tok):
    n = 4
    batch = preference.alignment_batch(tok, seed=0, split="train", step=0, batch_size=n, seq_len=SEQ_LEN)
    expected = {f"{p}_{k}" for p in ("chosen", "rejected", "instruction") for k in preference.SAMPLE_KEYS}
    assert set(batch) == expected
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


def test_too_long_for_seq_len_raises(tok):
    with pytest.raises(ValueError, match="seq_len=8"):
        preference.preference_batch(tok, seed=0, split="train", start=0, batch_size=1, seq_len=8)

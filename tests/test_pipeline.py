import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from m2omni_jax.data import pipeline
from m2omni_jax.experiments.shapes_world import source as shapes_world_source
from m2omni_jax.experiments.shapes_world import text_corpus
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.modalities import modality_id
from m2omni_jax.parallel.sharding import batch_sharding, make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64
BATCH = 8


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    sys.path.insert(0, REPO)
    from configs import base
    config = base.get_config()  # the built-in text corpus is its only source
    config.data.dir = str(root / "data")
    config.data.sources.text.update(dict(num_docs=600, tokenizer_docs=500))
    config.data.seq_len = SEQ_LEN
    config.tokenizer.cache_dir = str(root / "tok")
    config.train = ml_collections.ConfigDict({"batch_size": BATCH})
    return config


@pytest.fixture(scope="module")
def tok(config):
    return get_tokenizer(config)


@pytest.fixture(scope="module")
def batches(config, tok):
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    return [next(it) for _ in range(6)], it.stats


def _write_records(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    return str(path)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_corpus_is_deterministic_and_idempotent(tmp_path):
    paths = text_corpus.write_text_corpus(str(tmp_path), 50, seed=3, num_shards=3)
    assert len(paths) == 3 and all(os.path.exists(p) for p in paths)
    mtimes = [os.path.getmtime(p) for p in paths]
    assert text_corpus.write_text_corpus(str(tmp_path), 50, seed=3, num_shards=3) == paths
    assert [os.path.getmtime(p) for p in paths] == mtimes
    records = list(pipeline.make_record_dataset(paths, seed=0, shuffle=False))
    docs = [text_corpus.decode_record(r) for r in records]
    assert docs == list(text_corpus.iter_documents(50, seed=3))
    assert {d["kind"] for d in docs} >= {"description", "story", "fact", "qa_text", "chat"}
    assert text_corpus.make_document(7, seed=4) != docs[7]
    text_corpus.write_text_corpus(str(tmp_path), 50, seed=4, num_shards=3)  # manifest differs: rewritten
    assert text_corpus.decode_record(list(pipeline.make_record_dataset(paths, seed=0, shuffle=False))[7]) \
        == text_corpus.make_document(7, seed=4)


def test_batch_format(batches):
    batch = batches[0][0]
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for key, dtype in [("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                       ("segment_ids", np.int32), ("modality", np.int32)]:
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key
    assert batch["positions"].shape == (BATCH, 3, SEQ_LEN) and batch["positions"].dtype == np.int32


def test_packing_invariants(batches):
    for batch in batches[0]:
        for row in range(BATCH):
            seg, tokens, targets = batch["segment_ids"][row], batch["tokens"][row], batch["targets"][row]
            mask, pos = batch["loss_mask"][row], batch["positions"][row]
            pad = seg == 0
            n = int((~pad).sum())
            assert not pad[:n].any(), "padding only at the end"
            ids = np.unique(seg[:n])
            assert list(ids) == list(range(1, len(ids) + 1))
            assert (mask[pad] == 0).all() and (tokens[pad] == 0).all() and (batch["modality"][row][pad] == 0).all()
            assert (pos[0] == pos[1]).all() and (pos[0] == pos[2]).all()
            for s in ids:
                idx = np.flatnonzero(seg == s)
                assert (np.diff(idx) == 1).all()
                assert (pos[0][idx] == np.arange(len(idx))).all(), "positions restart per sample"
                assert (targets[idx[:-1]] == tokens[idx[1:]]).all(), "targets stay inside the sample"
                assert mask[idx[-1]] == 0 and targets[idx[-1]] == 0
                assert (batch["modality"][row][idx] == modality_id("text")).all()


def test_packing_efficiency_and_stats(batches):
    bs, stats = batches
    effs = [pipeline.packing_efficiency(b) for b in bs]
    assert all(0.6 < e <= 1.0 for e in effs)
    assert stats["batches"] == len(bs) and stats["bad_records"] == 0
    assert stats["tokens"] == sum(int((b["segment_ids"] > 0).sum()) for b in bs)
    assert stats["slots"] == len(bs) * BATCH * SEQ_LEN


def test_text_and_chat_samples(tok):
    to_sample = pipeline.TokenizeRecord(tok, SEQ_LEN)
    text = to_sample(text_corpus.encode_record({"text": "A red star.", "modality": "text"}))
    assert text["tokens"][0] == tok.bos_id and text["tokens"][-1] == tok.eos_id
    assert text["loss_mask"].tolist() == [1] * (len(text["tokens"]) - 1) + [0]
    chat = to_sample(text_corpus.encode_record({"messages": [
        {"role": "user", "content": "Where is the star?"}, {"role": "assistant", "content": "At the top."}]}))
    trained = chat["targets"][chat["loss_mask"] == 1]
    assert tok.decode(trained) == "At the top.<|eot_id|>"
    long = to_sample(text_corpus.encode_record({"text": "red blue " * 100}))
    assert len(long["tokens"]) == SEQ_LEN and long["num_truncated"] == 1
    assert to_sample(text_corpus.encode_record({"text": "x", "modality": "audio"}))["modality"][0] == modality_id("audio")


@pytest.mark.parametrize("averaging", ["sample", "square"])
def test_loss_averaging_weighs_each_packed_sample(config, tok, batches, averaging):
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.loss_averaging = averaging
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    for plain, weighted in zip(batches[0][:3], (next(it) for _ in range(3))):
        np.testing.assert_array_equal(weighted["tokens"], plain["tokens"])  # same packing
        np.testing.assert_array_equal(weighted["loss_mask"] > 0, plain["loss_mask"] > 0)
        for row in range(BATCH):
            for segment in set(weighted["segment_ids"][row].tolist()) - {0}:
                in_segment = weighted["segment_ids"][row] == segment
                n = plain["loss_mask"][row][in_segment].sum()
                total = weighted["loss_mask"][row][in_segment].sum()
                np.testing.assert_allclose(total, 1.0 if averaging == "sample" else np.sqrt(n), rtol=1e-5)


def test_unknown_loss_averaging_is_named(config):
    bad = ml_collections.ConfigDict(config.data.to_dict())
    bad.loss_averaging = "tokens"
    with pytest.raises(ValueError, match="loss_averaging='tokens'"):
        pipeline.loss_averaging_power(bad)


def test_iterator_state_resume_is_bitwise(config, tok):
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert all(_equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(3)]))
    assert resumed.stats == it.stats


def test_process_shards_are_disjoint(config, tok):
    paths = shapes_world_source.text_corpus_files(config, config.data.sources.text)
    shards = [[text_corpus.decode_record(r)["id"]
               for r in pipeline.make_record_dataset(paths, seed=0, process_index=i, process_count=2)]
              for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(config.data.sources.text.num_docs))
    firsts = [next(pipeline.make_train_iterator(config, tok, process_index=i, process_count=2)) for i in range(2)]
    assert all(b["tokens"].shape == (BATCH // 2, SEQ_LEN) for b in firsts)
    assert not np.array_equal(firsts[0]["tokens"], firsts[1]["tokens"])


def test_corrupt_records_are_skipped_and_counted(tmp_path, tok):
    fitting = [d for d in text_corpus.iter_documents(40, seed=0) if len(pipeline._doc_ids(d, tok)[0]) <= SEQ_LEN]
    good = [text_corpus.encode_record(d) for d in fitting[:6]]
    bad = [b"\xff\xfe not utf-8", b"{truncated json", b"[1, 2]", b'{"text": 5}', b'{"messages": [{"role": "user"}]}',
           text_corpus.encode_record({"text": "ok", "modality": "smell"})]
    long = [text_corpus.encode_record({"text": "a red circle " * 60})]
    path = _write_records(tmp_path / "mixed.array_record", good[:3] + bad + good[3:] + long)
    ds = pipeline.make_text_dataset([path], tok, seq_len=SEQ_LEN, batch_size=1, seed=0, num_epochs=1)
    it = iter(ds)
    rows = list(it)
    assert sum(len(np.unique(r["segment_ids"][r["segment_ids"] > 0])) for r in rows) == len(good) + 1
    assert it.stats["bad_records"] == len(bad)
    assert it.stats["truncated_docs"] == 1


def test_make_global_batch_on_8_device_mesh(batches):
    mesh = make_mesh({"data": -1})
    assert mesh.shape["data"] == 8 == jax.device_count()
    local = batches[0][0]
    global_batch = pipeline.make_global_batch(local, mesh)
    assert set(global_batch) == set(local)
    for k, v in global_batch.items():
        assert isinstance(v, jax.Array) and v.shape == local[k].shape and v.dtype == local[k].dtype
        assert v.sharding.is_equivalent_to(batch_sharding(mesh, v.ndim), v.ndim)
        assert len(v.addressable_shards) == 8
        assert v.addressable_shards[0].data.shape == (BATCH // 8,) + local[k].shape[1:]
        np.testing.assert_array_equal(np.asarray(v), local[k])


@pytest.mark.slow
def test_worker_processes_resume_bitwise(config, tok):
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.num_workers = 2
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert all(_equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(3)]))


def test_fixed_data_shards_give_the_same_global_batches_on_any_process_count(config, tok):
    sharded = config.copy_and_resolve_references()
    sharded.data.shards = 2
    alone = pipeline.make_train_iterator(sharded, tok, process_index=0, process_count=1)
    per_process = [pipeline.make_train_iterator(sharded, tok, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        whole, parts = next(alone), [next(it) for it in per_process]
        assert whole["tokens"].shape == (BATCH, SEQ_LEN)
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    assert alone.stats["tokens"] == sum(it.stats["tokens"] for it in per_process)
    state = alone.get_state()
    expected = [next(alone) for _ in range(2)]
    resumed = pipeline.make_train_iterator(sharded, tok, process_index=0, process_count=1)
    resumed.set_state(json.loads(json.dumps(state)))
    assert all(_equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(2)]))
    sharded.data.shards = 3
    with pytest.raises(ValueError, match="config.data.shards=3"):
        pipeline.make_train_iterator(sharded, tok, process_index=0, process_count=2)

"""grain input pipeline for text: records → shard → shuffle → tokenise → pack → batch.

    the text parts of config.data.sources (`sources/`; or ArrayRecord files of JSON /
    msgpack text records) → [process_index::process_count]
    → shuffle(seed) → repeat → tokenise (bad records → marker) → to_iter_dataset
    → drop bad records (counted) → grain FirstFitPackIterDataset(seq_len)
    → per-row finalise → batch(local batch) → [mp_prefetch] → running stats
    and, per process, its shards of `config.data.shards` side by side (`ShardsIterator`).

Batch (numpy, per-process local batch B, length T = seq_len):
  tokens      int32 (B,T)    inputs
  targets     int32 (B,T)    token after tokens[t] in the same sample (0 at a sample's last token)
  loss_mask   float32 (B,T)  > 0 where targets[t] is trained: 1, or n^-p with
                             `data.loss_averaging` (a sample of n trained tokens)
  segment_ids int32 (B,T)    1,2,3… per packed sample in the row, 0 = padding (omni rows with
                             `data.pack_pairs`: per sequence of joined samples, `JoinRowPairs`)
  positions   int32 (B,3,T)  M-RoPE (t,h,w) ids; for text all rows = position within the sample
  modality    int32 (B,T)    `modalities.modality_id` of each token (padding: 0, loss_mask 0)

Text docs become `bos + tokens + eos`, every target trained; chat docs use the
tokenizer's chat template, with targets trained only on assistant content and
its `<|eot_id|>`. Samples longer than seq_len are truncated (counted). A
record that fails to decode is skipped (counted). The counts, with token
totals, are kept in the iterator state (`iterator.stats`), so they survive a
checkpoint restore.
"""
from __future__ import annotations

from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np

from m2omni_jax.data import records as records_lib
from m2omni_jax.data import sources
from m2omni_jax.modalities import modality_id
from m2omni_jax.parallel.sharding import batch_sharding

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "modality")
_SEQ_KEYS = ("tokens", "targets", "loss_mask", "modality")  # packed by grain
COUNT_KEYS = ("num_bad_records", "num_truncated")  # per-sample counts, summed per batch
BAD_RECORD = records_lib.BAD_RECORD


# ----------------------------------------------------------------------------- records


def make_record_dataset(paths: Sequence[str], *, seed: int, process_index: int = 0,
                        process_count: int = 1, shuffle: bool = True) -> grain.MapDataset:
    """This process's shard of the raw records (bytes), shuffled; not repeated."""
    ds = grain.MapDataset.source(sources.ArrayRecordFiles(list(paths)))
    ds = ds[process_index::process_count]
    return ds.shuffle(seed) if shuffle else ds


def _doc_ids(doc: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask): mask[i] = 1 when ids[i] is a trained target."""
    if "messages" in doc:
        return tokenizer.apply_chat_template(doc["messages"])
    text = doc["text"]
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}, not str")
    ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    return ids, [0] + [1] * (len(ids) - 1)


def make_sample(ids: Sequence[int], mask: Sequence[int], modality: int, seq_len: int) -> dict:
    """One unpacked sample (≤ seq_len tokens) with next-token targets."""
    truncated = len(ids) > seq_len
    tokens = np.asarray(ids[:seq_len], np.int32)
    n = len(tokens)
    targets = np.zeros(n, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(n, np.float32)
    loss_mask[:-1] = np.asarray(mask[1:n], np.float32)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
            "modality": np.full(n, modality, np.int32), "num_truncated": int(truncated)}


class TokenizeRecord:
    """A text record (a dict, or its bytes: `records.decode_record`) → sample dict, or the
    bad-record marker when it cannot be read."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len

    def __call__(self, record: dict | bytes) -> dict:
        if isinstance(record, dict) and records_lib.is_bad(record):
            return record
        try:
            doc = records_lib.decode_record(record) if isinstance(record, bytes) else record
            ids, mask = _doc_ids(doc, self.tokenizer)
            modality = modality_id(doc.get("modality", "text"))
        except records_lib.READ_ERRORS:
            return records_lib.bad_record()
        return make_sample(ids, mask, modality, self.seq_len)


# Power p of a sample's n trained tokens: each weighs n^-p in the loss (Σ w·ce / Σ w).
LOSS_AVERAGING = {
    "token": 0.0,  # every trained token alike: long answers (captions) dominate
    "square": 0.5,  # InternVL 2.5's square averaging: between tokens and samples
    "sample": 1.0,  # every sample alike: a one-word answer weighs as much as a caption
}


def loss_averaging_power(data_cfg) -> float:
    name = data_cfg.loss_averaging
    if name not in LOSS_AVERAGING:
        raise ValueError(f"config.data.loss_averaging={name!r}; use one of {sorted(LOSS_AVERAGING)}")
    return LOSS_AVERAGING[name]


class WeighSampleLoss:
    """Scales a sample's loss mask to n^-power on its n trained tokens (see LOSS_AVERAGING)."""

    def __init__(self, power: float):
        self.power = float(power)

    def __call__(self, sample: dict) -> dict:
        n = np.count_nonzero(sample["loss_mask"])
        if self.power and n:
            sample["loss_mask"] = (sample["loss_mask"] * np.float32(n) ** -self.power).astype(np.float32)
        return sample


# ----------------------------------------------------------------------------- iterators


class _SkipBadIterator(grain.DatasetIterator):
    """Drops bad-record markers; the next good sample carries how many were dropped."""

    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if BAD_RECORD in element:
                skipped += 1
                continue
            element["num_bad_records"] = skipped
            return element

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class SkipBadDataset(grain.IterDataset):
    """Drops bad-record markers, counting them into the next good sample's `num_bad_records`."""

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__())


def pack_pair_modalities(data_cfg) -> frozenset[int]:
    """The modality ids of `data.pack_pairs`: a row's samples of one of them become one sequence."""
    names = tuple(data_cfg.pack_pairs)
    unknown = [n for n in names if n not in records_lib.RECORD_MODALITIES]
    if unknown:
        raise ValueError(f"config.data.pack_pairs={names!r} names unknown modalities {unknown}; "
                         f"known: {records_lib.RECORD_MODALITIES}")
    return frozenset(modality_id(n) for n in names)


class JoinRowPairs:
    """Pair packing on a first-fit packed row (grain's `k`, `k_segment_ids`, `k_positions` per
    packed key): the row's samples of each of `modalities` (ids) become one sequence, one
    segment, so they attend to each other. The joined samples move next to each other, in their
    order, to where the first of them was (every packed key alike: the patches, clips and
    drawings follow their tokens); each sample's `positions` continue from the max before it
    + 1; a joined sample's last target becomes the next one's first token (its loss mask stays
    0: every sample's trained tokens and weights are as they were). `tokens_segment_ids` then
    numbers the sequences; the other keys' segment ids keep numbering the samples. A row with
    nothing to join is returned as it is."""

    def __init__(self, modalities: frozenset[int]):
        self.modalities = frozenset(modalities)

    def __call__(self, row: dict) -> dict:
        samples = row["tokens_segment_ids"]
        groups = self._groups(samples, row["modality"])
        if all(len(group) == 1 for group in groups):
            return row
        order = [s for group in groups for s in group]
        out = dict(row)
        for key in [k for k in row if f"{k}_segment_ids" in row]:
            ids = row[f"{key}_segment_ids"]
            index = np.concatenate([np.flatnonzero(ids == s) for s in order] + [np.flatnonzero(ids == 0)])
            for name in (key, f"{key}_segment_ids", f"{key}_positions"):
                out[name] = row[name][index]
        samples = out["tokens_segment_ids"]
        sequences = np.zeros_like(samples)
        positions, targets = out["positions"].copy(), out["targets"].copy()
        for number, group in enumerate(groups, 1):
            offset = 0
            for j, s in enumerate(group):
                idx = np.flatnonzero(samples == s)
                sequences[idx] = number
                positions[idx] += offset
                offset = int(positions[idx].max()) + 1
                if j + 1 < len(group):
                    targets[idx[-1]] = out["tokens"][idx[-1] + 1]
        out.update(tokens_segment_ids=sequences, positions=positions, targets=targets)
        return out

    def _groups(self, samples: np.ndarray, modality: np.ndarray) -> list[list[int]]:
        """The row's sequences in order of their first sample: the samples of a joined modality
        together, every other sample alone."""
        groups, joined = [], {}
        for s in np.unique(samples[samples > 0]):
            m = int(modality[np.argmax(samples == s)])
            if m not in self.modalities:
                groups.append([int(s)])
            elif m in joined:
                joined[m].append(int(s))
            else:
                joined[m] = [int(s)]
                groups.append(joined[m])
        return groups


class StatsIterator(grain.DatasetIterator):
    """Top of the pipeline: strips the per-batch counts and keeps running totals in its state."""

    def __init__(self, parent):
        super().__init__(parent)
        self._stats = {"batches": 0, "bad_records": 0, "truncated_docs": 0, "tokens": 0, "slots": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Running totals: batches, bad_records, truncated_docs, tokens (non-pad), slots (all)."""
        return dict(self._stats)

    def __next__(self):
        batch = next(self._parent)
        self._stats["batches"] += 1
        self._stats["bad_records"] += int(np.sum(batch.pop("num_bad_records")))
        self._stats["truncated_docs"] += int(np.sum(batch.pop("num_truncated")))
        self._stats["tokens"] += int(np.count_nonzero(batch["segment_ids"]))
        self._stats["slots"] += int(batch["segment_ids"].size)
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "stats": dict(self._stats)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._stats = dict(state["stats"])


class StatsDataset(grain.IterDataset):
    """The top of a pipeline: iterating it gives a `StatsIterator`."""

    def __iter__(self):
        return StatsIterator(self._parent.__iter__())


class ShardsIterator(grain.DatasetIterator):
    """This process's data shards side by side: each step, the shards' batches concatenated
    along dim 0 (shard order), so a global batch is the same on any number of processes."""

    def __init__(self, parents: Sequence[StatsIterator]):
        super().__init__(list(parents))

    @property
    def stats(self) -> dict[str, int]:
        """The shards' running totals, summed."""
        out: dict[str, int] = {}
        for parent in self._parents:
            for k, v in parent.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def __next__(self):
        batches = [next(parent) for parent in self._parents]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {"shards": [parent.get_state() for parent in self._parents]}

    def set_state(self, state):
        if len(state["shards"]) != len(self._parents):
            raise ValueError(f"the data iterator state has {len(state['shards'])} shards, this process reads "
                             f"{len(self._parents)}: resume with the same config.data.shards / process count")
        for parent, shard_state in zip(self._parents, state["shards"]):
            parent.set_state(shard_state)


def data_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards (of `num_shards`; 0: one per process) that process `process_index` reads."""
    num_shards = num_shards or process_count
    if num_shards % process_count:
        raise ValueError(f"config.data.shards={num_shards} is not a multiple of the {process_count} processes")
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def _finalize_row(row: dict) -> dict:
    """grain's packed row → our per-row format (+ the two counts, summed)."""
    positions = row["tokens_positions"]
    out = {k: row[k] for k in _SEQ_KEYS}
    out["segment_ids"] = row["tokens_segment_ids"]
    out["positions"] = np.repeat(positions[None], 3, axis=0)
    for k in COUNT_KEYS:
        out[k] = np.int32(sum(row[k]))
    return out


# ----------------------------------------------------------------------------- pipeline


def make_text_dataset(paths: Sequence[str] | grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                      packing_bins: int = 0, num_workers: int = 0, read_threads: int = 2,
                      loss_averaging_power: float = 0.0) -> grain.IterDataset:
    """Packed, batched text pipeline over ArrayRecord `paths` (or a MapDataset of records);
    iterate it for `StatsIterator`s.

    `batch_size` is this process's batch. `num_epochs=None` repeats forever
    (reshuffled each epoch); a finite run drops the last partial batch.
    `loss_averaging_power`: see LOSS_AVERAGING.
    """
    if isinstance(paths, grain.MapDataset):
        ds = paths[process_index::process_count].shuffle(seed)
    else:
        ds = make_record_dataset(paths, seed=seed, process_index=process_index, process_count=process_count)
    ds = ds.repeat(num_epochs).map(TokenizeRecord(tokenizer, seq_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    it = SkipBadDataset(it).map(WeighSampleLoss(loss_averaging_power))
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in _SEQ_KEYS},
        num_packing_bins=packing_bins or max(16, batch_size), seed=seed,
        shuffle_bins=True, meta_features=COUNT_KEYS)
    it = it.map(_finalize_row).batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # they are never parsed, so use the defaults
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return StatsDataset(it)


def text_records(config, split: str = "train") -> grain.MapDataset:
    """The records of the configured sources' text parts (mixed by their weights when several)."""
    parts = [part for part in sources.parts(config, split).values() if part.modality == "text"]
    if not parts:
        raise ValueError(f"config.data.sources ({sorted(config.data.sources)}) have no text part in split "
                         f"{split!r}; model.kind='llm' reads text only")
    if len(parts) == 1:
        return parts[0].records()
    return grain.MapDataset.mix([p.records() for p in parts], [p.weight for p in parts])


def make_train_iterator(config, tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> StatsIterator | ShardsIterator:
    """Infinite training iterator over the configured text sources for this process.

    Yields this process's batch (global `config.train.batch_size` / process
    count): its `config.data.shards` shards' batches side by side, each shard
    reading its own records (`records[shard::shards]`); `get_state()`/`set_state()`
    resume on exactly the same samples.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    data = config.data
    shards = data_shards(int(data.shards), process_index, process_count)
    num_shards = len(shards) * process_count
    global_batch = int(config.train.batch_size)
    if global_batch % num_shards:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {num_shards} data "
                         f"shards (config.data.shards={int(data.shards)}, {process_count} processes)")
    records = text_records(config, data.split)
    iterators = [iter(make_text_dataset(
        records, tokenizer, seq_len=int(data.seq_len), batch_size=global_batch // num_shards, seed=int(data.seed),
        process_index=shard, process_count=num_shards, num_epochs=None,
        packing_bins=int(data.packing_bins), num_workers=int(data.num_workers),
        read_threads=int(data.read_threads), loss_averaging_power=loss_averaging_power(data)))
        for shard in shards]
    return iterators[0] if len(iterators) == 1 else ShardsIterator(iterators)


def single_threaded_blas() -> None:
    """One BLAS thread in this process, for the pipeline's numpy work (the audio fbank's mel
    matmul): the pipeline's reader threads already fill the cores, and OpenBLAS's own thread
    pool on top of them oversubscribes the host (that 498×257 @ 257×80 matmul: 0.9 ms on one
    thread, 3–20 ms on its pool on a busy 2-core host). XLA's CPU backend does not use BLAS."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def make_global_batch(local_batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch → global jax.Arrays split over the mesh's batch axes (dim 0)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def packing_efficiency(batch: dict[str, Any]) -> float:
    """Fraction of token slots holding real (non-pad) tokens."""
    return float(np.mean(np.asarray(batch["segment_ids"]) != 0))

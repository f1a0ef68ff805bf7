"""The source interface and registry: config.data.sources (name -> {kind, ...}) -> named parts.

A source yields, per split ("train", "eval"), named parts; each part has a modality, a
weight within that modality (the mixture's factor) and its records: a `grain.MapDataset` of
omni records (`records.py`), in the source's own order, neither shuffled nor sharded (the
pipeline does both), opened on first use (so a generated source is written only when read).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Callable, Iterable, Iterator, Sequence

import grain

from m2omni_jax.data import records as records_lib

SPLITS = ("train", "eval")  # what a source provides
READ_SPLITS = SPLITS + ("validation",)  # what parts() reads; "validation" is held out of "train"


@dataclasses.dataclass(frozen=True)
class Part:
    """One named part of a source (a generated set: one of its tasks; a TFDS data set: itself)."""
    source: str  # the config.data.sources key it comes from
    modality: str  # records.RECORD_MODALITIES
    records: Callable[[], grain.MapDataset]  # opens (writes, downloads) the records on first call
    weight: float = 1.0  # factor within its modality (the modality weight is split by these)


class Source:
    """Base of a source kind: `parts(split)` is required; the rest have defaults."""

    def __init__(self, name: str, cfg, config):
        self.name, self.cfg, self.config = name, cfg, config

    def parts(self, split: str) -> dict[str, Part]:
        raise NotImplementedError

    def prepare(self, progress: bool = True) -> dict[str, str]:
        """Writes (once) whatever the source generates; returns {label: where} (m2omni-prepare-data)."""
        del progress
        return {}

    def tokenizer_texts(self) -> tuple[str, Iterable[str]] | None:
        """(a key naming the texts, the texts) the built-in tokenizer trains on, or None.

        Default: the first `tokenizer_records` training records (round-robin over the parts),
        as chat-template text; the key is the source's config."""
        num = int(self.cfg.get("tokenizer_records", 0))
        if num <= 0:
            return None
        key = json.dumps({"name": self.name, **self.cfg.to_dict()}, sort_keys=True, default=str)
        good = (r for r in round_robin([p.records() for p in self.parts("train").values()])
                if not records_lib.is_bad(r))
        return key, (records_lib.training_text(r) for r in itertools.islice(good, num))

    def field(self, key: str, default=None):
        """cfg[key]; without a default a missing or empty field is an error naming it."""
        value = self.cfg.get(key, default)
        if default is None and value in (None, ""):
            raise ValueError(f"config.data.sources.{self.name}.{key} is not set (kind {self.cfg.kind!r})")
        return value

    def single_part(self, split: str, records: Callable[[], grain.MapDataset]) -> dict[str, Part]:
        """One part named after the source, of the configured `modality` and `weight`."""
        modality = self.field("modality")
        if modality not in records_lib.RECORD_MODALITIES:
            raise ValueError(f"config.data.sources.{self.name}.modality={modality!r}; use one of "
                             f"{records_lib.RECORD_MODALITIES}")
        return {self.name: Part(self.name, modality, records, float(self.cfg.get("weight", 1.0)))}


_KINDS: dict[str, Callable[[str, object, object], Source]] = {}


def register_source(kind: str, factory: Callable[[str, object, object], Source]) -> None:
    """`factory(name, source_cfg, config) -> Source` builds sources of `kind`."""
    _KINDS[kind] = factory


def source_kinds() -> tuple[str, ...]:
    return tuple(sorted(_KINDS))


def make_sources(config) -> dict[str, Source]:
    """The sources of config.data.sources, in config order."""
    out = {}
    for name, cfg in config.data.sources.items():
        kind = cfg.get("kind", "")
        if kind not in _KINDS:
            raise ValueError(f"config.data.sources.{name}.kind={kind!r}; registered kinds: {source_kinds()} "
                             "(the built-in data set's kinds register when m2omni_jax.experiments is imported)")
        out[name] = _KINDS[kind](name, cfg, config)
    return out


def parts(config, split: str = "train") -> dict[str, Part]:
    """Every part of every configured source for `split`, in config then source order. The
    "validation" split is the last `validation_records(config)` records of each training part,
    and "train" then leaves them out."""
    if split not in READ_SPLITS:
        raise ValueError(f"config.data.split={split!r}; use one of {READ_SPLITS}")
    held_out = validation_records(config)
    if split == "validation" and not held_out:
        raise ValueError("the validation split is held out of the training data only for the dynamic balance "
                         "(config.balance.strategy='dynamic')")
    out: dict[str, Part] = {}
    for name, source in make_sources(config).items():
        for part_name, part in source.parts("eval" if split == "eval" else "train").items():
            if part_name in out:
                raise ValueError(f"config.data.sources.{name} and .{out[part_name].source} both have a part "
                                 f"named {part_name!r}; rename one source")
            out[part_name] = _hold_out(part_name, part, held_out, split) if held_out and split != "eval" else part
    return out


def validation_records(config) -> int:
    """Training records per part held out for the dynamic balance's validation passes: Σ Sᵢ·Bᵢ
    of the paper, Sᵢ = `balance.dynamic.val_batches` batches of Bᵢ = `val_batch_size` (the same
    for every modality here); 0 for the other strategies."""
    if config.balance.strategy != "dynamic":
        return 0
    return int(config.balance.dynamic.val_batches) * int(config.balance.dynamic.val_batch_size)


def _hold_out(name: str, part: Part, num: int, split: str) -> Part:
    """The part's last `num` records ("validation") or the others ("train")."""
    def records():
        all_records = part.records()
        if len(all_records) <= num:
            raise ValueError(f"part {name!r} of config.data.sources.{part.source} has {len(all_records)} training "
                             f"records; the dynamic balance holds out {num} of each part for its validation "
                             "passes (balance.dynamic.val_batches × val_batch_size): lower those or add data")
        cut = len(all_records) - num
        return all_records[cut:] if split == "validation" else all_records[:cut]
    return dataclasses.replace(part, records=records)


def part_records(config, split: str, *, modalities: Sequence[str] | None = None,
                 names: Sequence[str] | None = None) -> list[grain.MapDataset]:
    """The records of the parts of `split` with one of `modalities` / `names` (None: any)."""
    return [p.records() for name, p in parts(config, split).items()
            if (modalities is None or p.modality in modalities) and (names is None or name in names)]


def round_robin(datasets: Sequence[grain.MapDataset]) -> Iterator[dict]:
    """Record 0 of each dataset, then record 1 of each, ...; a spent dataset drops out."""
    for index in itertools.count():
        live = [ds for ds in datasets if index < len(ds)]
        if not live:
            return
        for ds in live:
            yield ds[index]


def eval_records(config, num_samples: int, *, modalities: Sequence[str] | None = None,
                 names: Sequence[str] | None = None) -> list[dict]:
    """The first `num_samples` held-out records ("eval" split) of the configured sources,
    round-robin over their parts; `modalities` / `names` (part names) select parts (None:
    every part but text). Unreadable records are left out."""
    if modalities is None:
        modalities = [m for m in records_lib.RECORD_MODALITIES + ("image_gen",) if m != "text"]
    good = (r for r in round_robin(part_records(config, "eval", modalities=modalities, names=names))
            if not records_lib.is_bad(r))
    return list(itertools.islice(good, num_samples))


def tokenizer_texts(config) -> tuple[str, Iterator[str]]:
    """(key, texts): the training texts the configured sources give the built-in tokenizer."""
    keys, texts = [], []
    for source in make_sources(config).values():
        given = source.tokenizer_texts()
        if given is not None:
            keys.append(given[0])
            texts.append(given[1])
    if not keys:
        raise ValueError(f"config.tokenizer.path is empty and no source of config.data.sources "
                         f"({sorted(config.data.sources)}) gives tokenizer training text")
    return "|".join(keys), itertools.chain(*texts)


class SafeDecode:
    """`decode` with read errors turned into the bad-record marker (skipped and counted);
    a class, not a closure, so grain's worker processes can pickle it."""

    def __init__(self, decode: Callable):
        self.decode = decode

    def __call__(self, raw):
        try:
            return self.decode(raw)
        except records_lib.READ_ERRORS:
            return records_lib.bad_record()

"""Source kind `array_record`: ArrayRecord files of serialised omni records (`records.py`).

    config.data.sources.mine = dict(kind="array_record", modality="image",
                                    train_files="/data/mine/train-*.array_record",
                                    eval_files="/data/mine/eval-*.array_record")
"""
from __future__ import annotations

import bisect
import glob
import itertools
import os
from typing import Sequence

import grain
from absl import logging
from etils import epath

from m2omni_jax import faults, workdir
from m2omni_jax.data import mirror
from m2omni_jax.data import records as records_lib
from m2omni_jax.data.sources.base import Part, SafeDecode, Source, register_source


def expand_files(patterns: str, field: str) -> list[str]:
    """Comma-separated paths or glob patterns -> sorted existing local files (an empty match is
    an error). Files on a bucket (gs://...) are copied once to the local mirror (`data.mirror`):
    ArrayRecord reads local files only."""
    files = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = _glob(pattern)
        if not matched:
            raise FileNotFoundError(f"{field}={pattern!r} matches no file")
        files += [mirror.fetch_file(f) for f in matched]
    return files


def _glob(pattern: str) -> list[str]:
    if not workdir.is_url(pattern):
        return sorted(glob.glob(os.path.expanduser(pattern)))
    folder, name = pattern.rsplit("/", 1)
    if any(c in folder for c in "*?["):
        raise ValueError(f"{pattern!r}: on a bucket only the file name may hold a wildcard")
    return sorted(os.fspath(p) for p in epath.Path(folder).glob(name))


class ArrayRecordFiles:
    """A grain data source over ArrayRecord files, as `grain.sources.ArrayRecordDataSource`,
    that names the file a fault is in: a file that cannot be opened (a damaged footer) is a
    `RunError` naming it; a record in a damaged chunk reads as b"" (a bad record, skipped and
    counted downstream) with one warning per file."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [os.fspath(p) for p in paths]
        self._files = [_open(p) for p in self.paths]
        self._starts = list(itertools.accumulate((len(f) for f in self._files), initial=0))
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> bytes:
        i = bisect.bisect_right(self._starts, index) - 1
        try:
            return self._files[i][index - self._starts[i]]
        except RuntimeError as e:  # Riegeli: "Corrupted Riegeli/records file: ... at byte N"
            if self.paths[i] not in self._warned:
                self._warned.add(self.paths[i])
                logging.warning("%s: unreadable record %d, skipped (counted in data/bad_records): %s",
                                self.paths[i], index - self._starts[i], e)
            return b""

    def __repr__(self) -> str:
        return f"ArrayRecordFiles({len(self.paths)} files)"


def _open(path: str):
    try:
        return grain.sources.ArrayRecordDataSource([path])
    except (RuntimeError, OSError, ValueError) as e:
        raise faults.RunError(f"cannot open ArrayRecord file {path}: {' '.join(str(e).split()) or type(e).__name__}"
                              ) from e


class ArrayRecordSource(Source):
    """Fields: modality, train_files, eval_files (comma-separated globs; empty: no such split),
    weight (factor within the modality), tokenizer_records."""

    def parts(self, split: str) -> dict[str, Part]:
        patterns = self.cfg.get(f"{split}_files", "")
        if not patterns:
            return {}
        field = f"config.data.sources.{self.name}.{split}_files"

        def records():
            source = ArrayRecordFiles(expand_files(patterns, field))
            return grain.MapDataset.source(source).map(SafeDecode(records_lib.decode_record))
        return self.single_part(split, records)


register_source("array_record", ArrayRecordSource)

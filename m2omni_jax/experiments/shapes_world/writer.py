"""Writes the shapes world to ArrayRecord files, one per split, plus a manifest.

Each record is `shapes_world.encode_record(...)` bytes; read them back with
`open_split(out_dir, split)[i]` and `shapes_world.decode_record`.

  python -m m2omni_jax.experiments.shapes_world.writer --out_dir /data/shapes_world \
      --num_train 20000 --num_eval 1000 [--tfds_data_dir /data/tfds]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import multiprocessing
import os
from typing import Iterable, Sequence

from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from m2omni_jax.experiments.shapes_world import world as sw

MANIFEST = "manifest.json"
# group_size:1 keeps every record in its own chunk: fast random access.
_WRITER_OPTIONS = "group_size:1"
_CHUNK = 64  # records per task sent to a worker
_MIN_RECORDS_PER_WORKER = 256  # below this a split is written in this process


def split_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f"shapes_world-{split}.array_record")


def open_split(out_dir: str, split: str) -> ArrayRecordDataSource:
    """Random-access source of encoded records (bytes) of one split."""
    return ArrayRecordDataSource(split_path(out_dir, split))


def _manifest(seed: int, num_train: int, num_eval: int, tasks: Sequence[str]) -> dict:
    return {"name": "shapes_world", "version": sw.DATA_VERSION, "seed": seed,
            "tasks": list(tasks), "num_examples": {"train": num_train, "eval": num_eval},
            "encoding": "msgpack map, media as PNG: m2omni_jax.experiments.shapes_world.world.decode_record"}


def _read_manifest(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def dataset_key(seed: int, num_train: int, num_eval: int, tasks: Sequence[str]) -> str:
    """A directory name per generated variant, so configs that differ in seed, counts or
    tasks (or a new DATA_VERSION) never rewrite the files another run is reading."""
    digest = hashlib.sha1(json.dumps([sw.DATA_VERSION, list(tasks)]).encode()).hexdigest()[:8]
    return f"v{sw.DATA_VERSION}-seed{seed}-train{num_train}-eval{num_eval}-{digest}"


def _write_split(path: str, records: Iterable[bytes], total: int, progress: bool) -> None:
    tmp = f"{path}.tmp{os.getpid()}"  # concurrent writers of one variant do not collide
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
        for data in tqdm(records, total=total, desc=os.path.basename(path), disable=not progress):
            writer.write(data)
    finally:
        writer.close()
    os.replace(tmp, path)


def _encoded_record(seed: int, split: str, tasks: tuple[str, ...], index: int) -> bytes:
    return sw.encode_record(sw.make_record(seed, split, index, tasks))


def write_shapes_world(out_dir: str, *, seed: int = 0, num_train: int, num_eval: int,
                       tasks: Sequence[str] = sw.TASKS, progress: bool = True,
                       num_workers: int | None = None) -> dict:
    """Writes `train`/`eval` ArrayRecord files; a no-op when `out_dir` already
    holds the same version, seed, counts and tasks. Returns the manifest.

    num_workers: processes rendering records (None: the CPU count, at most 8); the
    files do not depend on it."""
    unknown = set(tasks) - set(sw.TASKS)
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known tasks are {sw.TASKS}")
    manifest = _manifest(seed, num_train, num_eval, tasks)
    paths = {split: split_path(out_dir, split) for split in sw.SPLITS}
    if _read_manifest(out_dir) == manifest and all(map(os.path.exists, paths.values())):
        return manifest
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):  # an interrupted rewrite must not look complete
        os.remove(manifest_path)
    workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
    for split, path in paths.items():
        total = manifest["num_examples"][split]
        encode = functools.partial(_encoded_record, seed, split, tuple(tasks))
        if workers <= 1 or total < _MIN_RECORDS_PER_WORKER * 2:
            _write_split(path, map(encode, range(total)), total, progress)
            continue
        # Spawned workers render and PNG-encode; this process writes in index order, so the
        # file is byte-identical to a one-process write. Spawn, not fork: JAX may be loaded.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            _write_split(path, pool.map(encode, range(total), chunksize=_CHUNK), total, progress)
    with open(f"{manifest_path}.tmp{os.getpid()}", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(f"{manifest_path}.tmp{os.getpid()}", manifest_path)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=20_000)
    parser.add_argument("--num_eval", type=int, default=1_000)
    parser.add_argument("--tasks", default=",".join(sw.TASKS), help="comma-separated")
    parser.add_argument("--num_workers", type=int, default=None, help="rendering processes (default: CPUs, ≤ 8)")
    parser.add_argument("--tfds_data_dir", default=None,
                        help="also prepare the TFDS `shapes_world` data set here")
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    print(write_shapes_world(args.out_dir, seed=args.seed, num_train=args.num_train,
                             num_eval=args.num_eval, tasks=tasks, num_workers=args.num_workers))
    if args.tfds_data_dir:
        from m2omni_jax.experiments.shapes_world import tfds_builder as shapes_world_tfds

        config = shapes_world_tfds.make_config(
            seed=args.seed, num_train=args.num_train, num_eval=args.num_eval, tasks=tasks)
        builder = shapes_world_tfds.prepare(args.tfds_data_dir, config=config)
        print(f"TFDS: tfds.data_source('shapes_world/{config.name}', data_dir=...) at",
              builder.data_dir)


if __name__ == "__main__":
    main()

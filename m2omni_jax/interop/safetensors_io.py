"""The safetensors file format, read and written with numpy alone (no torch).

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} (plus "__metadata__"), then the raw little-endian tensor bytes. Files are
memory-mapped, so a sharded multi-GB checkpoint is read tensor by tensor on demand.
A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class TensorFolder(Mapping):
    """{tensor name: np.ndarray} of a folder's safetensors files, memory-mapped lazily."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{INDEX_FILE} in {folder} lists {name}, which is missing")
            header, start = read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._where[key] = (path, info, start)

    def __getitem__(self, key: str) -> np.ndarray:
        path, info, start = self._where[key]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which we do not read")
        begin, end = info["data_offsets"]
        if end == begin:  # an empty tensor: nothing to map
            return np.zeros(info["shape"], DTYPES[info["dtype"]])
        raw = np.memmap(path, np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_header(path: str) -> tuple[dict, int]:
    """(header, byte offset of the data) of one safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return header, 8 + size


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file (written under a temporary name, then renamed)."""
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, array in arrays.items():
        if array.dtype not in NAMES:
            raise ValueError(f"tensor {name} has dtype {array.dtype}, which safetensors does not store")
        header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data start 8-byte aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.tobytes())  # native order: little-endian on every platform JAX runs on
    os.replace(tmp, path)


def write_folder(folder: str, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 5 << 30) -> list[str]:
    """`model.safetensors`, or shards of at most `max_shard_bytes` (one tensor may exceed it)
    with their index, as `save_pretrained` writes them; returns the files written."""
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        write_file(os.path.join(folder, SINGLE_FILE), shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_file(os.path.join(folder, name), shard)
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_FILE]

"""Data directories on a bucket (`config.data.dir=gs://...`): a local mirror for ArrayRecord.

ArrayRecord reads and writes local files only (open-source Riegeli has no GCS reader:
google/array_record#120), so a data directory that is a URL is worked on through a local copy
under `~/.cache/m2omni_jax/mirror/<scheme>/<bucket>/<path>`:

    with mirror.mirrored("gs://bucket/data/my_corpus") as local:
        write_corpus(local, ...)   # a no-op when the bucket already held it
    read(local)

On entry the bucket's files are fetched where the local copy lacks them (or differs in size);
on a clean exit process 0 uploads what the bucket lacks, `*.json` manifests last, so an
interrupted upload never looks complete to the next reader. Local paths pass through
unchanged. Data is thus written once (`m2omni-prepare-data`, or the first run) and every
other host or run copies it down instead of generating it again.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
from etils import epath

from m2omni_jax import workdir

DEFAULT_MIRROR_DIR = "~/.cache/m2omni_jax/mirror"


def local_path(path: str, mirror_dir: str = "") -> str:
    """`path` itself when local (user expanded), else its place in the local mirror."""
    if not workdir.is_url(path):
        return os.path.expanduser(os.fspath(path))
    scheme, rest = os.fspath(path).split("://", 1)
    return os.path.join(os.path.expanduser(mirror_dir or os.environ.get("M2OMNI_MIRROR_DIR", DEFAULT_MIRROR_DIR)),
                        scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")])


def _files(root: epath.Path) -> dict[str, epath.Path]:
    """Relative name -> path of every file under `root` (none when it does not exist)."""
    if not root.exists():
        return {}
    found = {}
    for child in root.iterdir():
        if child.is_dir():
            found.update({f"{child.name}/{name}": p for name, p in _files(child).items()})
        else:
            found[child.name] = child
    return found


def _size(path: epath.Path) -> int:
    return path.stat().length


def _copy(files: dict[str, epath.Path], names, target: epath.Path) -> int:
    """Copies `files[name]` to `target/name` for `names`, `*.json` last; returns the count."""
    names = sorted(names, key=lambda n: (n.endswith(".json"), n))
    for name in names:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(files[name].read_bytes())
    return len(names)


def _differing(source: dict[str, epath.Path], target: dict[str, epath.Path]) -> list[str]:
    """Names in `source` that `target` lacks or holds with another size."""
    return [n for n, p in source.items() if n not in target or _size(target[n]) != _size(p)]


def fetch_dir(url: str, local: str) -> int:
    """Copies the files of `url` that `local` lacks (or holds with another size); the count."""
    remote, here = _files(epath.Path(url)), _files(epath.Path(local))
    return _copy(remote, _differing(remote, here), epath.Path(local))


def upload_dir(local: str, url: str) -> int:
    """Copies the files of `local` that `url` lacks (or holds with another size), manifests
    (`*.json`) last; the count. Temporary files of an interrupted writer (`*.tmp*`) stay."""
    here = {n: p for n, p in _files(epath.Path(local)).items() if ".tmp" not in n}
    return _copy(here, _differing(here, _files(epath.Path(url))), epath.Path(url))


@contextlib.contextmanager
def mirrored(path: str, mirror_dir: str = "") -> Iterator[str]:
    """A local directory standing for `path` (see the module doc): `path` itself when local."""
    local = local_path(path, mirror_dir)
    if not workdir.is_url(path):
        yield local
        return
    os.makedirs(local, exist_ok=True)
    fetch_dir(path, local)
    yield local
    if jax.process_index() == 0:
        upload_dir(local, path)


def fetch_file(url: str, mirror_dir: str = "") -> str:
    """A local copy of one file (`url` itself when local), fetched once (again if its size changed)."""
    local = local_path(url, mirror_dir)
    if workdir.is_url(url):
        remote, here = epath.Path(url), epath.Path(local)
        if not here.exists() or _size(here) != _size(remote):
            here.parent.mkdir(parents=True, exist_ok=True)
            tmp = epath.Path(f"{local}.tmp{os.getpid()}")
            tmp.write_bytes(remote.read_bytes())
            os.replace(tmp, local)
    return local

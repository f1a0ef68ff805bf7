"""A training run's workdir: created and test-written at start-up, and locked so that one
run at a time writes it (`<workdir>/run.lock`: an fcntl lock held for the process's life,
holding "pid host"; the kernel drops it when the process dies, so a stale lock file of a dead
run is simply taken over). Cloud URLs (gs://, s3://) are test-written but not locked.

Paths: a workdir is a local path or a URL (gs://bucket/run); files in it go through
`etils.epath` (as Orbax does), never `open` / `os.path`, so both work: `path(workdir, "x.json")`;
`resolve` puts a relative path (init_from) under a workdir URL, `local_file` serves writers that
take local paths only (WAVs).
Object stores cannot append: `RewrittenFile` keeps what was written and rewrites the whole
object on `flush` (metrics.jsonl and TensorBoard event files on a bucket).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import socket
import tempfile
import uuid

import jax
from etils import epath

from m2omni_jax import faults

LOCK_FILE = "run.lock"
_held: dict[str, int] = {}  # workdir -> the locked file's descriptor, for this process's life


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def local_or_url(path: str) -> str:
    """An absolute local path, or a URL (gs://bucket/run) unchanged (never `./gs:/bucket/run`)."""
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def path(workdir, *parts: str) -> epath.Path:
    """`workdir/parts...` as an `epath.Path` (local or URL)."""
    return epath.Path(workdir).joinpath(*parts)


def resolve(path_or_url: str, base: str) -> str:
    """`path_or_url` unchanged when it is a URL or absolute, else relative to `base` (a local
    path or a URL); `..` folded either way (`os.path.normpath` would fold gs:// into gs:/)."""
    if is_url(path_or_url):
        return path_or_url
    if os.path.isabs(path_or_url) or not is_url(base):
        return os.path.normpath(os.path.join(base, path_or_url))
    scheme, rest = os.fspath(base).split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path_or_url))}"


@contextlib.contextmanager
def local_file(file):
    """A local path to hand a writer that takes paths only (`wave`, soundfile): `file` itself
    when local (its folder created), else a temporary file copied to the URL on success."""
    if not is_url(file):
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        yield os.fspath(file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, epath.Path(file).name)
        yield local
        target = epath.Path(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(epath.Path(local).read_bytes())


class RewrittenFile:
    """A write-only file for object stores: `write` collects, `flush` writes the object whole
    (with what it held when opened, for "a"). Text or bytes, as the first write."""

    def __init__(self, file, mode: str = "a"):
        self._path = epath.Path(file)
        self._chunks = [self._path.read_bytes()] if mode.startswith("a") and self._path.exists() else []
        self._dirty = mode.startswith("w")

    def write(self, data) -> int:
        self._chunks.append(data.encode() if isinstance(data, str) else bytes(data))
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if self._dirty:
            self._path.write_bytes(b"".join(self._chunks))
            self._dirty = False

    def close(self) -> None:
        self.flush()


def open_for_append(file):
    """A local file opened to append, or a `RewrittenFile` for a URL."""
    return RewrittenFile(file) if is_url(file) else open(file, "a", encoding="utf-8")


def _prepare_url(workdir: str) -> None:
    try:
        directory = epath.Path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # each backend (gcsfs, tf.io.gfile, s3fs) raises its own errors
        raise faults.RunError(f"workdir {workdir} is not writable: {type(e).__name__}: {e}") from e


def prepare(workdir: str) -> None:
    """Creates `workdir`, checks it is writable and (process 0, local) locks it; idempotent."""
    if workdir in _held:
        return
    if is_url(workdir):
        if jax.process_index() == 0:
            _prepare_url(workdir)
        _held[workdir] = -1  # tested once; object stores have no locks
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise faults.RunError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
    if jax.process_index() == 0:
        _held[workdir] = lock(workdir)


def lock(workdir: str) -> int:
    """Takes `<workdir>/run.lock` or raises naming the run holding it."""
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        pid, host = (holder + ["?", "?"])[:2]
        raise faults.RunError(f"workdir {workdir} in use by pid {pid} on host {host} "
                              f"(its lock: {os.path.join(workdir, LOCK_FILE)})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd

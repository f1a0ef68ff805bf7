"""A training run's workdir: created and test-written at start-up, and locked so that one
run at a time writes it (`<workdir>/run.lock`: an fcntl lock held for the process's life,
holding "pid host"; the kernel drops it when the process dies, so a stale lock file of a dead
run is simply taken over). Cloud URLs (gs://, s3://) are neither tested nor locked.
"""
from __future__ import annotations

import fcntl
import os
import socket

import jax

from m2omni_jax import faults

LOCK_FILE = "run.lock"
_held: dict[str, int] = {}  # workdir -> the locked file's descriptor, for this process's life


def prepare(workdir: str) -> None:
    """Creates `workdir`, checks it is writable and (process 0) locks it; idempotent."""
    if "://" in workdir or workdir in _held:
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

"""Checkpointing (Orbax) and preemption handling.

A checkpoint at step N is a directory `<directory>/N/` with up to three items:

  state      the train state pytree (`ocp.args.StandardSave`): each array is
             written by the processes that own its shards and restored
             straight into the sharding its abstract leaf carries.
  data_iter  the grain iterator position (grain's own Orbax handler, one
             JSON file per process: `process_<i>-of-<n>.json`).
  extra      small JSON metadata (balance weights, config hash, ...).

Typed PRNG keys (`jax.random.key`) and raw uint32 key data both round-trip:
Orbax >= 0.12 stores the key implementation alongside the key data.

Saves are asynchronous by default: `save` returns once the arrays are copied
off the devices and the iterator state is captured; the write finishes in the
background. Call `wait()` (or `close()`) before the process exits.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import signal
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from m2omni_jax import faults

try:  # grain's Orbax handler is only defined when orbax is importable.
    from grain.checkpoint import CheckpointRestore as GrainRestore, CheckpointSave as GrainSave
except ImportError:  # pragma: no cover
    GrainSave = GrainRestore = None

log = logging.getLogger(__name__)

# Files Orbax writes into a step directory only when the save has committed.
_COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")


class Checkpointer:
    """Saves every `save_every` steps, keeps the newest `keep`, restores sharded."""

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if save_every <= 0 or keep <= 0:
            raise ValueError(f"save_every and keep must be positive, got {save_every=} {keep=}")
        self.directory = _as_path(directory)
        self.save_every = save_every
        _quarantine_incomplete_steps(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of saves killed mid-write
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False
        atexit.register(self.close)

    def latest_step(self) -> int | None:
        """Newest step saved (an async one counts from the moment `save` returns)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0 and step not in self._manager.all_steps()

    def save(self, step: int, state, data_iterator=None, *, extra: dict | None = None,
             force: bool = False) -> bool:
        """Saves if `step` is due (or `force`) and not saved already; returns whether it saved."""
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data_iter"] = _grain_args(GrainSave, data_iterator)
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(to_json(extra))
        # `force=True`: this class owns the save decision, not Orbax's interval policy.
        with self._save_errors(step):
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def check(self):
        """Raises a `RunError` at once if a background save has failed (call it every step)."""
        with self._save_errors():
            self._manager.check_for_errors()

    @contextlib.contextmanager
    def _save_errors(self, step: int | None = None):
        """A failed save (full disk, lost permissions) becomes one `RunError` with its cause."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (Orbax re-raises whatever the writer raised)
            what = f"step {step}" if step is not None else "a checkpoint"
            raise faults.RunError(f"saving {what} to {self.directory} failed: {_one_line(e)}") from e

    def restore(self, abstract_state, data_iterator=None, step: int | None = None) -> tuple[Any, dict]:
        """Restores `(state, extra)` from `step` (default: the newest readable one; newer
        unreadable ones, e.g. a truncated array file, are renamed `<step>.unreadable-<time>`).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` whose `.sharding`
        says where each restored array goes. `data_iterator`, when given, is
        set to the saved position in place.
        """
        self._manager.wait_until_finished()
        _check_shardings(abstract_state)
        if step is not None:
            return self._restore_step(step, abstract_state, data_iterator)
        return self._restore_newest_readable(abstract_state, data_iterator)

    def _restore_newest_readable(self, abstract_state, data_iterator) -> tuple[Any, dict]:
        """The newest step that restores; unreadable newer ones are set aside once an older
        one restored (so a config that fits no checkpoint renames none of them)."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        failed = []
        for step in steps:
            try:
                restored = self._restore_step(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001  (whatever a damaged file raises)
                cause = _one_line(e)
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the next older one",
                            step, self.directory, cause)
                failed.append((step, cause))
                continue
            for bad_step, cause in failed:
                self._set_aside(bad_step, cause)
            return restored
        newest, cause = failed[0]
        raise faults.RunError(f"no readable checkpoint in {self.directory} ({len(failed)} tried); the newest, "
                              f"step {newest}: {cause}")

    def _set_aside(self, step: int, cause: str):
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable-{int(time.time())}"
        log.warning("checkpoint %s is unreadable (%s); moved to %s", source, cause, target)
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"m2omni_checkpoint_set_aside_{step}")
        self._manager.reload()

    def _restore_step(self, step: int, abstract_state, data_iterator) -> tuple[Any, dict]:
        present = {p.name for p in (self.directory / str(step)).iterdir()}
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if "data_iter" not in present:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data iterator state")
            items["data_iter"] = _grain_args(GrainRestore, data_iterator)
        if "extra" in present:
            items["extra"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        extra = restored["extra"] if "extra" in present else None
        return restored["state"], extra or {}

    def wait(self):
        """Blocks until the in-flight save (if any) has committed."""
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self):
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def to_json(tree) -> Any:
    """Converts numpy / jax values in a nested dict/list to plain JSON types."""
    def default(x):
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"checkpoint `extra` holds a {type(x).__name__}, which is not JSON-serializable")
    return json.loads(json.dumps(tree, default=default))


def _one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` characters (tensorstore's run long)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _as_path(directory) -> epath.Path:
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _grain_args(cls, iterator):
    if cls is None:  # pragma: no cover
        raise ImportError("checkpointing a data iterator needs grain (grain.checkpoint)")
    return cls(iterator)


def _check_shardings(abstract_state):
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
               if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None]
    if missing:
        raise ValueError(f"abstract_state leaves without a sharding (restore would not know where to "
                         f"put them): {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _quarantine_incomplete_steps(directory: epath.Path):
    """Renames step dirs that never committed, so Orbax does not list them as steps.

    Orbax treats any `<int>/` dir on a local filesystem as final (commits are
    atomic renames), so a dir left by a crashed copy or a hand-made one would
    otherwise become the "latest" step and block a later save of that step.
    It is renamed, not deleted. Process 0 renames; all processes then sync.
    """
    if jax.process_index() == 0 and directory.exists():
        for path in directory.iterdir():
            if path.name.isdigit() and path.is_dir() and not any((path / m).exists() for m in _COMMIT_MARKERS):
                target = path.parent / f"{path.name}.incomplete-{int(time.time())}"
                log.warning("checkpoint %s has no commit marker; moving it to %s", path, target)
                path.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("m2omni_checkpoint_quarantine")


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the training loop polls.

        with StopSignal() as stop:
            for step in ...:
                ...
                if stop.should_stop(step):
                    ckpt.save(step, state, it, force=True); ckpt.wait(); break

    A second signal restores the previous handlers and re-delivers itself,
    so pressing Ctrl-C twice still kills a stuck process.

    Multi-host: every process must stop at the same step, or the forced save
    deadlocks, so `should_stop` is a collective there (call it on every
    process every step) and answers only what all processes agree on:
      * with JAX's preemption service (`jax.distributed.initialize` on a
        platform that has it) it is `reached_preemption_sync_point(step)`, and
        SIGTERM is left to JAX's own notifier (only SIGINT is caught here);
      * otherwise the local flags are all-gathered every `sync_every` steps.
    """

    def __init__(self, sync_every: int = 10):
        self.requested = False  # this process got a signal
        self.signum: int | None = None
        self.sync_every = sync_every
        self._agreed = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignal":
        signals = [signal.SIGINT]
        if not (jax.process_count() > 1 and _preemption_sync_available()):
            signals.append(signal.SIGTERM)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop being graceful
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.requested, self.signum = True, signum
        log.warning("received %s; will checkpoint and stop after this step", signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested (agreed by all processes in multi-host runs)."""
        if jax.process_count() == 1:
            return self.requested
        if _preemption_sync_available():
            self._agreed = self._agreed or multihost_utils.reached_preemption_sync_point(step)
        elif step % self.sync_every == 0:
            flags = multihost_utils.process_allgather(np.asarray(self.requested))
            self._agreed = bool(np.any(flags))
        return self._agreed

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def _preemption_sync_available() -> bool:
    from jax._src import distributed  # the sync manager has no public accessor
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def load_params(directory, abstract_params, step: int | None = None,
                include: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """Parameters from another run's checkpoint (a stage starting from the previous stage).

    `directory` is that run's `<workdir>/checkpoints` (or its workdir). Only
    `state/params` is read, straight into the shardings of `abstract_params`
    (ShapeDtypeStructs); leaves the checkpoint lacks, or holds with another
    shape, are left out and named in the second return value (e.g. a tower
    added in this stage), so the caller keeps their fresh initialisation.
    `include`: path regexes (e.g. "^vision/"); when given, only matching leaves are read.
    """
    root = _checkpoints_dir(directory)
    steps = committed_steps(root)
    if not steps:
        raise FileNotFoundError(f"init_from: no complete checkpoint in {root}")
    step = steps[-1] if step is None else step
    path = root / str(step) / "state"
    saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree.get("params", {})
    saved_flat = {k: v for k, v in _flatten(saved)}
    wanted, missing = {}, []
    patterns = [re.compile(p) for p in include]
    for key, leaf in _flatten(abstract_params):
        if patterns and not any(p.search("/".join(key)) for p in patterns):
            missing.append("/".join(key))
            continue
        meta = saved_flat.get(key)
        if meta is not None and tuple(meta.shape) == tuple(leaf.shape):
            wanted[key] = leaf
        else:
            missing.append("/".join(key))
    if not wanted:
        log.warning("init_from %s step %d: no parameter fits this model; all %d kept fresh", root, step, len(missing))
        return {}, missing
    item = {"params": _unflatten(wanted)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    log.info("init_from %s step %d: %d tensors loaded, %d kept fresh", root, step, len(wanted), len(missing))
    return restored["params"], missing


def _checkpoints_dir(directory):
    root = _as_path(directory)
    return root / "checkpoints" if (root / "checkpoints").exists() else root


def committed_steps(directory) -> list[int]:
    """The steps of the complete checkpoints in `directory` (a run's `checkpoints` or its workdir), sorted."""
    root = _checkpoints_dir(directory)
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_committed(p))


def _is_committed(step_dir) -> bool:
    return any((step_dir / marker).exists() for marker in _COMMIT_MARKERS)


def _flatten(tree):
    """(key tuple, leaf) pairs of a nested dict, e.g. (("vision", "out", "kernel"), leaf)."""
    return traverse_util.flatten_dict(tree).items()


def _unflatten(flat: dict) -> dict:
    """The nested dict of {key tuple: leaf}: the inverse of `_flatten`."""
    return traverse_util.unflatten_dict(flat)

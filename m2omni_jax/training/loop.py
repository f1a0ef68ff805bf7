"""The one training loop: omni/LLM training, vision-tower pre-training and alignment.

    loop = Loop(step_fn, data, LoopOptions.from_config(config), workdir, to_global=...,
                callbacks=[...])
    state, metrics = loop.run(state)

What every run shares lives here:
  * resume from the latest checkpoint of `<workdir>/checkpoints`: the train state, the
    data iterator's position and the extra JSON (callbacks' state, the non-finite count);
  * a checkpoint every `checkpoint_every` steps, at the end, and on SIGTERM / SIGINT
    (`checkpointing.StopSignal`);
  * non-finite steps: a step function built with `train_step.skip_nonfinite` keeps the
    state before a step whose loss or gradient norm is not finite (only the step counter
    moves on, past the batch) and reports it; the loop counts them and stops with an error
    after `max_nonfinite_steps` in a row, leaving the last checkpoint as it was;
  * one metrics line per `log_every` steps (`MetricLogger`) with throughput and MFU.

What differs between runs is a `Callback` (periodic evaluation, the dynamic balancer,
held-out losses at the end), the step function, the batch source and `metrics_fn`
(per-run metric post-processing), never a copy of the loop.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from m2omni_jax import faults
from m2omni_jax import workdir as workdir_lib
from m2omni_jax.training import checkpointing, metrics_logging

NONFINITE_KEY = "finite"  # the bool a `train_step.skip_nonfinite` step adds to its metrics
SKIPPED_KEY = "train/skipped_nonfinite"  # the logged count of skipped steps, over the whole run


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    steps: int
    log_every: int
    checkpoint_every: int
    checkpoint_keep: int = 1
    async_checkpoint: bool = True
    max_nonfinite_steps: int = 10  # consecutive non-finite steps before the run stops with an error

    @classmethod
    def from_config(cls, config) -> "LoopOptions":
        """From config.train (steps, log_every, max_nonfinite_steps) and config.checkpoint."""
        options = cls(steps=int(config.train.steps), log_every=int(config.train.log_every),
                      checkpoint_every=int(config.checkpoint.every), checkpoint_keep=int(config.checkpoint.keep),
                      async_checkpoint=bool(config.checkpoint.async_save),
                      max_nonfinite_steps=int(config.train.max_nonfinite_steps))
        if options.max_nonfinite_steps < 1:
            raise ValueError(f"config.train.max_nonfinite_steps={options.max_nonfinite_steps} must be at least 1")
        return options


class Callback:
    """What differs between runs. Every method is optional.

    `label`: None puts `after_step`'s metrics into every training log line from then on
    (balance weights); a label ("eval") records them at once as a line of their own.
    Time spent in `after_step` is left out of the throughput.
    """
    label: str | None = None

    def restore(self, extra: Mapping[str, Any]) -> None:
        """Reads back what `checkpoint_extra` saved (the checkpoint's extra JSON)."""

    def checkpoint_extra(self) -> Mapping[str, Any]:
        """JSON merged into every checkpoint's extra item."""
        return {}

    def after_step(self, step: int, state) -> Mapping[str, float] | None:
        """After every step (`step` steps done); metrics to log, or None."""
        return None

    def update_state(self, step: int, state) -> tuple[Any, Mapping[str, float] | None]:
        """After every step: (the train state from now on, metrics to log or None). For a
        callback that owns part of the state (the dynamic balance's optimizer state); the
        default leaves it alone and logs `after_step`'s metrics."""
        return state, self.after_step(step, state)

    def finish(self, state) -> Mapping[str, Any]:
        """After the last step (not after a stop request); merged into `run`'s result."""
        return {}


class Periodic(Callback):
    """`fn(state)` every `every` steps and at the last step, recorded as a `label` line."""

    def __init__(self, every: int, fn: Callable[[Any], Mapping[str, float]], last_step: int,
                 label: str = "eval"):
        if every <= 0:
            raise ValueError(f"Periodic: every={every} must be positive")
        self.every, self.fn, self.last_step, self.label = every, fn, last_step, label

    def after_step(self, step, state):
        if step % self.every == 0 or step == self.last_step:
            return self.fn(state)
        return None


@dataclasses.dataclass
class Throughput:
    """Items (tokens, images) per second, step time and MFU since the last report."""
    items_per_step: float = 0.0  # 0: no rate reported
    item: str = "tokens"
    flops_per_step: float = 0.0  # 0: no MFU
    peak_flops: float = 0.0  # all devices
    _start: float = 0.0
    _steps: int = 0

    def start(self):
        self._start, self._steps = time.perf_counter(), 0

    def tick(self):
        self._steps += 1

    def exclude(self, seconds: float):
        """Leaves `seconds` of non-step work (an evaluation) out of the next report."""
        self._start += seconds

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        out = {}
        if self.items_per_step:
            out[f"{self.item}_per_s"] = self._steps * self.items_per_step / elapsed
        out["step_time_s"] = elapsed / max(self._steps, 1)
        if self.flops_per_step and self.peak_flops:
            out["mfu"] = self._steps * self.flops_per_step / elapsed / self.peak_flops
        self.start()
        return out


def scalar_metrics(fetched: Mapping[str, Any], local_batch=None) -> dict[str, float]:
    """The default `metrics_fn`: the step's scalar metrics as floats (arrays are left out)."""
    del local_batch
    return {k: float(v) for k, v in fetched.items() if np.ndim(v) == 0}


def data_counts(data) -> dict[str, int]:
    """`data/bad_records` (skipped) and `data/truncated` (samples cut to seq_len) so far, from
    the iterator's running totals (`pipeline.StatsIterator.stats`), summed over processes;
    {} for a batch source without them."""
    stats = getattr(data, "stats", None)
    if not stats:
        return {}
    counts = np.asarray([stats.get("bad_records", 0), stats.get("truncated_docs", 0)], np.int64)
    if jax.process_count() > 1:  # every process logs the same steps, so this collective matches
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    return {"data/bad_records": int(counts[0]), "data/truncated": int(counts[1])}


class NonFiniteSteps:
    """Counts skipped (non-finite) steps; raises after `limit` in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.consecutive = limit, total, 0

    def observe(self, step: int, finite) -> None:
        if bool(finite):
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        logging.warning("step %d: loss or gradient norm not finite; the step was skipped (%d in a row)",
                        step, self.consecutive)
        if self.consecutive >= self.limit:
            raise faults.NonFiniteError(
                f"{self.consecutive} consecutive steps up to step {step} had a non-finite loss or gradient "
                f"norm (config.train.max_nonfinite_steps={self.limit}); the last checkpoint is the last "
                "good state: lower the learning rate or check the data, then resume")


class Loop:
    """Steps until `options.steps` or a stop request; always leaves a checkpoint.

    step_fn(state, global_batch) -> (state, metrics): jitted, state donated; built with
      `train_step.skip_nonfinite` to get non-finite steps skipped and counted.
    data: an iterator of host-local batches, checkpointed with the state (grain), or a
      function first_step -> iterator when the batches are a function of the step.
    to_global: host-local batch -> global arrays.
    metrics_fn(fetched_metrics, local_batch) -> scalars to log, on log steps only.
    schedule: step -> learning rate, logged as `lr` (optional).
    fresh_start(state) -> state: when there is no checkpoint to resume (init_from, ...).
    """

    def __init__(self, step_fn: Callable, data: Iterator | Callable[[int], Iterator], options: LoopOptions,
                 workdir: str, *, to_global: Callable, metrics_fn: Callable = scalar_metrics,
                 throughput: Throughput | None = None, schedule: Callable | None = None,
                 callbacks: Sequence[Callback] = (), fresh_start: Callable | None = None):
        self.step_fn, self.data, self.options, self.workdir = step_fn, data, options, workdir
        self.to_global, self.metrics_fn, self.schedule = to_global, metrics_fn, schedule
        self.throughput = throughput or Throughput()
        self.callbacks, self.fresh_start = tuple(callbacks), fresh_start
        self.nonfinite = NonFiniteSteps(options.max_nonfinite_steps)
        self._data_iter = None if callable(data) and not hasattr(data, "__next__") else data

    def run(self, state) -> tuple[Any, dict]:
        """Trains from the latest checkpoint (or `state`); returns (state, the last logged
        metrics plus the callbacks' `finish` results when the run reached its last step)."""
        opts = self.options
        workdir_lib.prepare(self.workdir)  # done already by m2omni-train; the other commands' lock
        checkpointer = checkpointing.Checkpointer(f"{self.workdir}/checkpoints", save_every=opts.checkpoint_every,
                                                  keep=opts.checkpoint_keep, async_save=opts.async_checkpoint)
        with checkpointer:
            state = self._start(state, checkpointer)
            logger = metrics_logging.MetricLogger(self.workdir, opts.steps, log_every=opts.log_every,
                                                  start_step=int(state.step))
            try:
                with checkpointing.StopSignal() as stop:
                    state, step, last = self._steps(state, checkpointer, logger, stop)
            except BaseException:
                logger.close()
                raise
        final = {}
        if step >= opts.steps:
            for callback in self.callbacks:
                final.update(callback.finish(state))
        logger.summary({k: v for k, v in final.items() if isinstance(v, (int, float))})
        logger.close()
        return state, {**last, **final}

    def _start(self, state, checkpointer):
        if checkpointer.latest_step() is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state, extra = checkpointer.restore(abstract, self._data_iter)
            for callback in self.callbacks:
                callback.restore(extra)
            self.nonfinite.total = int(extra.get("nonfinite_steps", 0))
            logging.info("resumed from step %d", int(state.step))
        elif self.fresh_start is not None:
            state = self.fresh_start(state)
        if self._data_iter is None:
            self._data_iter = self.data(int(state.step))
        return state

    def _extra(self) -> dict:
        extra = {"nonfinite_steps": self.nonfinite.total}
        for callback in self.callbacks:
            extra.update(callback.checkpoint_extra())
        return extra

    def _save(self, checkpointer, step, state, force=False):
        iterator = self.data if self._data_iter is self.data else None  # a step-indexed source has no state
        checkpointer.save(step, state, iterator, extra=self._extra(), force=force)

    def _steps(self, state, checkpointer, logger, stop):
        step, last, sticky = int(state.step), {}, {}
        pending = None  # the previous step's finite flag, read once the next step is dispatched
        self.throughput.start()
        while step < self.options.steps:
            local_batch = next(self._data_iter)
            state, metrics = self.step_fn(state, self.to_global(local_batch))
            step += 1
            self.throughput.tick()
            if pending is not None:
                self.nonfinite.observe(step - 1, pending)
            pending = metrics.pop(NONFINITE_KEY, None)
            state, records = self._after_step(step, state, sticky)
            if logger.should_log(step):
                last = self._log_metrics(step, metrics, local_batch, pending, sticky)
                pending = None  # observed above
            logger.log(step, last)
            for label, values in records:
                logger.record(step, values, label)
            if stop.should_stop(step):
                logging.warning("stop requested: saving step %d and exiting", step)
                break
            if checkpointer.should_save(step):
                self._save(checkpointer, step, state)
            checkpointer.check()  # a failed background save stops the run now, not at the next save
        if pending is not None:
            self.nonfinite.observe(step, pending)
        if checkpointer.latest_step() != step:
            self._save(checkpointer, step, state, force=True)
        checkpointer.wait()
        return state, step, last

    def _after_step(self, step, state, sticky) -> tuple[Any, list[tuple[str, Mapping]]]:
        """Runs the callbacks: unlabelled metrics go into `sticky`; returns the state and the
        labelled ones."""
        records = []
        for callback in self.callbacks:
            start = time.perf_counter()
            state, values = callback.update_state(step, state)
            self.throughput.exclude(time.perf_counter() - start)
            if values and callback.label is None:
                sticky.update(values)
            elif values:
                records.append((callback.label, values))
        return state, records

    def _log_metrics(self, step, metrics, local_batch, pending, sticky) -> dict:
        fetched = jax.device_get(metrics)
        if pending is not None:
            self.nonfinite.observe(step, pending)
        out = dict(self.metrics_fn(fetched, local_batch))
        out.update(self.throughput.report())
        if self.schedule is not None:
            out["lr"] = float(self.schedule(step - 1))
        if self.nonfinite.total:
            out[SKIPPED_KEY] = self.nonfinite.total
        out.update(data_counts(self._data_iter))
        out.update(sticky)
        return out

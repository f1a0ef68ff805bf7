"""Training metrics: console (tqdm bar or plain lines), TensorBoard, JSON lines, and PNG
plots of the per-modality losses and balance weights at the end of a run (`write_plots`).

Every logged step is appended to `<workdir>/metrics.jsonl` as
`{"step": N, "elapsed_s": ..., <metric>: <value>, ...}` with values at full
precision (Python's shortest round-tripping float repr), so a float32 loss
read back from the file is bit-identical to the one computed. After a resume
the file holds repeated steps; `read_metrics` keeps the last record per step.
Only the main process writes files or prints. The workdir may be a URL (gs://bucket/run):
files go through `etils.epath` (`workdir.py`), TensorBoard's event files too.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from m2omni_jax import workdir as workdir_lib


class MetricLogger:
    """Logs scalar metrics every `log_every` steps (and at the last step).

    Call `log(step, metrics)` every step: off-log steps only advance the
    progress bar and never fetch device values. `step` counts completed
    steps (1..total_steps); `start_step` is the step training resumed from.
    Metric `mfu` is a fraction (0.412 prints as 41.2%).
    """

    def __init__(self, workdir, total_steps: int, *, log_every: int, start_step: int = 0,
                 is_main_process: bool | None = None, use_tqdm: bool | None = None):
        self.total_steps = total_steps
        self.log_every = log_every
        self.start_step = start_step
        self.is_main = jax.process_index() == 0 if is_main_process is None else is_main_process
        self._start_time = time.perf_counter()
        self._last_step = start_step
        self._last: dict[str, float] = {}
        self._best_loss: float | None = None
        self._pbar = self._writer = self._jsonl = None
        if not self.is_main:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = workdir_lib.open_for_append(workdir_lib.path(workdir, "metrics.jsonl"))
        self._writer = summary_writer(os.fspath(workdir_lib.path(workdir, "tensorboard")))
        if sys.stdout.isatty() if use_tqdm is None else use_tqdm:
            from tqdm import tqdm
            self._pbar = tqdm(total=total_steps, initial=start_step, file=sys.stdout, dynamic_ncols=True)

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def log(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Records `metrics` if `step` is a log step; returns whether it did."""
        if self._pbar is not None:
            self._pbar.update(step - self._pbar.n)
        self._last_step = step
        if not (self.is_main and self.should_log(step)):
            return False
        values = self._write(step, metrics)
        self._last = values
        if "loss" in values and math.isfinite(values["loss"]):
            self._best_loss = values["loss"] if self._best_loss is None else min(self._best_loss, values["loss"])
        line = format_metrics(values)
        if self._pbar is not None:
            self._pbar.set_postfix_str(line, refresh=True)
        else:
            print(f"step {step}/{self.total_steps} | {line}", flush=True)
        return True

    def record(self, step: int, metrics: Mapping[str, Any], label: str = "eval") -> None:
        """Records `metrics` at `step` whatever the log interval (e.g. a held-out evaluation)."""
        if not self.is_main:
            return
        line = f"{label} at step {step} | {format_metrics(self._write(step, metrics))}"
        if self._pbar is not None:
            self._pbar.write(line)
        else:
            print(line, flush=True)

    def _write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Appends a metrics.jsonl record and TensorBoard scalars; returns the scalars."""
        values = _to_scalars(metrics)
        record = {"step": step, "elapsed_s": round(time.perf_counter() - self._start_time, 3), **values}
        self._jsonl.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        return values

    def summary(self, metrics: Mapping[str, Any] | None = None) -> str:
        """Prints and returns the end-of-run line; `metrics` adds e.g. eval results."""
        elapsed = time.perf_counter() - self._start_time
        parts = [f"done: {self._last_step - self.start_step} steps in {elapsed:.1f}s"]
        if "loss" in self._last:
            parts.append(f"final loss {_fmt(self._last['loss'])}")
        if self._best_loss is not None:
            parts.append(f"best loss {_fmt(self._best_loss)}")
        if metrics:
            parts.append(format_metrics(_to_scalars(metrics)))
        line = " | ".join(parts)
        if self.is_main:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            print(line, flush=True)
        return line

    def close(self):
        for handle in (self._pbar, self._writer, self._jsonl):
            if handle is not None:
                handle.close()
        self._pbar = self._writer = self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def summary_writer(directory: str):
    """A tensorboardX `SummaryWriter`; for a URL, its event files go through epath."""
    from tensorboardX import SummaryWriter, record_writer  # imported lazily: pulls in protobuf

    if workdir_lib.is_url(directory):
        record_writer.register_writer_factory(directory.split(":")[0], _EpathEventFiles())
    return SummaryWriter(directory, flush_secs=30)


class _EpathEventFiles:
    """tensorboardX's writer factory for URLs: epath instead of its boto / google-cloud clients."""

    def open(self, path):
        return workdir_lib.RewrittenFile(path, "w")

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_metrics(path) -> dict[int, dict[str, Any]]:
    """Reads a metrics.jsonl (a local path or URL) into {step: record}: a step's records
    (training metrics, an evaluation) merged, the last value of each key winning."""
    merged: dict[int, dict[str, Any]] = {}
    with epath.Path(path).open("r") as f:
        for record in (json.loads(line) for line in f if line.strip()):
            merged.setdefault(record["step"], {}).update(
                {k: math.nan if v is None else v for k, v in record.items()})
    return merged


PLOTS_DIR = "plots"
# file -> (title, the metric prefix of its curves, the metric prefix of held-out markers in the same colours)
PLOTS = {"losses.png": ("training loss per modality", "loss/", "val_loss/"),
         "balance_weights.png": ("dynamic balance weight per modality", "balance/weight/", None)}


def write_plots(workdir) -> list[epath.Path]:
    """PNGs of a run's `metrics.jsonl` in `<workdir>/plots/` (a local path or URL):
    `losses.png` (loss/<modality> and the total loss by step; the dynamic balance's
    val_loss/<modality> as markers) and `balance_weights.png` (balance/weight/<modality>,
    when logged). Any workdir with a metrics.jsonl; returns the files written."""
    metrics = read_metrics(workdir_lib.path(workdir, "metrics.jsonl"))
    out = workdir_lib.path(workdir, PLOTS_DIR)
    written = []
    for name, (title, prefix, markers) in PLOTS.items():
        png = _plot(metrics, title, prefix, markers, total="loss" if prefix == "loss/" else None)
        if png is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(png)
            written.append(out / name)
    return written


def _series(metrics: Mapping[int, Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps = [s for s in sorted(metrics) if key in metrics[s] and math.isfinite(metrics[s][key])]
    return steps, [metrics[s][key] for s in steps]


def _plot(metrics, title: str, prefix: str, markers: str | None, total: str | None) -> bytes | None:
    """One figure's PNG bytes: a line per `<prefix><name>` metric; None when there is none."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, the notebook's backend untouched
    from matplotlib.ticker import MaxNLocator

    names = sorted({k[len(prefix):] for record in metrics.values() for k in record if k.startswith(prefix)})
    if not names:
        return None
    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    values, marked = [], False
    for i, name in enumerate(names):
        steps, ys = _series(metrics, prefix + name)
        axes.plot(steps, ys, color=f"C{i}", label=name, marker="." if len(steps) < 30 else None)
        held_steps, held = _series(metrics, markers + name) if markers else ([], [])
        axes.plot(held_steps, held, color=f"C{i}", linestyle="none", marker="o", fillstyle="none")
        values, marked = values + ys + held, marked or bool(held)
    if total:
        steps, ys = _series(metrics, total)
        axes.plot(steps, ys, color="black", linestyle="--", linewidth=1, label=total)
        values += ys
    if values and min(values) > 0 and max(values) > 10 * min(values):
        axes.set_yscale("log")
    axes.set(title=title + (f" (o: {markers}<modality>)" if marked else ""), xlabel="step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and ±inf become null: strict JSON readers (jq, JavaScript) reject bare NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def format_metrics(values: Mapping[str, float | int]) -> str:
    return " | ".join(f"{name} {_fmt(value, name)}" for name, value in values.items())


def _to_scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Fetches all values in one `jax.device_get` (a list keeps the caller's order)."""
    names = list(metrics)
    out = {}
    for name, value in zip(names, jax.device_get([metrics[n] for n in names])):
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric {name!r} has shape {array.shape}; only scalars can be logged")
        item = array.reshape(()).item()
        out[name] = item if isinstance(item, int) and not isinstance(item, bool) else float(item)
    return out


def _fmt(value: float | int, name: str = "") -> str:
    if name == "mfu":
        return f"{100 * value:.1f}%"
    if name.endswith("/s"):
        return f"{value:.0f}"
    if isinstance(value, int):
        return str(value)
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"

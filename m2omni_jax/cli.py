"""What every command shares: the --config / --workdir / --multihost flags, their parsing
(a bad override is one line, not a traceback) and the start-up before a command runs.

Each command module (`train.py`, `evaluate.py`, ...) has a `run()` that calls
`cli.run(command, name)`; `command(config, workdir)` does the work. Commands with
flags of their own define them in their module, next to their `run()`.
"""
from __future__ import annotations

import logging as py_logging
import signal
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from m2omni_jax import faults

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events "
                    "(a local path or a gs:// / s3:// URL).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, GPU clusters).")
flags.mark_flags_as_required(["config", "workdir"])


def workdir_path(workdir: str) -> str:
    """An absolute local path, or a cloud URL (gs://bucket/run) unchanged."""
    from m2omni_jax import workdir as workdir_lib  # imports jax: after flag parsing

    return workdir_lib.local_or_url(workdir)


def run(command: Callable, name: str, *, quiet: bool = False, help_from: tuple[str, ...] = ()) -> None:
    """Parses the flags and calls `command(config, workdir)`; `quiet` keeps absl at WARNING;
    `help_from`: other modules whose flags the command takes, listed by --help."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        import jax  # after flag parsing, so --xla flags in the environment apply

        if FLAGS.multihost:
            jax.distributed.initialize()
        import m2omni_jax.experiments  # noqa: F401  (registers the built-in data set's sources and plug-ins)
        import m2omni_jax.interop.hf_tokenizer  # noqa: F401  (config.tokenizer.path may be a tokenizer.json)

        logging.get_absl_handler().addFilter(OwnInfoOnly())
        logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
                     jax.local_device_count())
        run_command(command, name, FLAGS.config, workdir_path(FLAGS.workdir))

    if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
        print_help(command, name, help_from)
        sys.exit(0)
    if quiet:
        logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=lambda argv: parse_flags(argv, name))


class OwnInfoOnly(py_logging.Filter):
    """Quiet by default: INFO lines of our own modules pass, third-party ones (Orbax's
    per-save chatter, grain, TFDS) only from WARNING up; `--verbosity=1` shows everything."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return (record.levelno >= py_logging.WARNING or "m2omni_jax" in record.pathname
                or logging.get_verbosity() > logging.INFO)


def run_command(command: Callable, name: str, config, workdir: str) -> None:
    """`command(config, workdir)` with the config typed once (`RunConfig.of`); a named fault is one line on stderr (the last), no traceback:
    exit 2 for a config error, 1 for a fault of the run. SIGTERM / SIGINT outside the training
    steps (start-up, compiling, the final evaluation) stop it with a line and exit 0; during
    the steps the loop's `checkpointing.StopSignal` saves first."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    try:
        from m2omni_jax.run_config import RunConfig  # imports jax: after flag parsing

        command(RunConfig.of(config), workdir)
    except (Stopped, Exception) as e:
        # `_received`: a native library on the way (sentencepiece) may re-raise `Stopped` as its own error.
        message, code = ((f"stopped by {_received[0]} outside the training steps; the last checkpoint "
                          "(if any) is kept", 0) if _received else
                         (str(e), 2) if isinstance(e, faults.ConfigError) else
                         (str(e), 1) if isinstance(e, faults.RunError) else (None, None))
        if message is None:
            raise
        logging.flush()
        print(f"{name}: {message}", file=sys.stderr, flush=True)
        sys.exit(code)


class Stopped(BaseException):
    """A stop signal outside the training steps; a BaseException, as KeyboardInterrupt, so
    no `except Exception` on the way (the checkpoint fallback) mistakes it for a fault."""


_received: list[str] = []  # the stop signal `_stop` raised for, if any


def _stop(signum, frame):
    del frame
    _received.append(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal kills, as without us
        signal.signal(sig, signal.SIG_DFL)
    raise Stopped(signal.Signals(signum).name)


def print_help(command: Callable, name: str, help_from: tuple[str, ...] = ()) -> None:
    """The command's module docstring, then its flags (the shared ones, its own, `help_from`'s)."""
    module = sys.modules.get(command.__module__)
    doc = (module.__doc__ or "").strip() if module else ""
    print(f"{name} --config=CONFIG --workdir=DIR [--config.section.field=value ...]\n\n{doc}\n")
    for flags_module in dict.fromkeys([__name__, command.__module__, *help_from]):
        text = FLAGS.module_help(flags_module)
        if text.strip():
            print(text + "\n")


def parse_flags(argv, name: str = "m2omni-train"):
    """absl parsing, but a bad --config.* override is one line, not a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip()
        if len(message) > 1 and message[0] == message[-1] == "'":  # AttributeError's repr quotes
            message = message[1:-1]
        print(f"Usage: {name} --config=configs/tiny.py --workdir=DIR [--config.section.field=value ...]\n"
              f"{name}: bad flag or config override: {message}", file=sys.stderr)
        sys.exit(2)  # as a config error: the message is the last line

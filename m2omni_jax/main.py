"""Entry point: `m2omni-train --config=configs/tiny.py --workdir=DIR`.

Kept short on purpose: flags, multi-host start-up, then `train.train_and_evaluate`.
Override any config field on the command line: `--config.train.steps=400`.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, GPU clusters).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # after flag parsing, so --xla flags in the environment apply

    if FLAGS.multihost:
        jax.distributed.initialize()
    from m2omni_jax import train

    logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())
    train.train_and_evaluate(FLAGS.config, os.path.abspath(FLAGS.workdir))


def run_command(command, *, quiet: bool = False):
    """An entry point with m2omni-train's --config / --workdir flags that calls
    `command(config, absolute workdir)` (m2omni-eval, m2omni-pretrain-tower)."""
    def command_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        command(FLAGS.config, os.path.abspath(FLAGS.workdir))
    if quiet:
        logging.set_verbosity(logging.WARNING)
    app.run(command_main, flags_parser=parse_flags)


def parse_flags(argv):
    """absl parsing, but a bad --config.* override is one line, not a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ").strip()
        if len(message) > 1 and message[0] == message[-1] == "'":  # AttributeError's repr quotes
            message = message[1:-1]
        sys.exit(f"m2omni-train: bad flag or config override: {message}\nUsage: m2omni-train "
                 "--config=configs/tiny.py --workdir=DIR [--config.section.field=value ...]")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()

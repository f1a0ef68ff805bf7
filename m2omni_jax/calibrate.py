"""Step-balance calibration: train each modality alone and record the loss it converges to.

    m2omni-calibrate --config=configs/stages/pt3.py:tiny \
        --workdir=/tmp/m2omni_stages/calib --steps=100

For every modality in `config.balance.modalities`, a short run on that
modality alone (its own workdir `<workdir>/<modality>`, starting from the
stage's `init_from`); Lᵢ* is the mean training loss over the last
`--tail` logged steps. Writes `<workdir>/converged_losses.json` ({modality:
L*}), the file PT3's `balance.step.calibration_file` reads, and prints the
step-balance weights it implies.
"""
import os

import numpy as np
from absl import flags, logging

from m2omni_jax import build, cli, train
from m2omni_jax.training import balance
from m2omni_jax.training.metrics_logging import read_metrics

flags.DEFINE_integer("steps", 100, "Training steps per modality.")
flags.DEFINE_integer("tail", 10, "Logged steps averaged for the converged loss.")
FLAGS = flags.FLAGS


def single_modality_config(base, modality: str, steps: int):
    """The stage's config reading `modality` alone, one stream, a log line every step."""
    config = build.single_modality_config(base, modality)
    config.balance.strategy = "none"
    config.train.steps = steps
    config.train.log_every = 1
    return config


def converged_loss(workdir: str, tail: int) -> float:
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    losses = [records[s]["loss"] for s in sorted(records)][-tail:]
    return float(np.mean(losses))


def calibrate(base, root: str) -> dict[str, float]:
    """Runs every balanced modality alone under `root`; writes and returns {modality: L*}."""
    losses = {}
    for modality in base.balance.modalities:
        run_dir = os.path.join(root, modality)
        logging.info("calibration: %s alone for %d steps in %s", modality, FLAGS.steps, run_dir)
        config = single_modality_config(base, modality, FLAGS.steps)
        if config.init_from and not os.path.isabs(config.init_from):
            config.init_from = os.path.normpath(os.path.join(root, config.init_from))
        train.train_and_evaluate(config, run_dir)
        losses[modality] = converged_loss(run_dir, FLAGS.tail)
    path = os.path.join(root, "converged_losses.json")
    balance.save_calibration(path, losses)
    weights = balance.step_balance_weights(losses, alpha=base.balance.step.alpha)
    for name in losses:
        print(f"{name:12s} L* = {losses[name]:.4f}   w = {weights[name]:.3f}")
    print(f"wrote {path}")
    return losses


def run():
    cli.run(calibrate, "m2omni-calibrate")


if __name__ == "__main__":
    run()

"""Step-balance calibration: train each modality alone to a plateau and record its loss there.

    m2omni-calibrate --config=configs/stages/pt3.py:tiny \
        --workdir=/tmp/m2omni_stages/calib --steps=100 --max_steps=1000 --tail=20

For every modality in `config.balance.modalities`, a run on that modality
alone (its own workdir `<workdir>/<modality>`, starting from the stage's
`init_from`), in rounds of `--steps`: after each round the last `--tail`
logged losses (at most half the run) are fitted by least squares, and the run
stops at a plateau — when the fitted line changes by at most
`--max_tail_change` of its mean over the tail — or at `--max_steps` (with a
warning naming the modality). Otherwise it resumes from its checkpoint for
another round. Lᵢ* is the tail's mean. The calibration runs use a constant LR
after warmup [ours]: a decaying schedule would flatten any curve by the end of
its planned length, which is not the plateau the paper's "converged loss"
means, and a schedule fixed in advance could not be extended by rounds.
Writes `<workdir>/converged_losses.json` ({"converged_losses": {modality: L*},
"convergence": {...}}), the file PT3's `balance.step.calibration_file` reads,
and prints the weights it implies.
"""
import os
from typing import Callable

from absl import flags, logging

from m2omni_jax import build, cli, train
from m2omni_jax import workdir as workdir_lib
from m2omni_jax.training import balance
from m2omni_jax.training.metrics_logging import read_metrics
from m2omni_jax.run_config import RunConfig
from m2omni_jax.config_fields import ConfigError, replace

flags.DEFINE_integer("steps", 100, "Training steps per round (a modality trains in rounds until its loss plateaus).")
flags.DEFINE_integer("max_steps", 1000, "Training steps per modality at most (a warning if still not at a plateau).")
flags.DEFINE_integer("tail", 10, "Logged steps averaged for the converged loss (at most --steps / 2).")
flags.DEFINE_float("max_tail_change", 0.02, "The plateau: the loss fitted over the tail changes by at most this "
                   "fraction of L*.")
FLAGS = flags.FLAGS


def single_modality_config(base, modality: str, steps: int):
    """The stage's config reading `modality` alone, one stream, a log line every step, a
    constant LR after warmup (so a round can extend the run) and a checkpoint every round."""
    config = build.single_modality_config(RunConfig.of(base), modality)
    return replace(config, **{"balance.strategy": "none", "train.steps": steps, "train.log_every": 1,
                              "opt.decay": "constant", "checkpoint.every": FLAGS.steps})


def train_to_plateau(run_round: Callable[[int], dict], round_steps: int, max_steps: int, tail: int,
                     max_change: float) -> tuple[dict, int]:
    """Calls `run_round(total_steps)` (train up to that many steps, return the
    tail_convergence of the curve so far) for round_steps, 2·round_steps, ... until the
    tail's relative change is within `max_change` or `max_steps` is reached:
    (the last convergence stats, the steps trained)."""
    balance.check_calibration_tail(round_steps, tail)
    if max_steps < round_steps:
        raise ConfigError(f"--max_steps={max_steps} must be at least --steps={round_steps}")
    steps = round_steps
    while True:
        stats = run_round(steps)
        if abs(stats["relative_change"]) <= max_change or steps >= max_steps:
            return stats, steps
        steps = min(steps + round_steps, max_steps)


def convergence(workdir: str, tail: int) -> dict[str, float]:
    """balance.tail_convergence of the run's logged training losses."""
    records = read_metrics(workdir_lib.path(workdir, "metrics.jsonl"))
    steps = [s for s in sorted(records) if "loss" in records[s]]
    return balance.tail_convergence(steps, [records[s]["loss"] for s in steps], tail)


def calibrate_modality(base, modality: str, root: str) -> tuple[dict, int]:
    """`modality` alone in `<root>/<modality>`, trained to a plateau: (convergence, steps)."""
    run_dir = os.fspath(workdir_lib.path(root, modality))  # epath: a gs:// root too

    def run_round(steps: int) -> dict:
        logging.info("calibration: %s alone up to step %d in %s", modality, steps, run_dir)
        config = single_modality_config(base, modality, steps)
        if config.init_from:  # relative to the calibration root
            config = replace(config, init_from=workdir_lib.resolve(config.init_from, root))
        train.train_and_evaluate(config, run_dir)  # resumes from the previous round's checkpoint
        return convergence(run_dir, FLAGS.tail)

    return train_to_plateau(run_round, FLAGS.steps, FLAGS.max_steps, FLAGS.tail, FLAGS.max_tail_change)


def calibrate(base, root: str) -> dict[str, float]:
    """Runs every balanced modality alone under `root`; writes and returns {modality: L*}."""
    balance.check_calibration_tail(FLAGS.steps, FLAGS.tail)
    stats, trained = {}, {}
    for modality in base.balance.modalities:
        stats[modality], trained[modality] = calibrate_modality(base, modality, root)
    losses = {m: s["converged_loss"] for m, s in stats.items()}
    path = os.fspath(workdir_lib.path(root, "converged_losses.json"))
    balance.save_calibration(path, losses, {
        "tail_logged_steps": FLAGS.tail, "max_tail_change": FLAGS.max_tail_change, "steps": trained,
        "slope_per_step": {m: s["slope_per_step"] for m, s in stats.items()},
        "relative_change_over_tail": {m: s["relative_change"] for m, s in stats.items()}})
    weights = balance.step_balance_weights(losses, alpha=base.balance.step.alpha)
    for name, s in stats.items():
        print(f"{name:12s} L* = {losses[name]:.4f}   w = {weights[name]:.3f}   "
              f"change over the tail {100 * s['relative_change']:+.2f}% after {trained[name]} steps")
    for name in balance.unconverged(stats, FLAGS.max_tail_change):
        logging.warning("calibration: %s's loss still changes by %+.2f%% over the last %d logged steps "
                        "(> --max_tail_change=%g) after --max_steps=%d: its L* is not at a plateau; raise "
                        "--max_steps", name, 100 * stats[name]["relative_change"], FLAGS.tail,
                        FLAGS.max_tail_change, FLAGS.max_steps)
    print(f"wrote {path}")
    return losses


def run():
    cli.run(calibrate, "m2omni-calibrate")


if __name__ == "__main__":
    run()

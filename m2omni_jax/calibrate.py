"""Step-balance calibration: train each modality alone and record the loss it converges to.

    m2omni-calibrate --config=configs/stages/pt3.py:tiny \
        --workdir=/tmp/m2omni_stages/calib --steps=100 --tail=20

For every modality in `config.balance.modalities`, a run on that modality
alone (its own workdir `<workdir>/<modality>`, starting from the stage's
`init_from`); Lᵢ* is the mean training loss over the last `--tail` logged
steps, at most half the run (`--steps`), so that L* is where the curve
settled rather than a point on its way down. The tail's least-squares slope
goes into the file beside L*, and a warning names every modality whose loss
still moves by more than `--max_tail_change` (relative) over the tail: run
those longer. Writes `<workdir>/converged_losses.json`
({"converged_losses": {modality: L*}, "convergence": {...}}), the file PT3's
`balance.step.calibration_file` reads, and prints the weights it implies.
"""
import os

from absl import flags, logging

from m2omni_jax import build, cli, train
from m2omni_jax.training import balance
from m2omni_jax.training.metrics_logging import read_metrics
from m2omni_jax.run_config import RunConfig
from m2omni_jax.config_fields import replace

flags.DEFINE_integer("steps", 100, "Training steps per modality.")
flags.DEFINE_integer("tail", 10, "Logged steps averaged for the converged loss (at most --steps / 2).")
flags.DEFINE_float("max_tail_change", 0.02, "Warn when a modality's fitted loss changes by more than this "
                   "fraction of L* over the tail (not converged yet).")
FLAGS = flags.FLAGS


def single_modality_config(base, modality: str, steps: int):
    """The stage's config reading `modality` alone, one stream, a log line every step."""
    config = build.single_modality_config(RunConfig.of(base), modality)
    return replace(config, **{"balance.strategy": "none", "train.steps": steps, "train.log_every": 1})


def convergence(workdir: str, tail: int) -> dict[str, float]:
    """balance.tail_convergence of the run's logged training losses."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    steps = [s for s in sorted(records) if "loss" in records[s]]
    return balance.tail_convergence(steps, [records[s]["loss"] for s in steps], tail)


def calibrate(base, root: str) -> dict[str, float]:
    """Runs every balanced modality alone under `root`; writes and returns {modality: L*}."""
    balance.check_calibration_tail(FLAGS.steps, FLAGS.tail)
    stats = {}
    for modality in base.balance.modalities:
        run_dir = os.path.join(root, modality)
        logging.info("calibration: %s alone for %d steps in %s", modality, FLAGS.steps, run_dir)
        config = single_modality_config(base, modality, FLAGS.steps)
        if config.init_from and not os.path.isabs(config.init_from):
            config = replace(config, init_from=os.path.normpath(os.path.join(root, config.init_from)))
        train.train_and_evaluate(config, run_dir)
        stats[modality] = convergence(run_dir, FLAGS.tail)
    losses = {m: s["converged_loss"] for m, s in stats.items()}
    path = os.path.join(root, "converged_losses.json")
    balance.save_calibration(path, losses, {
        "tail_logged_steps": FLAGS.tail, "max_tail_change": FLAGS.max_tail_change,
        "slope_per_step": {m: s["slope_per_step"] for m, s in stats.items()},
        "relative_change_over_tail": {m: s["relative_change"] for m, s in stats.items()}})
    weights = balance.step_balance_weights(losses, alpha=base.balance.step.alpha)
    for name, s in stats.items():
        print(f"{name:12s} L* = {losses[name]:.4f}   w = {weights[name]:.3f}   "
              f"change over the tail {100 * s['relative_change']:+.2f}%")
    for name in balance.unconverged(stats, FLAGS.max_tail_change):
        logging.warning("calibration: %s's loss still changes by %+.2f%% over the last %d logged steps "
                        "(> --max_tail_change=%g): its L* is not converged; raise --steps", name,
                        100 * stats[name]["relative_change"], FLAGS.tail, FLAGS.max_tail_change)
    print(f"wrote {path}")
    return losses


def run():
    cli.run(calibrate, "m2omni-calibrate")


if __name__ == "__main__":
    run()

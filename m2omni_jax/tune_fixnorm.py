"""FixNorm's few-trial tuning: search η at a default τ, then τ at the best η.

    m2omni-tune-fixnorm --config=configs/tiny.py --workdir=/tmp/fixnorm_tune \
        --etas=1e-3,3e-3,1e-2 --taus=5,10,20 --tau_default=10 --steps=100

Every trial is a short `m2omni-train` run with `opt.name="fixnorm"`, its own
workdir (`<workdir>/eta=…_tau=…`), and the given η as the peak LR; the
metric is the final training loss (lower is better). The trial table and the
best (η, τ) are printed and written to `<workdir>/fixnorm_tuning.json`.
"""
import json
import os

from absl import flags, logging

from m2omni_jax import cli, train, workdir as workdir_lib
from m2omni_jax.training import optimizers
from m2omni_jax.run_config import RunConfig
from m2omni_jax.config_fields import replace

flags.DEFINE_list("etas", ["1e-3", "3e-3", "1e-2"], "Peak learning rates tried at tau_default.")
flags.DEFINE_list("taus", ["5", "10", "20"], "Classifier norms tried at the best eta.")
flags.DEFINE_float("tau_default", 10.0, "Classifier norm used while searching eta.")
flags.DEFINE_integer("steps", 100, "Training steps per trial.")
FLAGS = flags.FLAGS


def trial_config(base, eta: float, tau: float, steps: int):
    config = optimizers.fixnorm_preset(RunConfig.of(base))  # + the scale-invariant weights
    return replace(config, **{"opt.peak_lr": eta, "opt.fixnorm.tau": tau, "train.steps": steps})


def run_trial(base, workdir: str, eta: float, tau: float, steps: int) -> float:
    trial_dir = os.fspath(workdir_lib.path(workdir, f"eta={eta:g}_tau={tau:g}"))
    logging.info("FixNorm trial eta=%g tau=%g -> %s", eta, tau, trial_dir)
    return float(train.train_and_evaluate(trial_config(base, eta, tau, steps), trial_dir)["loss"])


def tune(base, workdir: str) -> dict:
    """η at `--tau_default`, then τ at the best η; writes and returns the trial table."""
    (eta, tau), table = optimizers.tune_fixnorm(
        lambda e, t: run_trial(base, workdir, e, t, FLAGS.steps),
        [float(e) for e in FLAGS.etas], [float(t) for t in FLAGS.taus], FLAGS.tau_default)
    print("stage  eta        tau      final loss")
    for row in table:
        print(f"{row['stage']:>5}  {row['eta']:<9g}  {row['tau']:<7g}  {row['metric']:.4f}")
    print(f"best: eta={eta:g} tau={tau:g}")
    workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)  # epath: a gs:// workdir too
    workdir_lib.path(workdir, "fixnorm_tuning.json").write_text(
        json.dumps({"best": {"eta": eta, "tau": tau}, "trials": table}, indent=2))
    return {"best": {"eta": eta, "tau": tau}, "trials": table}


def run():
    cli.run(tune, "m2omni-tune-fixnorm")


if __name__ == "__main__":
    run()

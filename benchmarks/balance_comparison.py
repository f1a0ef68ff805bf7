"""Equal weights vs step balance vs dynamic adaptive balance on the tiny omni mixture.

    python benchmarks/balance_comparison.py --config=configs/stages/pt3.py:tiny \
        --workdir=/tmp/balance_comparison --steps=200 --config.train.batch_size=20 \
        --calibration_file=CALIBRATION_RUN/converged_losses.json  # from m2omni-calibrate

Trains the same model on the same mixture for the same number of steps with
(a) one mixed stream and equal loss weights, (b) step balance (one micro-batch
per modality per step, weights from `--calibration_file` or equal; with
`--equal_tokens`, the default, each micro-batch is batch_size / M sequences so
every arm sees the same tokens per step), and
(c) dynamic adaptive balance; each run ends with a held-out loss per modality
(`heldout_loss/<modality>`, fixed held-out batches). Prints a table, writes
`<workdir>/balance_comparison.json` and `<workdir>/balance_comparison.png`
(per-modality training-loss curves and held-out losses). Needs matplotlib
(`pip install -e ".[experiments]"`).
"""
import json
import os

from absl import app, flags, logging

import m2omni_jax.experiments  # noqa: F401  (the built-in data set's sources)
from m2omni_jax import cli, train
from m2omni_jax.training.metrics_logging import read_metrics

# --config (a multi-modality mixture, e.g. configs/stages/pt3.py:tiny) and --workdir (the parent
# directory of the three runs) are m2omni_jax.cli's, which `train` imports.
flags.DEFINE_integer("steps", 300, "Optimizer steps per run.")
flags.DEFINE_string("calibration_file", "", "Converged losses for step balance (empty: equal weights).")
flags.DEFINE_integer("dynamic_interval", 10, "Steps between dynamic-balance validation passes.")
flags.DEFINE_integer("heldout_batches", 4, "Held-out batches per modality scored at the end of each run.")
flags.DEFINE_bool("equal_tokens", True, "Step balance's micro-batches hold batch_size / M sequences each, "
                  "so every arm trains on the same number of tokens per step (else M times more).")
FLAGS = flags.FLAGS

STRATEGIES = {"a_equal": "none", "b_step_balance": "step", "c_dynamic": "dynamic"}


def run_config(base, strategy: str, steps: int):
    config = base.copy_and_resolve_references()
    config.init_from = ""  # same fresh start for every arm
    config.balance.strategy = strategy
    config.train.steps = steps
    config.train.log_every = 5
    config.train.loss_weights = {}
    config.train.heldout_batches = FLAGS.heldout_batches
    config.train.heldout_batch_size = base.train.batch_size  # the same held-out set for every arm
    if strategy == "step":
        config.balance.step.calibration_file = FLAGS.calibration_file
        config.balance.step.equal_weights = not FLAGS.calibration_file  # equal weights α/M without one
    if strategy == "step" and FLAGS.equal_tokens:
        num_modalities = len(config.balance.modalities)
        if config.train.batch_size % num_modalities:
            multiple = -(-config.train.batch_size // num_modalities) * num_modalities
            raise app.UsageError(f"--equal_tokens: config.train.batch_size={config.train.batch_size} is not a "
                                 f"multiple of the {num_modalities} balanced modalities; pass "
                                 f"--config.train.batch_size={multiple} or --noequal_tokens")
        config.train.batch_size //= num_modalities
    config.balance.dynamic.interval_steps = FLAGS.dynamic_interval
    return config


def plot(results: dict, curves: dict, modalities, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(modalities) + 1, figsize=(4 * (len(modalities) + 1), 3.5))
    for ax, modality in zip(axes, modalities):
        for name, steps_losses in curves.items():
            points = steps_losses.get(modality, [])
            if points:
                ax.plot(*zip(*points), label=name)
        ax.set_title(f"train loss/{modality}")
        ax.set_xlabel("step")
    axes[0].legend()
    ax = axes[-1]
    width = 0.8 / len(results)
    for i, (name, row) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(modalities))],
               [row.get(f"heldout_loss/{m}", float("nan")) for m in modalities], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modalities))], modalities)
    ax.set_title("held-out loss (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    root = os.path.abspath(FLAGS.workdir)
    modalities = tuple(FLAGS.config.balance.modalities)
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())  # quiet, as m2omni-train
    configs = {name: run_config(FLAGS.config, strategy, FLAGS.steps) for name, strategy in STRATEGIES.items()}
    results, curves = {}, {}
    for name, config in configs.items():  # every arm's config checked before the first trains
        workdir = os.path.join(root, name)
        results[name] = train.train_and_evaluate(config, workdir)
        records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        curves[name] = {m: [(s, r[f"loss/{m}"]) for s, r in sorted(records.items()) if f"loss/{m}" in r]
                        for m in modalities}
    header = f"{'run':16s}" + "".join(f"{m:>14s}" for m in modalities) + f"{'mean':>10s}"
    print("held-out loss per modality after", FLAGS.steps, "steps")
    print(header)
    for name, row in results.items():
        values = [row.get(f"heldout_loss/{m}", float("nan")) for m in modalities]
        print(f"{name:16s}" + "".join(f"{v:14.4f}" for v in values) + f"{sum(values) / len(values):10.4f}")
    with open(os.path.join(root, "balance_comparison.json"), "w") as f:
        json.dump({"steps": FLAGS.steps, "results": results, "curves": curves}, f, indent=2)
    plot(results, curves, modalities, os.path.join(root, "balance_comparison.png"))
    print(f"wrote {root}/balance_comparison.json and .png")


if __name__ == "__main__":
    app.run(main)

"""Entry point: `m2omni-train --config=configs/tiny.py --workdir=DIR`.

Kept short on purpose: the shared flags (`cli.py`), then `train.train_and_evaluate`, then
PNG plots of the per-modality losses and balance weights in `DIR/plots/`
(`metrics_logging.write_plots`, which redraws them for any workdir).
Override any config field on the command line: `--config.train.steps=400`.
"""
from m2omni_jax import cli


def train_and_plot(config, workdir: str) -> dict:
    import jax  # after flag parsing (cli.run), so --xla flags apply
    from m2omni_jax import train
    from m2omni_jax.training import metrics_logging

    metrics = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        metrics_logging.write_plots(workdir)
    return metrics


def run():
    cli.run(train_and_plot, "m2omni-train")


if __name__ == "__main__":
    run()

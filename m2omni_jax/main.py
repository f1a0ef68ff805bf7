"""Entry point: `m2omni-train --config=configs/tiny.py --workdir=DIR`.

Kept short on purpose: the shared flags (`cli.py`), then `train.train_and_evaluate`.
Override any config field on the command line: `--config.train.steps=400`.
"""
from m2omni_jax import cli


def run():
    from m2omni_jax import train  # after flag parsing (cli.run), so --xla flags apply

    cli.run(lambda config, workdir: train.train_and_evaluate(config, workdir), "m2omni-train")


if __name__ == "__main__":
    run()

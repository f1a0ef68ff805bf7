"""`m2omni-prepare-data --config=... --workdir=...`: writes the generated data sets a config
reads (every source of config.data.sources that generates its records: the built-in text
corpus, the shapes world and, with the audio tower, its speech) and exits.

Training writes them on first use anyway; this does it ahead of a timed or multi-host run,
with progress bars, and takes the same --config.* overrides (a new task list is a new world).
"""
from m2omni_jax import cli
from m2omni_jax.data import sources
from m2omni_jax.run_config import RunConfig


def prepare(config, workdir: str) -> dict[str, str]:
    """Writes (once) every generated data set `config` reads; returns {name: directory or files}."""
    del workdir  # the flags are shared with m2omni-train; the data go under config.data.dir
    config = RunConfig.of(config)
    written = {}
    for source in sources.make_sources(config).values():
        written.update(source.prepare(progress=True))
    for name, where in written.items():
        print(f"{name}: {where}", flush=True)
    return written


def run():
    cli.run(prepare, "m2omni-prepare-data", quiet=True)


if __name__ == "__main__":
    run()

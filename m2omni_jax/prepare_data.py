"""`m2omni-prepare-data --config=... --workdir=...`: writes the built-in data sets a config
reads (text corpus, shapes world, spoken shapes world when the audio tower is on) and exits.

Training writes them on first use anyway; this does it ahead of a timed or multi-host run,
with progress bars, and takes the same --config.* overrides (a new task list is a new world).
"""
from m2omni_jax import cli
from m2omni_jax.data import omni_pipeline, pipeline


def prepare(config, workdir: str) -> dict[str, str]:
    """Writes (once) every built-in data set `config` reads; returns {name: directory or file}."""
    del workdir  # the flags are shared with m2omni-train; the data go under config.data.dir
    written = {f"text/{split}": ", ".join(pipeline.builtin_text_files(config, split)) for split in ("train", "eval")}
    if config.model.kind == "omni":
        written["shapes_world"] = omni_pipeline.write_builtin_shapes_world(config, progress=True)[0]
        if omni_pipeline.speech_tasks(config):
            written["speech"] = omni_pipeline.write_builtin_speech(config, progress=True)[0]
    for name, where in written.items():
        print(f"{name}: {where}", flush=True)
    return written


def run():
    cli.run(prepare, "m2omni-prepare-data", quiet=True)


if __name__ == "__main__":
    run()

"""Input-pipeline benchmark: the omni pipeline alone against the train step it feeds.

    python benchmarks/input_pipeline.py [--batches=20] [--train_steps=5] [--json=PATH]

The tiny omni config (configs/tiny.py) on the built-in shapes world, written to a temporary
directory by the prepare-data path (each source's `prepare`, as m2omni-prepare-data; smaller splits, --num_train):
records/s and batches/s of the pipeline with the config's default worker count, its packing
(non-pad token fraction, patch fill), and the ratio of its batches/s to the steps/s of the
tiny omni train step measured in the same run (--train_steps=0: read from
benchmarks/results/omni_train_step_tiny_cpu.json). Also the non-pad token fraction of the
text-only pipeline (data/pipeline.py) at the same sequence length and batch.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import m2omni_jax.experiments  # noqa: E402,F401  (the built-in data set's sources)
from configs import base, tiny  # noqa: E402
from m2omni_jax import build  # noqa: E402
from m2omni_jax.data import media, pipeline, sources, tokenizer as tokenizer_lib  # noqa: E402
from m2omni_jax.modalities import NUM_MODALITIES  # noqa: E402
from m2omni_jax.models import omni  # noqa: E402
from m2omni_jax.parallel import sharding  # noqa: E402
from m2omni_jax.run_config import RunConfig  # noqa: E402
from m2omni_jax.training import train_step  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")


def omni_config(root: str, num_train: int):
    config = tiny.get_config()
    config.data.dir = os.path.join(root, "data")
    config.tokenizer.cache_dir = os.path.join(root, "tokenizer")
    config.data.sources.shapes_world.update(dict(num_train=num_train, num_eval=50))
    config.data.sources.shapes_world.speech.update(dict(num_train=max(num_train // 4, 20), num_eval=8))
    config.data.audio.cmvn_samples = 20
    return RunConfig.of(config)


def text_config(root: str, omni: RunConfig):
    config = base.get_config()  # the text corpus alone, at the omni run's length and batch
    config.data.dir = os.path.join(root, "data")
    config.tokenizer.cache_dir = os.path.join(root, "tokenizer")
    config.tokenizer.vocab_size = omni.tokenizer.vocab_size
    config.data.seq_len = omni.data.seq_len
    config.train.batch_size = omni.train.batch_size
    return RunConfig.of(config)


def records_in(batch) -> int:
    """Packed samples in a batch: the distinct non-zero segment ids of each row."""
    return int(np.sum(np.max(batch["segment_ids"], axis=-1)))


def time_pipeline(iterator, warmup: int, batches: int) -> tuple[dict, list]:
    for _ in range(warmup):
        next(iterator)
    start, got = time.perf_counter(), []
    for _ in range(batches):
        got.append(next(iterator))
    elapsed = time.perf_counter() - start
    return {"batches_per_s": batches / elapsed, "records_per_s": sum(map(records_in, got)) / elapsed,
            "seconds": elapsed}, got


def train_steps_per_s(config, tokenizer, batches, steps: int) -> float:
    """Median steps/s of the jitted, sharded train step (after 2 warm-up steps)."""
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    state, _, shardings = train_step.create_train_state(model, tx, mesh, rules, shapes, config.seed)
    step = train_step.jit_train_step(model, mesh, rules, shardings, batch_keys=build.batch_keys(config))
    batches, weights = [pipeline.make_global_batch(b, mesh) for b in batches], jnp.ones(NUM_MODALITIES)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)], weights)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times[2:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches (after 3 warm-up)")
    parser.add_argument("--train_steps", type=int, default=5, help="timed train steps; 0: read the stored figure")
    parser.add_argument("--num_train", type=int, default=1000, help="shapes-world training records written")
    parser.add_argument("--json", default=os.path.join(RESULTS, "input_pipeline_tiny_cpu.json"))
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="m2omni_input_bench_")
    config = omni_config(root, args.num_train)
    start = time.perf_counter()
    for source in sources.make_sources(config).values():  # what m2omni-prepare-data runs
        source.prepare(progress=False)
    prepare_s = time.perf_counter() - start
    if omni.audio_enabled(config):
        config = media.with_cmvn(config, os.path.join(root, "work"))
    tokenizer = tokenizer_lib.get_tokenizer(config)

    speed, batches = time_pipeline(build.make_train_iterator(config, tokenizer), 3, args.batches)
    print(json.dumps(speed), flush=True)
    text_tok = tokenizer_lib.get_tokenizer(text_config(root, config))
    _, text_batches = time_pipeline(build.make_train_iterator(text_config(root, config), text_tok), 1, args.batches)
    if args.train_steps > 0:
        steps_per_s, source = train_steps_per_s(config, tokenizer, batches[:4], args.train_steps), "same run"
    else:
        with open(os.path.join(RESULTS, "omni_train_step_tiny_cpu.json")) as f:
            steps_per_s, source = 1.0 / json.load(f)["step_time_s"], "omni_train_step_tiny_cpu.json"
    results = {
        "config": "configs/tiny.py", "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "batch": [config.train.batch_size, config.data.seq_len], "num_workers": config.data.num_workers,
        "read_threads": config.data.read_threads, **speed,
        "token_fill": float(np.mean([pipeline.packing_efficiency(b) for b in batches])),
        "patch_fill": float(np.mean([np.mean(b["vision_segment_ids"] > 0) for b in batches])),
        "text_token_fill": float(np.mean([pipeline.packing_efficiency(b) for b in text_batches])),
        "train_steps_per_s": steps_per_s, "train_steps_from": source,
        "pipeline_over_train": speed["batches_per_s"] / steps_per_s, "prepare_data_s": prepare_s,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

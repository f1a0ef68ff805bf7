"""Omni train-step benchmark: step time, tokens/s and MFU with the towers' FLOPs counted.

    python benchmarks/omni_train_step.py --config=configs/tiny.py [--steps=10] [--json=out.json]

Real image+text batches from the omni pipeline (the built-in shapes world:
packed rows of chats, per-row patch packs), the same jitted, sharded train
step as `m2omni-train`. Model FLOPs = the LLM's over every token slot
(models/llm.py) + the vision tower's over every patch slot of the packs
(models/vision.py) + the connector's per merged token; padding is computed,
so it is counted, and the fill fractions are printed beside the figures.
By default the mixture is images + text (`--modalities=image,text`).
"""
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import m2omni_jax.experiments  # noqa: F401  (the built-in data set's sources and plug-ins)
from m2omni_jax import build
from m2omni_jax.data import media, pipeline, tokenizer as tokenizer_lib
from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.models import omni
from m2omni_jax.models.llm import training_flops_per_token
from m2omni_jax.parallel import sharding
from m2omni_jax.training import mfu, train_step
from m2omni_jax.config_fields import replace
from m2omni_jax.run_config import RunConfig

config_flags.DEFINE_config_file("config", "configs/tiny.py", "An omni config (model.kind='omni').")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_integer("num_batches", 4, "Distinct real batches cycled through.")
flags.DEFINE_list("modalities", ["image", "text"], "Mixture of the benchmark batches (equal weights); "
                  "empty: the config's own mixture.")
flags.DEFINE_string("workdir", "/tmp/m2omni_omni_bench", "Where the CMVN statistics go when audio is on.")
flags.DEFINE_string("json", "", "Write the results here as JSON (default: print only).")
FLAGS = flags.FLAGS


def benchmark_config(config, modalities) -> RunConfig:
    config = RunConfig.of(config)
    if config.model.kind != "omni":
        raise ValueError(f"config.model.kind={config.model.kind!r}: this benchmark needs 'omni'")
    if modalities:
        weights = {name: 1.0 if name in modalities else 0.0 for name in config.data.modality_weights}
        config = replace(config, **{"data.mixture": "custom", "data.modality_weights": weights})
    return config


def real_batches(config, tokenizer, num_batches):
    data = build.make_train_iterator(config, tokenizer)
    return [next(data) for _ in range(num_batches)]


def fill_fractions(batches) -> dict[str, float]:
    return {"token_fill": float(np.mean([pipeline.packing_efficiency(b) for b in batches])),
            "patch_fill": float(np.mean([np.mean(b["vision_segment_ids"] > 0) for b in batches]))}


def step_flops(model: omni.OmniModel, batch_size: int, seq_len: int, pack_size: int) -> dict[str, float]:
    """Model FLOPs of one train step, per part."""
    cfg = model.config
    llm = training_flops_per_token(cfg.llm, seq_len) * batch_size * seq_len
    vision = omni.vision_training_flops_per_pack(cfg, pack_size, model.connector_extras) * batch_size  # audio: not counted
    return {"llm": llm, "vision": vision, "total": llm + vision}


def timed_steps(step, state, batches, steps):
    weights = jnp.ones(NUM_MODALITIES)
    start = time.perf_counter()
    for i in range(2):
        state, metrics = step(state, batches[i % len(batches)], weights)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - start
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)], weights)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, warmup_s, float(metrics["loss"])


def benchmark(config, steps: int, num_batches: int) -> dict:
    if omni.audio_enabled(config):
        config = media.with_cmvn(config, FLAGS.workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    tokenizer = tokenizer_lib.get_tokenizer(config)
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    state, _, shardings = train_step.create_train_state(model, tx, mesh, rules, shapes, config.seed)
    step = train_step.jit_train_step(model, mesh, rules, shardings, batch_keys=build.batch_keys(config))
    host_batches = real_batches(config, tokenizer, num_batches)
    batches = [pipeline.make_global_batch(b, mesh) for b in host_batches]

    times, warmup_s, loss = timed_steps(step, state, batches, steps)
    step_time = float(np.median(times))
    batch_size, seq_len = config.train.batch_size, config.data.seq_len
    flops = step_flops(model, batch_size, seq_len, int(config.data.vision.patches_per_row))
    peak = mfu.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    return {
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "batch": [batch_size, seq_len], "patches_per_row": int(config.data.vision.patches_per_row),
        **fill_fractions(host_batches),
        "step_time_s": step_time, "step_time_min_s": float(np.min(times)),
        "tokens_per_s": batch_size * seq_len / step_time,
        "model_gflops_per_step": {k: v / 1e9 for k, v in flops.items()},
        "achieved_gflops_per_s": flops["total"] / step_time / 1e9,
        "peak_gflops_per_s": peak / 1e9,
        "mfu": flops["total"] / step_time / peak,
        "mfu_llm_only": flops["llm"] / step_time / peak,
        "compile_and_warmup_s": warmup_s, "final_loss": loss,
    }


def main(argv):
    del argv
    config = benchmark_config(FLAGS.config, [m for m in FLAGS.modalities if m])
    results = benchmark(config, FLAGS.steps, FLAGS.num_batches)
    results["config"] = config_flags.get_config_filename(FLAGS["config"])
    flops = results["model_gflops_per_step"]
    print(f"batch {results['batch']} + {results['patches_per_row']} patches/row "
          f"(token fill {results['token_fill']:.0%}, patch fill {results['patch_fill']:.0%}): "
          f"step {results['step_time_s'] * 1e3:.0f} ms, {results['tokens_per_s']:.0f} tokens/s, "
          f"{flops['total']:.1f} GFLOP/step (LLM {flops['llm']:.1f}, vision {flops['vision']:.1f}), "
          f"{results['achieved_gflops_per_s']:.1f} GFLOP/s of {results['peak_gflops_per_s']:.1f} peak, "
          f"MFU {100 * results['mfu']:.1f}% (LLM FLOPs only: {100 * results['mfu_llm_only']:.1f}%)")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)

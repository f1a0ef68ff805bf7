"""Train-step throughput: tokens/s, step time and MFU of one config's LLM.

    python benchmarks/train_throughput.py --config=configs/bench_32m.py [--steps=10] [--json=out.json]

Synthetic token batches (throughput does not depend on the data), the same
jitted, sharded train step and optimizer as `m2omni-train`. MFU counts model
FLOPs only (formula: m2omni_jax.models.llm.training_flops_per_token).
"""
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.models.llm import LLM, LLMConfig, training_flops_per_token
from m2omni_jax.parallel import sharding
from m2omni_jax.training import mfu, optimizers, train_step

config_flags.DEFINE_config_file("config", "configs/bench_32m.py", "Config file.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_string("json", "", "Write the results here as JSON (default: print only).")
FLAGS = flags.FLAGS
SCHEDULE_STEPS = 1000  # the LR schedule's length (warm-up from lr 0 is config.opt.warmup_steps)


def synthetic_batch(batch_size, seq_len, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, 3, seq_len))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((batch_size, seq_len), np.float32),
            "segment_ids": np.ones((batch_size, seq_len), np.int32),
            "positions": positions.copy(), "modality": np.zeros((batch_size, seq_len), np.int32)}


def build(config):
    """(LLMConfig, batch shape, train state, jitted step, device batch, loss weights) of
    `config`'s LLM, built as `m2omni-train` builds them (seed 0)."""
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    llm_config = LLMConfig.from_config(config.model.llm)
    model = LLM(llm_config)
    shape = (config.train.batch_size, config.data.seq_len)
    params = nn.unbox(train_step.abstract_boxed_params(model, {"tokens": shape}))
    tx = optimizers.make_optimizer(config.opt, SCHEDULE_STEPS, params)
    state, _, shardings = train_step.create_train_state(model, tx, mesh, rules, {"tokens": shape}, 0)
    step = train_step.jit_train_step(model, mesh, rules, shardings)
    batch = jax.device_put(synthetic_batch(*shape, llm_config.vocab_size), train_step.batch_shardings(mesh))
    return llm_config, shape, state, step, batch, jnp.ones(NUM_MODALITIES)


def benchmark(config, steps: int) -> dict:
    llm_config, shape, state, step, batch, weights = build(config)
    compile_start = time.perf_counter()
    for _ in range(2):
        state, metrics = step(state, batch, weights)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - compile_start

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, weights)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    tokens = shape[0] * shape[1]
    flops_per_token = training_flops_per_token(llm_config, shape[1])
    peak = mfu.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count()
    return {
        "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "params": llm_config.num_params(), "batch": shape,
        "step_time_s": step_time, "step_time_min_s": float(np.min(times)),
        "tokens_per_s": tokens / step_time,
        "model_tflops_per_step": flops_per_token * tokens / 1e12,
        "achieved_gflops_per_s": flops_per_token * tokens / step_time / 1e9,
        "peak_gflops_per_s": peak / 1e9, "mfu": flops_per_token * tokens / step_time / peak,
        "compile_and_warmup_s": warmup_s, "final_loss": float(metrics["loss"]),
    }


def main(argv):
    del argv
    results = benchmark(FLAGS.config, FLAGS.steps)
    results["config"] = config_flags.get_config_filename(FLAGS["config"])
    print(f"{results['params'] / 1e6:.1f}M params, batch {results['batch']}: "
          f"{results['tokens_per_s']:.0f} tokens/s, step {results['step_time_s'] * 1e3:.0f} ms, "
          f"{results['achieved_gflops_per_s']:.1f} GFLOP/s of {results['peak_gflops_per_s']:.1f} peak, "
          f"MFU {100 * results['mfu']:.1f}%")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)

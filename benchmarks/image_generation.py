"""Image-head sampling throughput: images/s of `models/image_head.sample` per sampler and step count.

    python benchmarks/image_generation.py [--steps=4,8,16,32] [--methods=euler,heun] \
        [--guidance_scales=1.0,4.0] [--batch=8] [--repeats=5] [--json=benchmarks/results/image_generation.json]

A small DiT (32×32×3 pixels, patch 4 → 64 tokens, width 128, depth 4, 4 heads) conditioned on
16 condition vectors of width 128, fp32, random weights (the time does not depend on them).
Each setting is one jitted `sample` call over a batch (the steps run in a lax.fori_loop);
after a compile + warm-up call, `repeats` calls are timed; images/s is from the fastest call
(the CPU is shared: other processes only ever slow a call down), the median is kept beside it.
Function evaluations per image: steps (Euler) or 2·steps (Heun), doubled by guidance ≠ 0, 1.

2 shared CPU cores, jax 0.10.2 (benchmarks/results/image_generation.json): time is proportional
to the evaluations, about 1,000 image-evaluations/s (8 ms per forward of 8 images): Euler with
4 steps ≈ 250 images/s, with 32 steps ≈ 30; Heun or guidance ≠ 1 halves that. Figures move by up
to 2× with the load other processes put on the cores.
"""
import dataclasses
import functools
import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from m2omni_jax.models import image_head as ih

flags.DEFINE_list("steps", ["4", "8", "16", "32"], "Sampler step counts.")
flags.DEFINE_list("methods", list(ih.SAMPLERS), "Which of image_head.SAMPLERS.")
flags.DEFINE_list("guidance_scales", ["1.0", "4.0"], "CFG scales (1.0: one forward pass per evaluation).")
flags.DEFINE_integer("batch", 8, "Images per sample call.")
flags.DEFINE_integer("num_cond", 16, "Condition vectors per image.")
flags.DEFINE_integer("repeats", 5, "Timed calls per setting.")
flags.DEFINE_string("json", "", "Write the results here as JSON (default: print only).")
FLAGS = flags.FLAGS

CONFIG = ih.ImageHeadConfig(image_size=32, patch_size=4, width=128, depth=4, num_heads=4, cond_width=128)


def timed_sampler(model, params, cond, cond_mask, num_steps, method, guidance_scale):
    run = jax.jit(functools.partial(ih.sample, model.apply, image_shape=CONFIG.image_shape, num_steps=num_steps,
                                    method=method, guidance_scale=guidance_scale))
    start = time.perf_counter()
    jax.block_until_ready(run(params, cond, cond_mask, jax.random.key(0)))  # compile + warm-up
    compile_s = time.perf_counter() - start
    times = []
    for i in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(params, cond, cond_mask, jax.random.key(i + 1)))
        times.append(time.perf_counter() - start)
    return compile_s, times


def main(_):
    model = ih.ImageHead(CONFIG)
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.normal(size=(FLAGS.batch, FLAGS.num_cond, CONFIG.cond_width)), jnp.float32)
    cond_mask = jnp.ones((FLAGS.batch, FLAGS.num_cond), bool)
    images = jnp.zeros((FLAGS.batch, *CONFIG.image_shape))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, jnp.zeros(FLAGS.batch), cond, cond_mask))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    results = {"backend": jax.default_backend(), "devices": str(jax.devices()),
               "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
               "config": {**dataclasses.asdict(CONFIG), "num_params": num_params}, "batch": FLAGS.batch,
               "num_cond": FLAGS.num_cond, "repeats": FLAGS.repeats, "settings": []}
    print(f"image head: {num_params / 1e6:.2f}M parameters, {CONFIG.num_patches} tokens per image, "
          f"batch {FLAGS.batch}, {jax.default_backend()}")
    for scale in map(float, FLAGS.guidance_scales):
        for method in FLAGS.methods:
            for num_steps in map(int, FLAGS.steps):
                compile_s, times = timed_sampler(model, params, cond, cond_mask, num_steps, method, scale)
                median = statistics.median(times)
                evaluations = num_steps * (2 if method == "heun" else 1) * (1 if scale in (0.0, 1.0) else 2)
                setting = {"method": method, "num_steps": num_steps, "guidance_scale": scale,
                           "evaluations_per_image": evaluations, "median_s_per_batch": median,
                           "min_s_per_batch": min(times), "images_per_s": FLAGS.batch / min(times),
                           "compile_and_warmup_s": compile_s}
                results["settings"].append(setting)
                print(f"{method:5s} steps={num_steps:3d} cfg={scale:g} evals/image={evaluations:3d}: "
                      f"{FLAGS.batch / min(times):7.1f} images/s ({min(times) * 1e3:6.1f} ms per batch of "
                      f"{FLAGS.batch}, median {median * 1e3:6.1f} ms, compile {compile_s:.1f} s)")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

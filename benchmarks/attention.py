"""Attention forward+backward time per implementation (models/layers.py: dot_product_attention).

    python benchmarks/attention.py [--repeats=7] [--iters=5] [--json=benchmarks/results/attention_cpu.json]

Two shapes, fp32, with the masks the towers build (packed segments + padding):
  llm: configs/bench_32m.py's attention, batch 8 × 512 tokens, 8 query / 4 kv heads of 64,
       causal within 3 packed documents per row, the tail padding;
  vit: the tower pre-training of configs/experiments/shapes_world_vqa.py, 32 rows × 256 patches, 4 heads of 16,
       7 images of 36 patches per row, the rest padding.
Implementations run alternately in one process (`repeats` rounds of `iters` calls each), so
load from other processes hits them alike; the figures are medians over rounds.

2 shared CPU cores, jax 0.10.2 (benchmarks/results/attention_cpu.json): "einsum" (ours) takes
15-25% less time than "xla" (jax.nn.dot_product_attention) at both shapes, so it is the default.
"""
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from m2omni_jax.models import layers
from m2omni_jax.models.llm import attention_mask
from m2omni_jax.models.vision import segment_attention

flags.DEFINE_integer("repeats", 7, "Alternating rounds.")
flags.DEFINE_integer("iters", 5, "Timed calls per implementation per round.")
flags.DEFINE_list("implementations", ["einsum", "xla"], "Which of layers.ATTENTION_IMPLEMENTATIONS.")
flags.DEFINE_string("json", "", "Write the results here as JSON (default: print only).")
FLAGS = flags.FLAGS


def packed_segments(batch, length, sizes):
    """Segment ids 1, 2, ... of the given sizes per row, 0 after them."""
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(sizes)])
    ids = np.pad(ids, (0, length - len(ids)))
    return jnp.asarray(np.broadcast_to(ids, (batch, length)), jnp.int32)


def llm_case(implementation):
    batch, length, heads, kv_heads, head_dim = 8, 512, 8, 4, 64
    segments = packed_segments(batch, length, (200, 150, 130))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attend(q, k, v):
        mask = attention_mask(segments, segments, positions, positions)
        return layers.dot_product_attention(q, k, v, mask, implementation=implementation)
    shapes = [(batch, length, heads, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2
    return attend, shapes


def vit_case(implementation, query_chunk=None):
    batch, length, heads, head_dim = 32, 256, 4, 16
    segments = packed_segments(batch, length, (36,) * 7)

    def attend(q, k, v):
        return segment_attention(q, k, v, segments, query_chunk, implementation=implementation)
    return attend, [(batch, length, heads, head_dim)] * 3


def forward_backward(attend, shapes):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, s, jnp.float32) for key, s in zip(keys, shapes))
    cotangent = jax.random.normal(keys[3], shapes[0], jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))  # compile
    return lambda: jax.block_until_ready(step(q, k, v))


def time_alternately(runs: dict, repeats: int, iters: int) -> dict:
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(iters):
                run()
            times[name].append((time.perf_counter() - start) / iters * 1e3)
    return times


def main(_):
    for name in FLAGS.implementations:
        layers.check_attention_implementation(name, "--implementations")
    cases = {"llm": llm_case, "vit": vit_case}
    results = {"backend": jax.default_backend(), "devices": str(jax.devices()), "machine": platform.processor()
               or platform.machine(), "jax": jax.__version__, "repeats": FLAGS.repeats, "iters": FLAGS.iters,
               "unit": "ms per forward+backward, median over rounds", "cases": {}}
    for case, make in cases.items():
        runs = {impl: forward_backward(*make(impl)) for impl in FLAGS.implementations}
        times = time_alternately(runs, FLAGS.repeats, FLAGS.iters)
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        results["cases"][case] = {"median_ms": medians, "all_ms": times}
        print(f"{case}: " + "  ".join(f"{impl} {ms:.2f} ms (min {min(times[impl]):.2f})"
                                      for impl, ms in medians.items()))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)

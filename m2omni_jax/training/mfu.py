"""Model-FLOPs utilisation: achieved model FLOP/s over the devices' peak.

Model FLOPs per token are in `m2omni_jax.models.llm.training_flops_per_token`.
Peak FLOP/s per device comes from a table of dense bf16 figures for
accelerators; for CPUs, where no spec number exists, it is measured once
with a large fp32 matmul (what a well-fused model could at best reach).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from vendors' spec sheets.
PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a (size×size)·(size×size) fp32 matmul on the default device."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops_per_device(override: float = 0.0) -> float:
    if override > 0:
        return override
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS_BY_KIND.items():
        if kind.startswith(prefix):
            return flops
    if device.platform == "cpu":
        # Fake CPU devices share the host's cores: the host peak is split among them.
        return measured_matmul_flops() / jax.local_device_count()
    raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; set config.train.peak_flops_per_device")

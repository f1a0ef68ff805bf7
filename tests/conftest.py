"""Gives JAX 8 fake CPU devices so sharding is tested for real.

The flag must be set before jax is imported anywhere in the test process.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import m2omni_jax.experiments  # noqa: E402,F401  (registers the built-in data set's source kinds, as cli.py does)

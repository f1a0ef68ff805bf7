"""M2-omni in JAX/Flax."""
__version__ = "0.1.0"

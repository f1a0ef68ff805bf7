"""Faults that stop a run with one line instead of a traceback (`cli.run` prints them).

ConfigError: a config field's value is unusable (exit 2, before anything heavy).
RunError: the run cannot go on (a busy or unwritable workdir, no readable checkpoint,
a failed save, too many non-finite steps); exit 1.
"""
from __future__ import annotations

from m2omni_jax.config_fields import ConfigError

__all__ = ["ConfigError", "RunError", "NonFiniteError"]


class RunError(RuntimeError):
    """The run stopped for a reason its message names; nothing to debug in a traceback."""


class NonFiniteError(RunError, FloatingPointError):
    """Too many consecutive non-finite steps (`config.train.max_nonfinite_steps`)."""

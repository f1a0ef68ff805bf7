"""Experiments on top of the framework: code that exists for one benchmark, not for the paper.

Importing this package registers the built-in data set's source kinds (`shapes_world`,
`text_corpus`), its connector plug-in and its scorer; every command does at start-up (cli.py).
"""
from m2omni_jax.experiments.shapes_world import source as _shapes_world_source  # noqa: F401
from m2omni_jax.experiments.shapes_world import regions as _shapes_world_regions  # noqa: F401 (connector plug-in)
from m2omni_jax.experiments.shapes_world import metrics as _shapes_world_metrics  # noqa: F401 (its scorer)

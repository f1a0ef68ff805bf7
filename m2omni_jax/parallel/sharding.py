"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and key activation in the models carries logical axis names
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`). Which mesh
axis each name is split over is decided here, by `LOGICAL_AXIS_RULES`, and
nowhere else; a config may replace the table (`config.sharding.rules`).

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
  expert  mixture-of-experts experts
  tensor  Megatron-style tensor parallelism (heads, MLP hidden, vocab)
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2omni_jax.config_fields import as_dict

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis

# Logical names used in the models. Parameter names describe weight dims;
# `activation_*` names describe activation dims.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_exp", "expert"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("expert", "expert"),
    ("patch", None),  # flattened patch pixels / audio feature dims
    ("conv", None),  # convolution kernel spatial dims
    ("queries", None),  # learnable query tokens (attention pooling, image head)
)


def mesh_shape_from_config(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the configured axis sizes (one may be -1) against the device count.

    Raises ValueError naming the axes and the device count when they do not fit.
    """
    mesh_config = as_dict(mesh_config)
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known axes are {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide the {num_devices} devices")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices "
            f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape_from_config(mesh_config, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / odd topologies: fall back to the given order
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def batch_axis_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_mesh_sharding(tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Maps a tree of logical PartitionSpecs (or boxed params) to NamedShardings."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Sharding for an input array whose `batch_dim` is the global batch."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Mesh + logical rules in scope, so `nn.with_logical_constraint` resolves.

    `jax.set_mesh` (not `with mesh:`) is what flax's constraints see in jax ≥ 0.7.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and key activation in the models carries logical axis names
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`). Which mesh
axis each name is split over is decided here, by `LOGICAL_AXIS_RULES`, and
nowhere else; a config may replace the table (`config.sharding.rules`).

Mesh axes (each of a slice's size times the slices it spans, `config.mesh.dcn`:
multislice over the data-centre network, `device_mesh`):
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


def mesh_shape_from_config(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, ...]:
    """The mesh's axis sizes (MESH_AXES order): each slice's sizes times the slices along it
    (`mesh_config["dcn"]`; none: one slice). One axis may be -1 (fills a slice's devices).

    Raises ValueError naming the axes and the device count when they do not fit.
    """
    ici, dcn = mesh_shapes_from_config(mesh_config, num_devices)
    return tuple(i * d for i, d in zip(ici, dcn))


def mesh_shapes_from_config(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice sizes, slices per axis): config.mesh's data/fsdp/expert/tensor are the sizes
    within one slice (ICI), `config.mesh.dcn` how many slices each axis spans (over DCN)."""
    mesh_config = as_dict(mesh_config)
    dcn = _dcn_shape(mesh_config.pop("dcn", None))
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ValueError(f"config.mesh.dcn {dict(zip(MESH_AXES, dcn))} spans {slices} slices, which do not "
                         f"divide the {num_devices} devices")
    return _slice_shape(mesh_config, num_devices // slices, slices), dcn


def _dcn_shape(dcn_config) -> tuple[int, ...]:
    dcn_config = as_dict(dcn_config) if dcn_config is not None else {}
    unknown = set(dcn_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh.dcn has unknown axes {sorted(unknown)}; known axes are {MESH_AXES}")
    dcn = tuple(int(dcn_config.get(axis, 1)) for axis in MESH_AXES)
    if any(s < 1 for s in dcn):
        raise ValueError(f"config.mesh.dcn: slices per axis must be ≥ 1, got {dict(zip(MESH_AXES, dcn))}")
    return dcn


def _slice_shape(mesh_config: Mapping[str, int], num_devices: int, slices: int) -> tuple[int, ...]:
    """The per-slice sizes, one -1 resolved against the slice's `num_devices`."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known axes are {MESH_AXES} (and dcn)")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    where = f"{num_devices} devices" + (f" in each of {slices} slices" if slices > 1 else "")
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide the {where}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices "
            f"but {where} are available")
    return tuple(sizes)


def device_mesh(devices: Sequence[Any], ici_shape: Sequence[int], dcn_shape: Sequence[int]) -> np.ndarray:
    """The devices as an array of shape ici·dcn: one slice, the topology-aware order
    (`create_device_mesh`); several, `create_hybrid_device_mesh`: slice s fills block s of
    the dcn grid, so only the dcn axes' collectives cross slices. Slices are the devices'
    `slice_index` (multislice TPU), else their processes (a GPU cluster's hosts)."""
    slices = math.prod(dcn_shape)
    if slices == 1:
        try:
            return mesh_utils.create_device_mesh(tuple(ici_shape), devices=devices)
        except Exception:  # CPU / odd topologies: fall back to the given order
            return np.asarray(devices).reshape(tuple(ici_shape))
    by_slice = hasattr(devices[0], "slice_index")
    granules = {d.slice_index if by_slice else d.process_index for d in devices}
    if len(granules) != slices:
        raise ValueError(f"config.mesh.dcn asks for {slices} slices but the devices come from {len(granules)} "
                         f"{'slices' if by_slice else 'processes'}; set config.mesh.dcn to the slice count")
    return mesh_utils.create_hybrid_device_mesh(tuple(ici_shape), tuple(dcn_shape), devices,
                                                process_is_granule=not by_slice)


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shapes_from_config(mesh_config, len(devices))
    return Mesh(device_mesh(devices, ici, dcn), MESH_AXES)


def batch_axis_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_mesh_sharding(tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Maps a tree of logical PartitionSpecs (or boxed params) to NamedShardings. A boxed
    param's dimension that its mesh axes do not divide is replicated instead (the SAN-M
    tower's 560-wide input over 32 FSDP chips, say)."""
    specs = nn.get_partition_spec(tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
    values = _unbox_values(tree)
    if not any(hasattr(x, "shape") for x in jax.tree.leaves(values)):
        return shardings
    return jax.tree.map(lambda s, x: _divisible(s, x.shape), shardings, values)


def _unbox_values(tree):
    """The boxes' values, with no sharding constraint applied (`nn.unbox` applies one when a
    mesh is active, which abstract shapes cannot take)."""
    def value(x):
        return x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else nn.unbox(x)
    return jax.tree.map(value, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _divisible(named: NamedSharding, shape) -> NamedSharding:
    def axes_size(entry):
        return math.prod(named.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
    spec = [e if e is None or dim % axes_size(e) == 0 else None for e, dim in zip(named.spec, shape)]
    return named if list(named.spec) == spec else NamedSharding(named.mesh, P(*spec))


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


"""Sharded training equals single-device training; mesh/config errors are clear."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.parallel import sharding
from m2omni_jax.training import train_step

CONFIG = LLMConfig(vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, mrope_sections=(2, 3, 3), remat_policy="full")
BATCH, LENGTH = 8, 16


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH + 1), dtype=np.int32)
    segments = np.where(np.arange(LENGTH) < 10, 1, 2).astype(np.int32)[None].repeat(BATCH, 0)
    segments[:, -2:] = 0  # padding
    pos = np.concatenate([np.arange(10), np.arange(LENGTH - 10)]).astype(np.int32)
    return {
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": (segments > 0).astype(np.float32),
        "segment_ids": segments,
        "positions": np.broadcast_to(pos, (BATCH, 3, LENGTH)).copy(),
        "modality": rng.integers(0, 3, (BATCH, LENGTH), dtype=np.int32),
    }


def loss_and_grads(mesh_config):
    devices = jax.devices() if mesh_config else jax.devices()[:1]
    mesh = sharding.make_mesh(mesh_config or {"data": 1}, devices)
    model = LLM(CONFIG)
    tx = optax.adamw(1e-2)
    state, _, shardings = train_step.create_train_state(
        model, tx, mesh, sharding.LOGICAL_AXIS_RULES, {"tokens": (BATCH, LENGTH)}, seed=0)
    batch = jax.device_put(make_batch(), train_step.batch_shardings(mesh))
    weights = jnp.ones(NUM_MODALITIES)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(train_step.loss_fn, model=model, z_loss_weight=1e-4),
                                         has_aux=True))
    with sharding.activate(mesh):
        (loss, _), grads = grad_fn(state.params, batch, weights)
    step = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, shardings)
    state, metrics = step(state, batch, weights)
    state, metrics = step(state, batch, weights)
    return float(loss), jax.device_get(grads), float(metrics["loss"]), state


@pytest.fixture(scope="module")
def single_device():
    return loss_and_grads(None)


@pytest.mark.parametrize("mesh_config", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
                                         {"data": 1, "fsdp": 4, "tensor": 2}])
def test_sharded_loss_and_grads_equal_single_device(single_device, mesh_config):
    loss1, grads1, second_loss1, _ = single_device
    loss, grads, second_loss, state = loss_and_grads(mesh_config)
    assert abs(loss - loss1) < 1e-5
    assert abs(second_loss - second_loss1) < 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), grads, grads1)
    # Parameters really are split as the rules say.
    kernel = state.params["decoder"]["layers"]["mlp"]["gate"]["kernel"]  # (layers, embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    shard_shape = kernel.addressable_shards[0].data.shape
    assert shard_shape == (2, 64 // state_mesh_size(kernel, "fsdp"), 128 // state_mesh_size(kernel, "tensor"))


def state_mesh_size(array, axis):
    return array.sharding.mesh.shape[axis]


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="has 4 devices but 8"):
        sharding.mesh_shape_from_config({"data": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape_from_config({"data": -1, "tensor": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape_from_config({"dta": 8}, 8)
    assert sharding.mesh_shape_from_config({"data": -1, "tensor": 2}, 8) == (4, 1, 1, 2)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What the mesh builders read of a device; CPU devices have no slice_index."""
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "fake"


def fake_slices(slices, per_slice):
    return [FakeDevice(s * per_slice + i, s) for s in range(slices) for i in range(per_slice)]


@pytest.mark.parametrize("mesh_config, ici, dcn, slice_axis", [
    ({"data": 1, "fsdp": -1, "dcn": {"data": 2}}, (1, 4, 1, 1), (2, 1, 1, 1), 0),
    ({"data": 1, "fsdp": 2, "tensor": 2, "dcn": {"fsdp": 2}}, (1, 2, 1, 2), (1, 2, 1, 1), 1)])
def test_multislice_mesh_puts_each_slice_in_its_dcn_block(mesh_config, ici, dcn, slice_axis):
    devices = fake_slices(2, 4)
    assert sharding.mesh_shapes_from_config(mesh_config, 8) == (ici, dcn)
    assert sharding.mesh_shape_from_config(mesh_config, 8) == tuple(i * d for i, d in zip(ici, dcn))
    grid = np.vectorize(lambda d: d.slice_index)(sharding.device_mesh(devices, ici, dcn))
    assert grid.shape == tuple(i * d for i, d in zip(ici, dcn))
    halves = np.split(grid, 2, axis=slice_axis)  # the dcn axis: slice 0's block, then slice 1's
    assert (halves[0] == 0).all() and (halves[1] == 1).all()
    assert sorted(d.id for d in sharding.device_mesh(devices, ici, dcn).flat) == list(range(8))


def test_single_slice_mesh_is_unchanged():
    config = {"data": 2, "fsdp": -1, "tensor": 2}
    assert sharding.mesh_shapes_from_config(config, 8) == ((2, 2, 1, 2), (1, 1, 1, 1))
    assert sharding.mesh_shapes_from_config(dict(config, dcn={"data": 1}), 8)[0] == (2, 2, 1, 2)
    mesh = sharding.make_mesh(config)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_multislice_errors_name_the_problem():
    with pytest.raises(ValueError, match="spans 3 slices, which do not divide the 8 devices"):
        sharding.mesh_shapes_from_config({"data": -1, "dcn": {"data": 3}}, 8)
    with pytest.raises(ValueError, match="has 8 devices but 4 devices in each of 2 slices"):
        sharding.mesh_shapes_from_config({"data": 8, "dcn": {"fsdp": 2}}, 8)
    with pytest.raises(ValueError, match="dcn has unknown axes"):
        sharding.mesh_shapes_from_config({"data": -1, "dcn": {"pipeline": 2}}, 8)
    # 8 CPU devices of one process are not 2 slices: the mesh says so instead of guessing.
    with pytest.raises(ValueError, match="asks for 2 slices but the devices come from 1 processes"):
        sharding.make_mesh({"data": -1, "dcn": {"data": 2}})


def test_a_dimension_its_mesh_axes_do_not_divide_is_replicated():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    boxed = {"odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8), jnp.float32), ("embed", "mlp")),
             "even": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 8), jnp.float32), ("embed", "mlp"))}
    specs = {k: s.spec for k, s in sharding.logical_to_mesh_sharding(boxed, mesh).items()}
    assert specs == {"odd": jax.sharding.PartitionSpec(None, "tensor"),
                     "even": jax.sharding.PartitionSpec("fsdp", "tensor")}

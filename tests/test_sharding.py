"""Sharded training equals single-device training; mesh/config errors are clear."""
import functools

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

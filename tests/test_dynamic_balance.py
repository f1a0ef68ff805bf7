"""Dynamic adaptive balance in the loop: validation passes, weights, exact resume."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance, dynamic_balance, train_step

CONFIG = LLMConfig(vocab_size=64, width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=8,
                   mlp_dim=32, mrope_sections=(1, 1, 2))


def batch_of(name, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 9), dtype=np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((4, 8), np.float32),
            "segment_ids": np.ones((4, 8), np.int32),
            "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (4, 3, 8)).copy(),
            "modality": np.full((4, 8), modality_id(name), np.int32)}


@pytest.fixture(scope="module")
def setup():
    mesh = sharding.make_mesh({"data": -1})
    model = LLM(CONFIG)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((4, 8), jnp.int32))["params"]))()
    loss_fn = functools.partial(train_step.loss_fn, model=model, z_loss_weight=0.0)
    val = dynamic_balance.jit_validation_loss(loss_fn, mesh, sharding.LOGICAL_AXIS_RULES, None)
    batches = {n: [batch_of(n, s) for s in range(2)] for n in ("text", "image")}
    return model, params, loss_fn, val, batches


def test_validation_loss_is_each_modalitys_mean_loss(setup):
    model, params, loss_fn, val, batches = setup
    adaptive = balance.AdaptiveBalance(("text", "image"), window=2)
    balancer = dynamic_balance.DynamicBalancer(adaptive, batches, val, interval_steps=5)
    losses = balancer.validate(params)
    expected = np.mean([float(loss_fn(params, b, jnp.ones(NUM_MODALITIES))[0]) for b in batches["image"]])
    np.testing.assert_allclose(losses["image"], expected, rtol=1e-5)


def test_weights_stay_one_for_window_then_follow_the_rule_and_resume(setup):
    model, params, loss_fn, val, batches = setup
    adaptive = balance.AdaptiveBalance(("text", "image"), window=2, temperature=1.0)
    balancer = dynamic_balance.DynamicBalancer(adaptive, batches, val, interval_steps=5)
    assert balancer.due(10) and not balancer.due(11)
    # Fake passes: text still falling, image flat -> text must gain weight after H passes.
    curve = {"text": [3.0, 2.0, 1.0], "image": [1.0, 1.0, 1.0]}
    for i in range(2):
        balancer.state = adaptive.update(balancer.state, {n: c[i] for n, c in curve.items()})
        np.testing.assert_array_equal(balancer.weights_vector(), np.ones(NUM_MODALITIES))
    saved = balancer.to_json()
    balancer.state = adaptive.update(balancer.state, {n: c[2] for n, c in curve.items()})
    w = balancer.weights_vector()
    assert w[modality_id("text")] > 1.0 > w[modality_id("image")]
    assert w[modality_id("video")] == 1.0  # not balanced
    resumed = dynamic_balance.DynamicBalancer(adaptive, batches, val, interval_steps=5)
    resumed.load_json(saved)
    resumed.state = adaptive.update(resumed.state, {n: c[2] for n, c in curve.items()})
    np.testing.assert_array_equal(resumed.weights_vector(), w)
    logged = balancer.update(params)
    assert set(logged) == {"val_loss/text", "val_loss/image", "balance/weight/text", "balance/weight/image"}

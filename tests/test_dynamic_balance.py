"""Dynamic adaptive balance in the loop: validation passes, weights, exact resume."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance, balance_optax, dynamic_balance, train_step

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


def test_weights_stay_one_for_window_then_follow_the_rule_and_resume(setup, tmp_path):
    """The balance's state is optimizer state: updated by a pure function of it, read by
    `loss_weights`, and checkpointed with it (an Orbax round trip continues exactly)."""
    model, params, loss_fn, val, batches = setup
    adaptive = balance.AdaptiveBalance(("text", "image"), window=2, temperature=1.0)
    tx = optax.chain(optax.adam(1e-3), balance_optax.dynamic_balance(adaptive))
    opt_state = tx.init(params)
    observe = jax.jit(functools.partial(balance_optax.observe_validation_losses, adaptive))
    # Fake passes: text still falling, image flat -> text must gain weight after H passes.
    curve = {"text": [3.0, 2.0, 1.0], "image": [1.0, 1.0, 1.0]}
    for i in range(2):
        opt_state = observe(opt_state, {n: c[i] for n, c in curve.items()})
        np.testing.assert_array_equal(balance_optax.loss_weights(opt_state), np.ones(NUM_MODALITIES))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt", opt_state)
    checkpointer.wait_until_finished()
    after = observe(opt_state, {n: c[2] for n, c in curve.items()})
    w = np.asarray(balance_optax.loss_weights(after))
    assert w[modality_id("text")] > 1.0 > w[modality_id("image")]
    assert w[modality_id("video")] == 1.0  # not balanced
    expected_state = adaptive.update(adaptive.update(adaptive.update(
        adaptive.init(), {n: c[0] for n, c in curve.items()}), {n: c[1] for n, c in curve.items()}),
        {n: c[2] for n, c in curve.items()})
    np.testing.assert_array_equal(w[[modality_id("text"), modality_id("image")]], expected_state["weights"])
    restored = checkpointer.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state))
    resumed = observe(restored, {n: c[2] for n, c in curve.items()})
    np.testing.assert_array_equal(balance_optax.loss_weights(resumed), w)
    # The updates pass through the balance unchanged.
    grads = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_array_equal(*(jax.tree.leaves(u)[0] for u in (
        tx.update(grads, after, params)[0], optax.adam(1e-3).update(grads, after[0], params)[0])))


def test_the_train_step_reads_the_weights_and_the_balancer_updates_the_state(setup):
    model, params, loss_fn, val, batches = setup
    adaptive = balance.AdaptiveBalance(("text", "image"), window=2)
    tx = optax.chain(optax.sgd(0.0), balance_optax.dynamic_balance(adaptive))
    opt_state = tx.init(params)
    for losses in ({"text": 3.0, "image": 1.0}, {"text": 2.0, "image": 1.0}, {"text": 1.0, "image": 1.0}):
        opt_state = balance_optax.observe_validation_losses(adaptive, opt_state, losses)
    weights = np.asarray(balance_optax.loss_weights(opt_state))
    assert weights[modality_id("image")] < 1.0
    state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(jax.random.key(0)), tx=tx)
    batch = batches["image"][0]
    _, metrics = train_step.train_step(state, batch, jnp.ones(NUM_MODALITIES), model=model)
    expected = loss_fn(params, batch, jnp.asarray(weights))[0]
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), weights[modality_id("image")] *
                               float(loss_fn(params, batch, jnp.ones(NUM_MODALITIES))[0]), rtol=1e-5)

    balancer = dynamic_balance.DynamicBalancer(adaptive, batches, val, interval_steps=5)
    assert balancer.due(10) and not balancer.due(11)
    fresh = state.replace(opt_state=tx.init(params))
    assert balancer.update_state(11, fresh) == (fresh, None)
    new, logged = balancer.update_state(10, fresh)
    assert set(logged) == {"val_loss/text", "val_loss/image", "balance/weight/text", "balance/weight/image"}
    history = np.asarray(new.opt_state[1].history)
    np.testing.assert_allclose(history[-1], [logged["val_loss/text"], logged["val_loss/image"]], rtol=1e-6)
    assert int(new.opt_state[1].num_passes) == 1

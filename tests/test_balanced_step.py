"""Step balance: the combined gradient is Σ wᵢ ∇Lᵢ of separately computed gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance, balance_optax, balanced_step, train_step

CONFIG = LLMConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   mlp_dim=64, mrope_sections=(1, 1, 2))
MODALITIES = ("text", "image", "video")
BATCH, LENGTH = 4, 8


def micro_batches(seed=0):
    rng = np.random.default_rng(seed)
    m = len(MODALITIES)
    tokens = rng.integers(0, CONFIG.vocab_size, (m, BATCH, LENGTH + 1), dtype=np.int32)
    modality = np.stack([np.full((BATCH, LENGTH), modality_id(n), np.int32) for n in MODALITIES])
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": np.ones((m, BATCH, LENGTH), np.float32),
            "segment_ids": np.ones((m, BATCH, LENGTH), np.int32),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (m, BATCH, 3, LENGTH)).copy(),
            "modality": modality}


def setup(mesh, weights=np.ones(len(MODALITIES)), grad_clip=0.0):
    model = LLM(CONFIG)
    # sgd(1): update == −gradient, so the step exposes the combined gradient.
    tx = balance_optax.step_balance(optax.sgd(1.0), weights, grad_clip)
    state, _, shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                        {"tokens": (BATCH, LENGTH)}, seed=0)
    loss_fn = functools.partial(train_step.loss_fn, model=model, z_loss_weight=0.0)
    return state, shardings, loss_fn


def test_combined_gradient_is_weighted_sum_of_separate_gradients():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    weights = balance.step_balance_weights(np.array([2.0, 1.0, 0.5]), alpha=10.0)
    state, shardings, loss_fn = setup(mesh, weights)
    batches = micro_batches()
    before = jax.device_get(state.params)

    separate = []
    for i in range(len(MODALITIES)):
        one = {k: v[i] for k, v in batches.items()}
        grad = jax.grad(lambda p: loss_fn(p, one, jnp.ones(NUM_MODALITIES))[0])(before)
        separate.append(grad)
    expected = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)), *separate)

    ndims = {k: np.ndim(v) - 1 for k, v in batches.items()}
    step = balanced_step.jit_balanced_step(loss_fn, mesh, sharding.LOGICAL_AXIS_RULES, shardings, ndims)
    state, metrics = step(state, batches)
    applied = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))  # = combined grad
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6), applied, expected)
    assert np.asarray(metrics["micro_losses"]).shape == (3,)
    np.testing.assert_allclose(float(metrics["loss"]), float(np.dot(weights, metrics["micro_losses"])), rtol=1e-6)
    # The optimizer state is at the start of the next cycle; its weights are the run's.
    balance_state = balance_optax.step_balance_state(state.opt_state)
    assert int(balance_state.micro_step) == 0 and not any(np.any(g) for g in jax.tree.leaves(balance_state.grad_sum))
    np.testing.assert_array_equal(balance_state.weights, np.asarray(weights, np.float32))


def test_clip_weighted_sum_clips_the_average_and_keeps_alpha():
    grad_sum = {"a": jnp.array([30.0, 40.0])}  # Σw = 10: the average is (3, 4), norm 5
    clipped, norm = balance_optax.clip_weighted_sum(grad_sum, jnp.float32(10.0), grad_clip=1.0)
    np.testing.assert_allclose(clipped["a"], [6.0, 8.0], rtol=1e-6)  # 10 · (3, 4)/5
    assert float(norm) == pytest.approx(5.0)
    for clip in (0.0, 5.5):  # off, or above the average's norm (the sum's is 50: it would clip)
        kept, _ = balance_optax.clip_weighted_sum(grad_sum, jnp.float32(10.0), grad_clip=clip)
        np.testing.assert_allclose(kept["a"], [30.0, 40.0], rtol=1e-6)


def test_step_clips_the_weighted_average_then_scales_by_alpha():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    weights = balance.step_balance_weights(np.array([2.0, 1.0, 0.5]), alpha=10.0)
    state, shardings, loss_fn = setup(mesh, weights)
    batches = micro_batches()
    before = jax.device_get(state.params)
    grads = [jax.grad(lambda p, i=i: loss_fn(p, {k: v[i] for k, v in batches.items()},
                                             jnp.ones(NUM_MODALITIES))[0])(before) for i in range(3)]
    average = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)) / 10.0, *grads)
    average_norm = float(optax.global_norm(average))
    clip = 0.5 * average_norm
    state, shardings, loss_fn = setup(mesh, weights, grad_clip=clip)
    ndims = {k: np.ndim(v) - 1 for k, v in batches.items()}
    step = balanced_step.jit_balanced_step(loss_fn, mesh, sharding.LOGICAL_AXIS_RULES, shardings, ndims)
    state, metrics = step(state, batches)
    applied = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))  # sgd(1): the gradient
    expected = jax.tree.map(lambda g: 10.0 * 0.5 * g, average)  # α × the average clipped to half its norm
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6), applied, expected)
    assert float(optax.global_norm(applied)) == pytest.approx(10.0 * clip, rel=1e-4)
    assert float(metrics["grad_norm"]) == pytest.approx(average_norm, rel=1e-4)


def test_frozen_leaves_get_a_zero_combined_gradient():
    """train_step.without_gradient_through: the embedding, frozen, gets no gradient (sgd: no
    change); the other leaves move as without the mask."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, shardings, loss_fn = setup(mesh)
    before = jax.device_get(state.params)
    frozen = jax.tree_util.tree_map_with_path(lambda path, _: "embed" in jax.tree_util.keystr(path), before)
    assert 0 < sum(jax.tree.leaves(frozen)) < len(jax.tree.leaves(frozen))
    batches = micro_batches()
    ndims = {k: np.ndim(v) - 1 for k, v in batches.items()}
    masked = balanced_step.jit_balanced_step(train_step.without_gradient_through(frozen, loss_fn), mesh,
                                             sharding.LOGICAL_AXIS_RULES, shardings, ndims)
    after_masked = jax.device_get(masked(state, batches)[0].params)
    state, shardings, loss_fn = setup(mesh)  # the masked step donated the first state
    plain = balanced_step.jit_balanced_step(loss_fn, mesh, sharding.LOGICAL_AXIS_RULES, shardings, ndims)
    after_plain = jax.device_get(plain(state, batches)[0].params)
    for is_frozen, b, m, p in zip(*(jax.tree.leaves(t) for t in (frozen, before, after_masked, after_plain))):
        np.testing.assert_allclose(m, b if is_frozen else p, rtol=1e-5, atol=1e-7)
        assert is_frozen or np.abs(p - b).max() > 0


def test_step_balance_transformation_updates_once_per_cycle_like_multisteps():
    """Three micro-gradients in: zero updates twice, then the inner optimizer's update of the
    clipped weighted sum, and the accumulator is empty again (bitwise the formula)."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = [{"w": jnp.array(g)} for g in ([0.3, -1.0, 2.0], [1.5, 0.25, -0.75], [-0.5, 4.0, 1.0])]
    weights = np.array([5.0, 3.0, 2.0], np.float32)
    inner = optax.adam(0.1)
    tx = balance_optax.step_balance(inner, weights, grad_clip=1.0)
    state = tx.init(params)
    for g in grads[:2]:
        updates, state = jax.jit(tx.update)(g, state, params)
        np.testing.assert_array_equal(updates["w"], np.zeros(3, np.float32))
    updates, state = jax.jit(tx.update)(grads[2], state, params)
    total = jnp.zeros(3, jnp.float32)
    for w, g in zip(weights, grads):
        total = total + w * g["w"]
    average = total / weights.sum()
    norm = jnp.sqrt(jnp.sum(average * average))
    clipped = average * (weights.sum() * jnp.minimum(1.0, 1.0 / norm))
    expected, _ = inner.update({"w": clipped}, inner.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    assert int(state.micro_step) == 0 and float(state.average_norm) == pytest.approx(float(norm), rel=1e-6)
    np.testing.assert_array_equal(state.grad_sum["w"], np.zeros(3, np.float32))

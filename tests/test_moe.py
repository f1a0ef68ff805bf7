"""Mixture-of-experts FFN: routing, capacity dropping, aux losses, sharding, training."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.models import moe
from m2omni_jax.models.llm import LLM, LLMConfig, init_cache
from m2omni_jax.parallel import sharding

# width 8 = one basis vector per token, so a router kernel row *is* that token's logits.
LAYER_CFG = LLMConfig(vocab_size=16, width=8, depth=2, num_heads=2, num_kv_heads=1, head_dim=4,
                      mlp_dim=16, mrope_sections=(1, 0, 1), moe_num_experts=4)
LLM_CFG = LLMConfig(vocab_size=64, width=32, depth=4, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=32, mrope_sections=(1, 1, 2), rope_theta=10_000.0, moe_num_experts=4,
                    moe_capacity_factor=1.0)


def abstract_params(model, length=8):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"])


def random_params(abstract, seed=0):
    """Fan-in-scaled random parameters drawn on the host: a jitted init compiles for ~10 s on CPU."""
    rng = np.random.default_rng(seed)

    def draw(box):
        shape = box.value.shape
        if box.names[-1] == "norm":
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)
    return jax.tree.map(draw, abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def silu(z):
    return z / (1 + np.exp(-z))


def init_layer(cfg, x, segment_ids):
    layer = moe.MoEFeedForward(cfg)
    abstract = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, segment_ids)["params"])
    return layer, random_params(abstract)


def apply_layer(layer, params, x, segment_ids):
    y, state = jax.jit(lambda p: layer.apply({"params": p}, x, segment_ids, mutable=["intermediates"]))(params)
    return np.asarray(y), state["intermediates"]


def expert_ffn(params, e, x):
    gate, up, down = (params[n]["kernel"][e] for n in ("gate", "up", "down"))
    return (silu(x @ gate) * (x @ up)) @ down


def reference_moe(params, x, mask, top_k, capacity):
    """Loop form: first choices queue before second choices; full experts drop the choice."""
    probs = softmax(x @ params["router"]["kernel"])
    out = np.zeros_like(x)
    for g in range(x.shape[0]):
        choices = np.argsort(-probs[g], axis=-1)[:, :top_k]
        fill = np.zeros(probs.shape[-1], int)
        for j in range(top_k):
            for s in range(x.shape[1]):
                e = choices[s, j]
                if not mask[g, s] or fill[e] >= capacity:
                    continue
                fill[e] += 1
                gate = probs[g, s, e] / probs[g, s, choices[s]].sum()
                out[g, s] += gate * expert_ffn(params, e, x[g, s])
    return out


def random_inputs(shape=(2, 12, 8), seed=0):
    x = np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)
    segments = np.ones(shape[:2], np.int32)
    segments[1, -3:] = 0  # padding
    return x, segments


def test_expert_capacity():
    assert moe.expert_capacity(12, 4, 2, 1.0) == 6
    assert moe.expert_capacity(12, 4, 2, 1.25) == 8  # ceil(7.5)
    assert moe.expert_capacity(1, 8, 2, 1.25) == 1
    assert moe.expert_capacity(12, 2, 2, 4.0) == 12  # never more than the row
    assert moe.expert_capacity(12, 4, 2, 0.0) == 12  # ≤ 0: no dropping


def test_expert_kernels_are_initialised_per_expert_fan_in():
    layer = moe.ExpertDense(64, ("expert", "embed", "mlp"))
    kernel = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((8, 1, 1, 64))))["params"]["kernel"]
    assert kernel.shape == (8, 64, 64)
    assert float(jnp.std(kernel)) == pytest.approx(64 ** -0.5, rel=0.05)  # not (8·64)^-½


def test_top2_gates_are_renormalised_probabilities():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 5, 6)))
    gates, index = moe.top_k_gates(probs, 2)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    top = np.take_along_axis(np.asarray(probs), np.asarray(index), -1)
    np.testing.assert_allclose(gates, top / top.sum(-1, keepdims=True), rtol=1e-6)
    assert (top[..., 0] >= top[..., 1]).all()


def test_output_is_gate_weighted_sum_of_top2_experts():
    cfg = dataclasses.replace(LAYER_CFG, moe_capacity_factor=0.0)  # room for every token
    x, segments = random_inputs()
    layer, params = init_layer(cfg, x, segments)
    y, _ = apply_layer(layer, params, x, segments)
    probs = softmax(x @ params["router"]["kernel"])
    for g, s in [(0, 0), (0, 7), (1, 3)]:
        e1, e2 = np.argsort(-probs[g, s])[:2]
        g1 = probs[g, s, e1] / (probs[g, s, e1] + probs[g, s, e2])
        expected = g1 * expert_ffn(params, e1, x[g, s]) + (1 - g1) * expert_ffn(params, e2, x[g, s])
        np.testing.assert_allclose(y[g, s], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y[1, -3:], 0.0)  # padding is never routed


@pytest.mark.parametrize("capacity_factor", [1.0, 0.5])
def test_layer_matches_loop_reference_with_dropping(capacity_factor):
    cfg = dataclasses.replace(LAYER_CFG, moe_capacity_factor=capacity_factor)
    x, segments = random_inputs()
    layer, params = init_layer(cfg, x, segments)
    y, inter = apply_layer(layer, params, x, segments)
    capacity = moe.expert_capacity(12, 4, 2, capacity_factor)
    np.testing.assert_allclose(y, reference_moe(params, x, segments > 0, 2, capacity), rtol=1e-4, atol=1e-5)
    assert float(moe.moe_metrics(inter)["moe_dropped_fraction"]) > 0


def test_capacity_drops_exactly_the_overflow():
    # Token 0 is padding: it must take no slot. Capacity 2, experts 0..2.
    prefs = [(0, 1), (0, 1), (0, 2), (0, 1), (1, 0)]  # (first, second) choice per token
    probs = np.full((1, 5, 3), 0.1, np.float32)
    for s, (a, b) in enumerate(prefs):
        probs[0, s, a], probs[0, s, b] = 0.6, 0.3
    mask = np.array([[False, True, True, True, True]])
    routing = moe.route(jnp.asarray(probs), jnp.asarray(mask), top_k=2, capacity=2)
    # First choices: t1→e0#0, t2→e0#1, t3→e0 full, t4→e1#0.
    # Second choices: t1→e1#1, t2→e2#0, t3→e1 full, t4→e0 full.
    expected_kept = [[False, False], [True, True], [True, True], [False, False], [True, False]]
    np.testing.assert_array_equal(routing.kept[0], expected_kept)
    expected = np.zeros((5, 3, 2))
    for s, e, c in [(1, 0, 0), (2, 0, 1), (4, 1, 0), (1, 1, 1), (2, 2, 0)]:
        expected[s, e, c] = 1.0
    np.testing.assert_array_equal(routing.dispatch[0], expected)
    np.testing.assert_allclose(routing.combine[0, 4, 1, 0], 2 / 3, rtol=1e-6)  # renormalised, partner dropped
    np.testing.assert_allclose(routing.combine[0].sum((1, 2)), [0, 1, 1, 0, 2 / 3], rtol=1e-6)


# Hand-set router logits: token s is basis vector s, so its logits are kernel row s.
HAND_LOGITS = np.array([[2, 1, 0, 0],  # top-2 {0, 1}
                        [2, 0, 1, 0],  # {0, 2}
                        [0, 1, 0, 2],  # {3, 1}
                        [1, 0, 0, 2],  # {3, 0}
                        [5, 4, 0, 0],  # padding
                        [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)


def hand_routed_layer(router_kernel, lb_weight=0.01, z_weight=0.001):
    cfg = dataclasses.replace(LAYER_CFG, moe_aux_loss_weight=lb_weight, moe_router_z_loss_weight=z_weight)
    x = np.eye(8, dtype=np.float32)[None, :5]
    segments = np.array([[1, 1, 2, 2, 0]], np.int32)
    layer, params = init_layer(cfg, x, segments)
    params["router"]["kernel"] = router_kernel
    return apply_layer(layer, params, x, segments)[1]


def test_aux_loss_on_known_routing():
    inter = hand_routed_layer(HAND_LOGITS)
    fraction = np.array([3, 2, 1, 2]) / 8  # of the 8 top-2 choices of the 4 real tokens
    mean_prob = softmax(HAND_LOGITS[:4]).mean(0)
    balance = 4 * np.sum(fraction * mean_prob)
    log_z = np.log(np.exp(HAND_LOGITS[:4]).sum(-1))
    z_loss = np.mean(log_z ** 2)
    metrics = moe.moe_metrics(inter)
    np.testing.assert_allclose(metrics["moe_load_balance_loss"], balance, rtol=1e-6)
    np.testing.assert_allclose(metrics["moe_router_z_loss"], z_loss, rtol=1e-6)
    np.testing.assert_allclose(moe.moe_aux_loss(inter), 0.01 * balance + 0.001 * z_loss, rtol=1e-6)
    # The padding token's router logits do not count.
    other = hand_routed_layer(HAND_LOGITS * np.array([[1], [1], [1], [1], [-3], [1], [1], [1]]))
    np.testing.assert_allclose(moe.moe_aux_loss(other), moe.moe_aux_loss(inter), rtol=1e-7)


def test_uniform_routing_gives_exactly_the_weight():
    inter = hand_routed_layer(np.zeros((8, 4), np.float32), z_weight=0.0)
    assert float(moe.moe_aux_loss(inter)) == pytest.approx(0.01, rel=1e-7)
    # Balanced top-1 choices with non-uniform probabilities: f = P = 1/2.
    probs = jnp.array([[[0.7, 0.3], [0.3, 0.7]]])
    index = jnp.array([[[0], [1]]])
    assert float(moe.load_balance_loss(probs, index, jnp.ones((1, 2), bool))) == pytest.approx(1.0)


DENSE_CFG = LLMConfig(vocab_size=11, width=8, depth=2, num_heads=2, num_kv_heads=1, head_dim=4,
                      mlp_dim=12, mrope_sections=(1, 0, 1))
# Recorded from llm.py before MoE existed: checkpoints of dense models must still load.
DENSE_LAYER_TREE = {
    "attention/key/kernel": ((8, 1, 4), ("embed", "kv_heads", "head_dim")),
    "attention/out/kernel": ((2, 4, 8), ("heads", "head_dim", "embed")),
    "attention/query/kernel": ((8, 2, 4), ("embed", "heads", "head_dim")),
    "attention/value/kernel": ((8, 1, 4), ("embed", "kv_heads", "head_dim")),
    "attention_norm/scale": ((8,), ("norm",)),
    "mlp/down/kernel": ((12, 8), ("mlp", "embed")),
    "mlp/gate/kernel": ((8, 12), ("embed", "mlp")),
    "mlp/up/kernel": ((8, 12), ("embed", "mlp")),
    "mlp_norm/scale": ((8,), ("norm",)),
}
TOP_TREE = {"embedding": ((11, 8), ("vocab", "embed")), "final_norm/scale": ((8,), ("norm",)),
            "lm_head/kernel": ((8, 11), ("embed", "vocab"))}


def param_tree(cfg):
    boxed = jax.eval_shape(lambda: LLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {"/".join(k.key for k in path): (tuple(box.value.shape), tuple(box.names)) for path, box in leaves}


def test_dense_parameter_tree_is_unchanged():
    scanned = {f"decoder/layers/{k}": ((2,) + shape, ("layers",) + axes)
               for k, (shape, axes) in DENSE_LAYER_TREE.items()}
    assert param_tree(DENSE_CFG) == {**TOP_TREE, **scanned}
    unrolled = {f"decoder/layers_{i}/{k}": v for i in range(2) for k, v in DENSE_LAYER_TREE.items()}
    assert param_tree(dataclasses.replace(DENSE_CFG, scan_layers=False)) == {**TOP_TREE, **unrolled}


def test_moe_every_second_layer_scans_pairs():
    cfg = dataclasses.replace(DENSE_CFG, depth=4, moe_num_experts=4)
    tree = param_tree(cfg)
    assert tree["decoder/layers/layer_0/mlp/gate/kernel"] == ((2, 8, 12), ("layers", "embed", "mlp"))
    assert tree["decoder/layers/layer_1/mlp/gate/kernel"] == ((2, 4, 8, 12), ("layers", "expert", "embed", "mlp"))
    assert tree["decoder/layers/layer_1/mlp/down/kernel"] == ((2, 4, 12, 8), ("layers", "expert", "mlp", "embed"))
    assert tree["decoder/layers/layer_1/mlp/router/kernel"] == ((2, 8, 4), ("layers", "embed", None))
    assert cfg.num_params() == sum(np.prod(s) for s, _ in tree.values())
    idle_experts = 2 * (4 - 2) * 3 * 8 * 12  # 2 MoE layers × 2 unused experts × SwiGLU
    assert cfg.num_params(active=True) == cfg.num_params() - idle_experts
    unrolled = param_tree(dataclasses.replace(cfg, scan_layers=False))
    assert [k for k in unrolled if k.endswith("router/kernel")] == [
        "decoder/layers_1/mlp/router/kernel", "decoder/layers_3/mlp/router/kernel"]
    with pytest.raises(ValueError, match="moe_every"):
        dataclasses.replace(cfg, depth=3)


def test_prefill_then_decode_matches_full_forward():
    cfg = dataclasses.replace(LLM_CFG, moe_capacity_factor=0.0, remat_policy="none")  # decoding never drops
    model = LLM(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    params = random_params(abstract_params(model))
    full = jax.jit(model.apply)({"params": params}, tokens)
    step = jax.jit(lambda c, t, p: model.apply({"params": params, "cache": c}, t, p, decode=True,
                                               mutable=["cache"]))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    logits, variables = step(init_cache(model, 2, 12), tokens[:, :5], positions[:, :5])
    outs = [logits]
    for i in range(5, 9):
        logits, variables = step(variables["cache"], tokens[:, i:i + 1], positions[:, i:i + 1])
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=3e-5)


# --------------------------------------------------------------------------
# Training and sharding
# --------------------------------------------------------------------------

BATCH, LENGTH = 8, 16


def make_batch():
    rng = np.random.default_rng(0)
    start = rng.integers(0, LLM_CFG.vocab_size, (BATCH, 1))
    tokens = ((start + 3 * np.arange(LENGTH + 1)) % LLM_CFG.vocab_size).astype(np.int32)
    segments = np.where(np.arange(LENGTH) < 10, 1, 2).astype(np.int32)[None].repeat(BATCH, 0)
    segments[:, -3:] = 0
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}


def loss_fn(params, batch, *, model):
    """Masked next-token CE + MoE aux loss, wired as the train step should be."""
    logits, state = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                                mutable=["intermediates"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    aux = moe.moe_aux_loss(state)
    return jnp.sum(ce * mask) / mask.sum() + aux, (logits, aux)


class Setup:
    """One model, batch and jitted loss-and-grad per mesh; the tests share its compilation."""

    def __init__(self, mesh_config=None):
        devices = jax.devices() if mesh_config else jax.devices()[:1]
        self.mesh = sharding.make_mesh(mesh_config or {"data": 1}, devices)
        model = LLM(LLM_CFG)
        abstract = abstract_params(model)
        self.params = jax.device_put(random_params(abstract),
                                     sharding.logical_to_mesh_sharding(abstract, self.mesh))
        self.batch = jax.device_put(make_batch(), sharding.batch_sharding(self.mesh, 2))
        self._grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model=model), has_aux=True))

    def grads(self, params=None):
        """((loss, (logits, aux)), grads)"""
        with sharding.activate(self.mesh):
            return self._grad_fn(self.params if params is None else params, self.batch)


@pytest.fixture(scope="module")
def single():
    return Setup()


def test_moe_llm_trains(single):
    tx = optax.adam(1e-2)
    params, opt_state = single.params, tx.init(single.params)
    update = jax.jit(lambda g, o, p: tx.update(g, o, p))
    losses = []
    for i in range(10):
        (loss, (_, aux)), grads = single.grads(params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
        if i == 0:
            router_grad = grads["decoder"]["layers"]["layer_1"]["mlp"]["router"]["kernel"]
            assert float(jnp.abs(router_grad).max()) > 0
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0 < float(aux) < 0.1


def test_llm_aux_loss_averages_over_moe_layers(single):
    zero_router = lambda p, v: jnp.zeros_like(v) if "router" in jax.tree_util.keystr(p) else v  # noqa: E731
    (_, (_, aux)), _ = single.grads(jax.tree_util.tree_map_with_path(zero_router, single.params))
    # Both MoE layers route uniformly: balance 1, z = ln(4)², averaged (not summed) over the 2 layers.
    assert float(aux) == pytest.approx(0.01 + 0.001 * np.log(4) ** 2, rel=1e-6)
    assert float(moe.moe_aux_loss({})) == 0.0  # a dense model sows nothing


@pytest.mark.parametrize("mesh_config", [{"data": 2, "expert": 2, "tensor": 2}, {"fsdp": 2, "expert": 4}])
def test_sharded_equals_single_device(single, mesh_config):
    sharded = Setup(mesh_config)
    (loss, (logits, aux)), grads = jax.device_get(sharded.grads())
    (loss1, (logits1, aux1)), grads1 = jax.device_get(single.grads())
    np.testing.assert_allclose(logits, logits1, rtol=1e-4, atol=1e-4)  # a flipped routing would be O(0.1)
    np.testing.assert_allclose(aux, aux1, rtol=1e-6)
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    # fp32 summation order differs across shardings (the dense model shows the same ~1e-5 noise).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4 * np.abs(b).max()),
                 grads, grads1)
    kernel = sharded.params["decoder"]["layers"]["layer_1"]["mlp"]["gate"]["kernel"]  # (layers, expert, embed, mlp)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    mesh = kernel.sharding.mesh.shape
    assert kernel.addressable_shards[0].data.shape == (
        2, 4 // mesh["expert"], 32 // mesh["fsdp"], 32 // mesh["tensor"])

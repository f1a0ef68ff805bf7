"""The Llama-3/M-RoPE decoder: rotary maths, packing isolation, KV-cache decoding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.models import rope
from m2omni_jax.models.llm import LLM, LLMConfig, init_cache, training_flops_per_token

TINY = LLMConfig(vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=64, mrope_sections=(2, 3, 3), rope_theta=10_000.0)


def init_params(config=TINY, length=12):
    model = LLM(config)
    tokens = jnp.zeros((2, length), jnp.int32)
    return model, nn.unbox(model.init(jax.random.key(0), tokens)["params"])


def random_tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


def test_rope_matches_textbook_formula():
    positions = jnp.arange(7)[None]
    x = jax.random.normal(jax.random.key(0), (1, 7, 1, 8))
    out = rope.apply_rotary(x, rope.rope_angles(positions, 8, 10_000.0))
    xn = np.asarray(x)[0, :, 0]
    expected = np.empty_like(xn)
    for p in range(7):
        for i in range(4):
            theta = p * 10_000.0 ** (-2 * i / 8)
            a, b = xn[p, i], xn[p, i + 4]
            expected[p, i] = a * np.cos(theta) - b * np.sin(theta)
            expected[p, i + 4] = b * np.cos(theta) + a * np.sin(theta)
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_mrope_with_equal_ids_is_1d_rope():
    positions = jax.random.randint(jax.random.key(3), (2, 9), 0, 500)
    one_d = rope.rope_angles(positions, 16, 10_000.0)
    m = rope.mrope_angles(jnp.stack([positions] * 3), 16, (2, 3, 3), 10_000.0)
    np.testing.assert_array_equal(np.asarray(one_d), np.asarray(m))


def test_mrope_sections_pick_their_axis():
    t, h, w = (jnp.full((1, 1), v) for v in (3, 5, 7))
    angles = np.asarray(rope.mrope_angles(jnp.stack([t, h, w]), 16, (2, 3, 3), 10_000.0))[0, 0]
    inv = 10_000.0 ** (-np.arange(0, 16, 2) / 16)
    expected = np.concatenate([3 * inv[:2], 5 * inv[2:5], 7 * inv[5:]])
    np.testing.assert_allclose(angles, expected, rtol=1e-6)


def test_interleaved_mrope_matches_qwen3vl_and_spreads_every_axis():
    # Qwen3-VL's rule for sections (24, 20, 20): pair j is h when j % 3 == 1 and w when
    # j % 3 == 2 (j < 60), else t.
    j = np.arange(64)
    qwen3 = np.where((j % 3 == 1) & (j < 60), 1, np.where((j % 3 == 2) & (j < 60), 2, 0))
    np.testing.assert_array_equal(rope.mrope_axis_of_pair((24, 20, 20), "interleaved"), qwen3)
    for sections in ((2, 3, 3), (8, 12, 12), (16, 24, 24)):
        axes = rope.mrope_axis_of_pair(sections, "interleaved")
        np.testing.assert_array_equal(np.bincount(axes, minlength=3), sections)
        # Every axis gets one of the three highest frequencies (sectioned: w gets the lowest).
        assert set(axes[:3]) == {0, 1, 2}
        assert 2 not in set(rope.mrope_axis_of_pair(sections, "sectioned")[:3])
    t, h, w = (jnp.full((1, 1), v) for v in (3, 5, 7))
    angles = np.asarray(rope.mrope_angles(jnp.stack([t, h, w]), 16, (2, 3, 3), 10_000.0, "interleaved"))[0, 0]
    ids = np.array([3, 5, 7])[rope.mrope_axis_of_pair((2, 3, 3), "interleaved")]
    np.testing.assert_allclose(angles, ids * 10_000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    with pytest.raises(ValueError, match="mrope_layout"):
        LLMConfig(**{**TINY.__dict__, "mrope_layout": "spiral"})


def test_model_mrope_equal_ids_equals_1d_positions():
    model, params = init_params()
    tokens = random_tokens((2, 12))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits_1d = model.apply({"params": params}, tokens, positions)
    logits_3d = model.apply({"params": params}, tokens, jnp.stack([positions] * 3))
    np.testing.assert_array_equal(np.asarray(logits_1d), np.asarray(logits_3d))
    # ... and distinct (t, h, w) ids do change the output.
    grid = jnp.stack([positions, positions // 2, positions % 3])
    assert not np.allclose(logits_1d, model.apply({"params": params}, tokens, grid))


def test_packed_segments_do_not_attend_across():
    model, params = init_params()
    a, b = random_tokens((1, 5), seed=1), random_tokens((1, 7), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    packed_logits = model.apply({"params": params}, packed, positions, segments)
    alone_a = model.apply({"params": params}, a)
    alone_b = model.apply({"params": params}, b)
    np.testing.assert_allclose(packed_logits[:, :5], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 5:], alone_b, atol=1e-5)
    # Changing sample a must not move sample b's logits at all.
    other = model.apply({"params": params}, packed.at[0, 2].set((packed[0, 2] + 1) % 97), positions, segments)
    np.testing.assert_array_equal(np.asarray(other[:, 5:]), np.asarray(packed_logits[:, 5:]))


@pytest.mark.parametrize("scan_layers,attention", [(True, "einsum"), (False, "einsum"), (True, "xla")])
def test_prefill_then_decode_matches_full_forward(scan_layers, attention):
    config = LLMConfig(**{**TINY.__dict__, "scan_layers": scan_layers, "attention_implementation": attention})
    model, params = init_params(config)
    tokens = random_tokens((2, 11))
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    full = model.apply({"params": params}, tokens, positions)
    cache = init_cache(model, 2, 16)
    step = jax.jit(lambda c, t, p: model.apply({"params": params, "cache": c}, t, p, decode=True, mutable=["cache"]))
    logits, variables = step(cache, tokens[:, :6], positions[:, :6])
    outs = [logits]
    for i in range(6, 11):
        logits, variables = step(variables["cache"], tokens[:, i:i + 1], positions[:, i:i + 1])
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5)


def test_attention_implementations_give_the_same_logits_and_gradients():
    """model.llm.attention_implementation "xla" (jax.nn.dot_product_attention) == "einsum" (ours)."""
    model, params = init_params()
    tokens = random_tokens((2, 12))
    segments = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(5), jnp.zeros(2, jnp.int32)])[None]
    positions = jnp.concatenate([positions, jnp.arange(12)[None]])

    def loss_and_grads(implementation):
        config = LLMConfig(**{**TINY.__dict__, "attention_implementation": implementation})
        loss = lambda p: jnp.mean(LLM(config).apply({"params": p}, tokens, positions, segments) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)
    (loss, grads), (ref_loss, ref_grads) = loss_and_grads("xla"), loss_and_grads("einsum")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axes():
    model = LLM(TINY)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


def test_num_params_matches_initialised_tree():
    model, params = init_params()
    assert TINY.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_flops_formula_counts_attention():
    short, long = training_flops_per_token(TINY, 128), training_flops_per_token(TINY, 256)
    assert long - short == 12 * TINY.depth * TINY.num_heads * TINY.head_dim * 128


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LLMConfig(**{**TINY.__dict__, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="mrope_sections"):
        LLMConfig(**{**TINY.__dict__, "mrope_sections": (4, 4, 4)})
    with pytest.raises(ValueError, match="unknown fields"):
        LLMConfig.from_config({**TINY.__dict__, "widht": 3})
    with pytest.raises(ValueError, match="model.llm.attention_implementation"):
        LLMConfig(**{**TINY.__dict__, "attention_implementation": "flash"})

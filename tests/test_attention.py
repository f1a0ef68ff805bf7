"""models/layers.py: dot_product_attention — every implementation gives the same outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.models import layers
from m2omni_jax.models.audio import masked_attention
from m2omni_jax.models.llm import attention_mask
from m2omni_jax.models.vision import segment_attention

CPU_IMPLEMENTATIONS = ("einsum", "xla")


def qkv(batch, length, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    return q, k, v, cotangent


def packed(rows):
    """Segment ids (B, L) from per-row lists of segment sizes; 0 (padding) fills to the longest."""
    length = max(sum(r) for r in rows) + 3
    out = np.zeros((len(rows), length), np.int32)
    for i, sizes in enumerate(rows):
        out[i, :sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    return jnp.asarray(out)


def value_and_grads(attend, q, k, v, cotangent):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent),
                                      argnums=(0, 1, 2)))(q, k, v), attend(q, k, v)


def assert_implementations_agree(make_attend, q, k, v, cotangent):
    """make_attend(implementation) -> attend(q, k, v); outputs and gradients equal to 1e-5."""
    results = {impl: value_and_grads(make_attend(impl), q, k, v, cotangent) for impl in CPU_IMPLEMENTATIONS}
    (ref_grads, ref_out), ref_name = results.pop("einsum"), "einsum"
    for name, (grads, out) in results.items():
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5, err_msg=f"{name} vs {ref_name}")
        for g, ref in zip(grads[1], ref_grads[1]):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} vs {ref_name} grad")
        assert np.isfinite(np.asarray(out)).all()


def test_llm_causal_packed_gqa_agrees():
    segments = packed([[5, 7, 4], [9, 3], [16]])
    positions = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    q, k, v, cotangent = qkv(*segments.shape, heads=6, kv_heads=2, head_dim=16)
    mask = attention_mask(segments, segments, positions, positions)
    assert_implementations_agree(
        lambda impl: lambda q, k, v: layers.dot_product_attention(q, k, v, mask, implementation=impl),
        q, k, v, cotangent)


@pytest.mark.parametrize("query_chunk", [None, 5])
def test_vit_segments_agree_and_chunks_change_nothing(query_chunk):
    segments = packed([[4, 6, 2], [12], [3, 3, 3, 3]])  # 15 patches, the last 3 padding
    q, k, v, cotangent = qkv(*segments.shape, heads=4, kv_heads=4, head_dim=8, seed=1)
    assert_implementations_agree(
        lambda impl: lambda q, k, v: segment_attention(q, k, v, segments, query_chunk, implementation=impl),
        q, k, v, cotangent)
    if query_chunk:  # chunked == whole
        whole = value_and_grads(lambda q, k, v: segment_attention(q, k, v, segments), q, k, v, cotangent)
        chunked = value_and_grads(lambda q, k, v: segment_attention(q, k, v, segments, query_chunk),
                                  q, k, v, cotangent)
        for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_audio_key_padding_and_empty_clip_agree():
    """A clip with no valid frame has no key to attend to: every implementation averages all values."""
    frame_mask = jnp.array([[True] * 7 + [False] * 3, [True] * 10, [False] * 10])
    q, k, v, cotangent = qkv(3, 10, heads=2, kv_heads=2, head_dim=8, seed=2)
    assert_implementations_agree(lambda impl: lambda q, k, v: masked_attention(q, k, v, frame_mask, impl),
                                 q, k, v, cotangent)
    out = masked_attention(q, k, v, frame_mask)
    np.testing.assert_allclose(out[2], jnp.broadcast_to(v[2].mean(0), out[2].shape), rtol=1e-5, atol=1e-6)


def test_masked_keys_get_no_weight():
    """Changing a masked key or value moves nothing, in every implementation."""
    segments = packed([[4, 6]])
    mask = segments[:, None, :, None] == segments[:, None, None, :]
    q, k, v, _ = qkv(*segments.shape, heads=2, kv_heads=1, head_dim=8, seed=3)
    for impl in CPU_IMPLEMENTATIONS:
        out = layers.dot_product_attention(q, k, v, mask, implementation=impl)
        moved = layers.dot_product_attention(q, k.at[:, 5].add(100.0), v.at[:, 5].add(100.0), mask,
                                             implementation=impl)
        np.testing.assert_array_equal(np.asarray(moved[:, :4]), np.asarray(out[:, :4]))


def test_no_mask_is_plain_softmax_attention():
    q, k, v, _ = qkv(2, 6, heads=4, kv_heads=2, head_dim=8, seed=4)
    k_full, v_full = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k_full) / jnp.sqrt(8.0), axis=-1)
    expected = jnp.einsum("bhqk,bkhd->bqhd", probs, v_full)
    for impl in CPU_IMPLEMENTATIONS:
        np.testing.assert_allclose(layers.dot_product_attention(q, k, v, implementation=impl), expected,
                                   rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_named():
    q, k, v, _ = qkv(1, 4, heads=2, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="flash"):
        layers.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_agrees_in_bfloat16():
    segments = packed([[5, 7, 4], [9, 3]])
    positions = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    q, k, v, _ = qkv(*segments.shape, heads=4, kv_heads=2, head_dim=64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = attention_mask(segments, segments, positions, positions)
    ref = layers.dot_product_attention(q, k, v, mask, implementation="einsum")
    out = layers.dot_product_attention(q, k, v, mask, implementation="cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_the_configured_implementation_reaches_the_vit_and_the_attention_pool():
    """model.vision.attention_implementation: the ViT's blocks and the attn_pool connector
    compute the same outputs with "einsum" and "xla" (same parameters)."""
    import dataclasses

    from m2omni_jax.models.connectors import make_connector
    from m2omni_jax.models.vision import VisionConfig, VisionEncoder

    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    mask = jnp.asarray([[True] * 9, [True] * 5 + [False] * 4])
    pools = {impl: make_connector("attn_pool", 32, 4, num_heads=4, attention_implementation=impl)
             for impl in ("einsum", "xla")}
    params = pools["einsum"].init(jax.random.key(0), tokens, mask)
    np.testing.assert_allclose(pools["xla"].apply(params, tokens, mask), pools["einsum"].apply(params, tokens, mask),
                               rtol=1e-5, atol=1e-5)

    config = VisionConfig(width=16, depth=1, num_heads=2, out_width=16)
    patches = jnp.asarray(rng.normal(size=(1, 16, config.patch_dim)), jnp.float32)
    segment_ids = jnp.asarray([[1] * 8 + [2] * 4 + [0] * 4])
    hw = jnp.asarray(np.stack([np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)])[None])
    towers = {impl: VisionEncoder(dataclasses.replace(config, attention_implementation=impl))
              for impl in ("einsum", "xla")}
    params = towers["einsum"].init(jax.random.key(1), patches, segment_ids, hw)
    out = {impl: towers[impl].apply(params, patches, segment_ids, hw) for impl in towers}
    for a, b in zip(jax.tree.leaves(out["xla"]), jax.tree.leaves(out["einsum"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.vision.attention_implementation='flash'"):
        VisionConfig(attention_implementation="flash")


def test_causal_query_blocks_change_nothing():
    """causal_blocks > 1 skips the keys after each query block: same outputs and gradients."""
    segments = packed([[5, 7, 4], [9, 3], [16]])  # 19 positions: 20 after one more padding
    segments = jnp.pad(segments, ((0, 0), (0, 1)))
    positions = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    q, k, v, cotangent = qkv(*segments.shape, heads=6, kv_heads=2, head_dim=16, seed=5)
    mask = attention_mask(segments, segments, positions, positions)
    whole = value_and_grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask), q, k, v, cotangent)
    blocked = value_and_grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal_blocks=4),
                              q, k, v, cotangent)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

"""LoRA: fresh adapters are a no-op, merged = adapted (LLM alone and inside the omni model, with
images), dropout only in training, the ~5% rank.

That a training step moves only the LoRA tree is tested with the real step, in test_dpo.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m2omni_jax.data import chat, image_preprocessing as ip
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.omni import ConnectorConfig, OmniConfig, OmniModel
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import lora, train_step

TINY = dict(vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64,
            mrope_sections=(2, 3, 3), rope_theta=10_000.0)
CONFIG = lora.LoRAConfig(rank=4)


def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles much faster than threefry on CPU


def setup():
    model = LLM(LLMConfig(**TINY, remat_policy="none"))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY["vocab_size"])
    params = jax.jit(lambda t: nn.unbox(model.init(rbg_key(0), t)["params"]))(tokens)
    return model, params, tokens


def unrolled(params):
    """The same weights for the unscanned stack (decoder/layers_i)."""
    stacked = params["decoder"].pop("layers")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    params["decoder"].update({f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(depth)})
    return params


def trained_like(lora_params, seed=3):
    """Non-zero B (a fresh adapter has B = 0) so the branch actually contributes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32), lora_params)


def adapted(model, **kw):
    return jax.jit(lambda p, lp, t, rng=None: lora.apply_with_lora(model, p, lp, t, rng=rng, config=CONFIG, **kw))


@pytest.fixture(scope="module")
def scanned():
    model, params, tokens = setup()
    return model, params, tokens, adapted(model), jax.jit(model.apply)


def test_shapes_and_zero_b(scanned):
    _, params, *_ = scanned
    lp = lora.init_lora(params, CONFIG)
    attn, mlp = lp["decoder"]["layers"]["attention"], lp["decoder"]["layers"]["mlp"]
    assert attn["query"]["lora_a"].shape == (2, 32, 4) and attn["query"]["lora_b"].shape == (2, 4, 4, 16)
    assert attn["key"]["lora_b"].shape == (2, 4, 2, 16)
    assert attn["out"]["lora_a"].shape == (2, 4, 16, 4) and attn["out"]["lora_b"].shape == (2, 4, 32)
    assert mlp["down"]["lora_a"].shape == (2, 64, 4) and mlp["gate"]["lora_b"].shape == (2, 4, 64)
    assert all(not np.any(b) for b in jax.tree.leaves(lp)[1::2])
    a = np.asarray(attn["query"]["lora_a"])
    assert np.all(np.abs(a) <= 32 ** -0.5) and a.std() > 0.05  # uniform ±1/sqrt(fan_in)
    assert not np.allclose(a[0], a[1])  # layers get independent draws


def check_fresh_and_merged(model, params, tokens, forward, base_forward):
    lp = lora.init_lora(params, CONFIG)
    base = base_forward({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(forward(params, lp, tokens)), np.asarray(base))
    lp = trained_like(lp)
    out = forward(params, lp, tokens)
    assert float(jnp.abs(out - base).max()) > 0.1  # the adapters do something
    merged = base_forward({"params": lora.merge_lora(params, lp, CONFIG)}, tokens)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(out), atol=1e-5, rtol=1e-5)


def test_fresh_is_base_and_merged_is_adapted_scanned(scanned):
    check_fresh_and_merged(*scanned)


def test_fresh_is_base_and_merged_is_adapted_unrolled(scanned):
    _, params, tokens, *_ = scanned
    model = LLM(LLMConfig(**TINY, scan_layers=False, remat_policy="full"))  # the interceptor under nn.remat
    params = unrolled(jax.tree.map(lambda x: x, params))
    assert "layers_1" in lora.init_lora(params, CONFIG)["decoder"]
    check_fresh_and_merged(model, params, tokens, adapted(model), jax.jit(model.apply))


PATCH = 6  # the placeholder id (the tokenizer's <imagePatch>)


def omni_inputs(seed=0):
    """Two rows: text, a 56x56 image (16 patches, 4 placeholders at 2..5), text; pack of 32 patches."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, TINY["vocab_size"], (2, 12)).astype(np.int32)
    tokens[:, 2:6] = PATCH
    image, grid = ip.patchify(rng.normal(size=(56, 56, 3)).astype(np.float32))
    patches = np.zeros((2, 32, image.shape[1]), np.float32)
    patches[:, :16] = image[None] + np.arange(2, dtype=np.float32)[:, None, None]  # a different image per row
    segments = np.zeros((2, 32), np.int32)
    segments[:, :16] = 1
    hw = np.zeros((2, 2, 32), np.int32)
    hw[:, :, :16] = ip.hw_positions(grid)
    positions = np.stack([chat.mrope_positions(row, [(1, 2, 2)], (PATCH,)) for row in tokens])
    return train_step.model_inputs({"tokens": tokens, "positions": positions, "segment_ids": np.ones_like(tokens),
                                    "vision_patches": patches, "vision_segment_ids": segments, "vision_hw": hw})


def test_omni_fresh_is_base_and_merged_is_adapted_with_images():
    model = OmniModel(OmniConfig(llm=LLMConfig(**TINY, remat_policy="none"),
                                 vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
                                 connector=ConnectorConfig(output_scale=4.0, position_frequencies=2),
                                 placeholder_ids=(PATCH,)))
    inputs = omni_inputs()
    params = jax.jit(lambda x: nn.unbox(model.init(rbg_key(0), **x)["params"]))(inputs)
    assert {"llm", "vision", "connector", "position_embedding"} <= set(params)
    lp = lora.init_lora(params, CONFIG)
    assert set(lp) == {"llm"}  # adapters on the LLM's decoder only: no vision / connector kernels
    jax.tree.map(np.testing.assert_array_equal, lp["llm"], lora.init_lora(params["llm"], CONFIG))
    assert lora.rank_for_fraction(params) == lora.rank_for_fraction(params["llm"])  # ~5% of the LLM

    forward = jax.jit(lambda p, lp, x: lora.apply_with_lora(model, p, lp, config=CONFIG, **x))
    base_forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    base = base_forward(params, inputs)
    np.testing.assert_array_equal(np.asarray(forward(params, lp, inputs)), np.asarray(base))
    other_images = dict(inputs, vision_patches=inputs["vision_patches"][::-1])
    assert float(jnp.abs(base_forward(params, other_images) - base).max()) > 1e-3  # the images are seen
    lp = trained_like(lp)
    out = forward(params, lp, inputs)
    assert float(jnp.abs(out - base).max()) > 0.1
    merged = lora.merge_lora(params, lp, CONFIG)
    for tower in ("vision", "connector", "position_embedding"):
        jax.tree.map(np.testing.assert_array_equal, merged[tower], params[tower])
    np.testing.assert_allclose(np.asarray(base_forward(merged, inputs)), np.asarray(out), atol=1e-5, rtol=1e-5)


def test_dropout_in_training_only(scanned):
    model, params, tokens, evaluate, _ = scanned
    lp = trained_like(lora.init_lora(params, CONFIG))
    train = adapted(model, deterministic=False)
    eval_out = evaluate(params, lp, tokens)
    np.testing.assert_array_equal(np.asarray(evaluate(params, lp, tokens, rbg_key(7))),
                                  np.asarray(eval_out))
    train_a, train_b = train(params, lp, tokens, rbg_key(7)), train(params, lp, tokens, rbg_key(8))
    assert float(jnp.abs(train_a - eval_out).max()) > 1e-3
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(train(params, lp, tokens, rbg_key(7))), np.asarray(train_a))
    with pytest.raises(ValueError, match="dropout rng"):
        lora.apply_with_lora(model, params, lp, tokens, deterministic=False)


def test_fraction_and_default_rank(scanned):
    _, params, *_ = scanned
    lp = lora.init_lora(params, CONFIG)
    c = LLMConfig(**TINY)
    per_layer = (2 * (c.width + c.num_heads * c.head_dim) + 2 * (c.width + c.num_kv_heads * c.head_dim)
                 + 3 * (c.width + c.mlp_dim))
    assert lora.params_per_rank(params) == c.depth * per_layer
    assert lora.lora_fraction(params, lp) == pytest.approx(4 * c.depth * per_layer / c.num_params())
    default = lora.init_lora(params)
    rank = default["decoder"]["layers"]["mlp"]["up"]["lora_a"].shape[-1]
    assert rank == lora.rank_for_fraction(params) == round(0.05 * c.num_params() / (c.depth * per_layer))


@pytest.mark.parametrize("dims, rank, fraction", [
    (dict(vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=704,
          mrope_sections=(8, 12, 12)), 9, 0.0484),  # configs/tiny.py
    (dict(vocab_size=128_256, width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128,
          mlp_dim=14_336), 153, 0.0499),  # Llama-3.1-8B (configs/m2omni_9b.py)
])
def test_default_rank_lands_near_five_percent(dims, rank, fraction):
    model = LLM(LLMConfig(**dims))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    lp = jax.eval_shape(lambda: lora.init_lora(params))
    assert lp["decoder"]["layers"]["attention"]["query"]["lora_a"].shape[-1] == rank
    assert lora.lora_fraction(params, lp) == pytest.approx(fraction, abs=5e-5)


def test_logical_axes_need_no_new_rules(scanned):
    _, params, *_ = scanned
    boxed = lora.init_lora(params, CONFIG, boxed=True)
    specs = nn.get_partition_spec(boxed)["decoder"]["layers"]
    assert tuple(specs["attention"]["query"]["lora_a"]) == ("layers", "embed", None)
    assert tuple(specs["attention"]["query"]["lora_b"]) == ("layers", None, "heads", "head_dim")
    assert tuple(specs["attention"]["out"]["lora_a"]) == ("layers", "heads", "head_dim", None)
    assert tuple(specs["mlp"]["down"]["lora_b"]) == ("layers", None, "embed")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4, "expert": 1}, jax.devices()[:8])
    shardings = sharding.logical_to_mesh_sharding(boxed, mesh)
    assert shardings["decoder"]["layers"]["mlp"]["gate"]["lora_b"].spec == P(None, None, "tensor")

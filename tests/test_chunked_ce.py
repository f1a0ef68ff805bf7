"""Chunked LM head + cross-entropy (model.llm.lm_head_chunk): the same loss, metrics and
gradients as the whole-logits path, on the LLM and the omni model, and no whole logits."""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_omni import AUDIO_CONFIG, make_audio_batch

from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.omni import OmniModel
from m2omni_jax.parallel import sharding
from m2omni_jax.training import train_step

LLM_CONFIG = LLMConfig(vocab_size=96, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=64, mrope_sections=(2, 3, 3))
BATCH, LENGTH = 4, 22  # 22: not a multiple of the chunks below (the padded tail must drop out)
WEIGHTS = np.array([1.0, 0.5, 2.0] + [1.0] * (NUM_MODALITIES - 3), np.float32)


def text_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, LLM_CONFIG.vocab_size, (BATCH, LENGTH + 1), dtype=np.int32)
    mask = (rng.random((BATCH, LENGTH)) < 0.7) * rng.choice([1.0, 0.25], (BATCH, LENGTH))  # weighted tokens
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask.astype(np.float32),
            "segment_ids": np.ones((BATCH, LENGTH), np.int32),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, 3, LENGTH)).copy(),
            "modality": rng.integers(0, 3, (BATCH, LENGTH), dtype=np.int32)}


def with_chunk(model, chunk):
    if isinstance(model, LLM):
        return LLM(dataclasses.replace(model.config, lm_head_chunk=chunk))
    return OmniModel(dataclasses.replace(model.config, llm=dataclasses.replace(model.config.llm,
                                                                               lm_head_chunk=chunk)))


def loss_and_grads(model, params, batch):
    loss = functools.partial(train_step.loss_fn, model=model, z_loss_weight=1e-3)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch, WEIGHTS)


def assert_same(plain, chunked):
    (loss, metrics), grads = plain
    (chunk_loss, chunk_metrics), chunk_grads = chunked
    np.testing.assert_allclose(chunk_loss, loss, rtol=1e-5)
    for key in ("ce_sum", "token_count", "z_loss"):
        np.testing.assert_allclose(chunk_metrics[key], metrics[key], rtol=1e-5, atol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        got = dict(jax.tree_util.tree_leaves_with_path(chunk_grads))[path]
        np.testing.assert_allclose(got, g, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tie_embeddings", [False, True])
@pytest.mark.parametrize("chunk", [5, 8, 64])  # 64 > LENGTH: one padded chunk
def test_llm_chunked_equals_whole(tie_embeddings, chunk):
    model = LLM(dataclasses.replace(LLM_CONFIG, tie_embeddings=tie_embeddings))
    batch = text_batch()
    params = nn.unbox(model.init(jax.random.key(0), batch["tokens"])["params"])
    assert ("lm_head" in params) != tie_embeddings
    assert_same(loss_and_grads(model, params, batch), loss_and_grads(with_chunk(model, chunk), params, batch))


def test_omni_chunked_equals_whole():
    model = OmniModel(AUDIO_CONFIG)  # vision + audio towers scattered into the LLM's sequence
    batch = make_audio_batch()
    batch["modality"] = np.random.default_rng(1).integers(0, 4, batch["modality"].shape).astype(np.int32)
    batch["loss_mask"][:, :3] = 0.0
    inputs = train_step.model_inputs(batch)
    params = nn.unbox(jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs))
    plain = loss_and_grads(model, params, batch)
    assert_same(plain, loss_and_grads(with_chunk(model, 7), params, batch))
    for tower in ("vision", "audio"):  # the towers are in the compared gradients
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain[1][tower])) > 0


def compiled_text(model, params, batch):
    loss = functools.partial(train_step.loss_fn, model=model, z_loss_weight=1e-3)
    return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, batch, WEIGHTS).compile().as_text()


def test_chunked_step_never_holds_the_whole_logits():
    model = LLM(LLM_CONFIG)
    batch = text_batch()
    params = nn.unbox(model.init(jax.random.key(0), batch["tokens"])["params"])
    whole = re.compile(rf"f32\[{BATCH},{LENGTH},{LLM_CONFIG.vocab_size}\]")
    assert whole.search(compiled_text(model, params, batch))  # the plain path has them
    assert not whole.search(compiled_text(with_chunk(model, 8), params, batch))


def test_sharded_chunked_step_equals_plain_step():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = text_batch()
    batch = dict(batch, **{k: np.concatenate([v, v]) for k, v in batch.items()})  # 8 rows over 8 devices
    losses = []
    for chunk in (0, 8):
        model = LLM(dataclasses.replace(LLM_CONFIG, lm_head_chunk=chunk))
        state, _, shardings = train_step.create_train_state(model, optax.adamw(1e-2), mesh, sharding.LOGICAL_AXIS_RULES,
                                                            {"tokens": (2 * BATCH, LENGTH)}, seed=0)
        step = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, shardings, z_loss_weight=1e-3)
        global_batch = jax.device_put(batch, train_step.batch_shardings(mesh))
        for _ in range(2):
            state, metrics = step(state, global_batch, jnp.asarray(WEIGHTS))
            losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[2:], losses[:2], rtol=1e-5)


def test_negative_chunk_is_named():
    with pytest.raises(ValueError, match="model.llm.lm_head_chunk=-1"):
        dataclasses.replace(LLM_CONFIG, lm_head_chunk=-1)

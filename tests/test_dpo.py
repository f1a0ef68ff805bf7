"""DPO + instruction loss: hand-worked numbers, masking, the 0.3 weight, and a few LoRA-only steps
(LLM alone, and the omni model with images: the towers and the LLM's base stay frozen)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.data import chat, image_preprocessing as ip
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.omni import ConnectorConfig, OmniConfig, OmniModel
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.training import dpo, lora, train_step

LORA = lora.LoRAConfig(rank=4)
B, T, PROMPT = 4, 10, 5
PATCH = 3  # the image placeholder id of the omni toy: prompt tokens 0..3 take a 56x56 image's 4 features


def test_dpo_loss_hand_worked():
    pc, pr = np.array([-3.0, -5.0]), np.array([-4.0, -4.5])
    rc, rr = np.array([-3.5, -4.0]), np.array([-3.5, -4.0])
    beta = 0.5
    chosen = beta * (pc - rc)  # [0.25, -0.5]
    rejected = beta * (pr - rr)  # [-0.25, -0.25]
    margins = chosen - rejected  # [0.5, -0.25]
    expected = np.mean(np.log1p(np.exp(-margins)))  # −log σ(m) = log(1 + e^{−m})
    assert expected == pytest.approx((0.474077 + 0.825939) / 2, abs=1e-5)
    loss, m = dpo.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["dpo_loss"]) == float(loss)
    assert float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_margin"]) == pytest.approx(0.125)
    assert float(m["chosen_reward"]) == pytest.approx(-0.125)
    assert float(m["rejected_reward"]) == pytest.approx(-0.25)


def test_sequence_logprobs_masks_prompt_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 6))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = (np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask).sum(-1)
    out = dpo.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)
    prompt_changed = np.where(mask[..., None] > 0, logits, logits + 10 * rng.standard_normal(logits.shape))
    out2 = dpo.sequence_logprobs(jnp.asarray(prompt_changed, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6)


def _sample(tokens, image_seed=None):
    n = tokens.shape[0]
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, PROMPT - 1:-1] = 1  # targets PROMPT.. are the response
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.int32), (n, 3, T)))
    sample = dict(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=np.ones(tokens.shape, np.int32),
                  positions=positions)
    if image_seed is not None:
        sample.update(_image_pack(n, image_seed))
        sample["positions"] = np.stack([chat.mrope_positions(row, [(1, 2, 2)], (PATCH,)) for row in tokens])
    return sample


def _image_pack(n, seed):
    """One random 56x56 image per row (16 patches, 4 merged features) in a pack of 16."""
    rng = np.random.default_rng(seed)
    rows = [ip.patchify(rng.normal(size=(56, 56, 3)).astype(np.float32)) for _ in range(n)]
    return dict(vision_patches=np.stack([p for p, _ in rows]), vision_segment_ids=np.ones((n, 16), np.int32),
                vision_hw=np.stack([ip.hw_positions(grid) for _, grid in rows]))


def toy_batch(vocab, images=False):
    """Chosen and rejected share the prompt (and, with images, the image); instruction rows their own."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, vocab, (B, PROMPT))
    chosen = np.concatenate([prompt, rng.integers(4, vocab, (B, T - PROMPT))], 1).astype(np.int32)
    rejected = np.concatenate([prompt, rng.integers(4, vocab, (B, T - PROMPT))], 1).astype(np.int32)
    instruction = rng.integers(4, vocab, (B, T)).astype(np.int32)
    if images:
        for tokens in (chosen, rejected, instruction):
            tokens[:, :4] = PATCH
    batch = {}
    for name, tokens, image_seed in (("chosen", chosen, 1), ("rejected", rejected, 1), ("instruction", instruction, 2)):
        batch.update({f"{name}_{k}": v for k, v in _sample(tokens, image_seed if images else None).items()})
    return batch


@pytest.fixture(scope="module")
def toy():
    model = LLM(LLMConfig(vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_dim=64, mrope_sections=(2, 3, 3), remat_policy="none"))
    batch = toy_batch(61)
    init_key = jax.random.key(0, impl="rbg")  # compiles faster than threefry on CPU
    params = jax.jit(lambda t: nn.unbox(model.init(init_key, t)["params"]))(batch["chosen_tokens"])
    loss = jax.jit(lambda lp, p, b, w: dpo.alignment_loss(lp, p, b, model=model, lora_config=LORA,
                                                          instruction_weight=w))
    return model, params, batch, loss


def test_alignment_loss_is_dpo_plus_weighted_instruction_ce(toy):
    model, params, batch, loss_fn = toy
    lp = lora.init_lora(params, LORA)
    loss, m = loss_fn(lp, params, batch, 0.3)
    # Fresh adapters: policy = reference, every margin 0 (up to the batch-shape rounding), DPO = log 2.
    assert float(m["dpo_loss"]) == pytest.approx(np.log(2.0), rel=1e-6)
    assert abs(float(m["reward_margin"])) < 1e-5
    logits = jax.jit(model.apply)({"params": params}, batch["instruction_tokens"])
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    ce = -np.take_along_axis(log_probs, batch["instruction_targets"][..., None], -1)[..., 0]
    ce = (ce * batch["instruction_loss_mask"]).sum() / batch["instruction_loss_mask"].sum()
    assert float(m["instruction_loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(np.log(2.0) + 0.3 * ce, rel=1e-5)
    assert dpo.DEFAULT_INSTRUCTION_WEIGHT == 0.3


def test_alignment_steps_train_lora_only_and_raise_margin(toy):
    model, params, batch, loss_fn = toy
    lp = lora.init_lora(params, LORA)
    state = dpo.create_alignment_state(params, lp, optax.adam(1e-2), seed=0)
    step = jax.jit(functools.partial(dpo.alignment_step, model=model, lora_config=LORA))
    first, _ = step(state, batch)
    a0, a1 = (jax.tree.leaves(s)[0::2] for s in (lp, first.lora_params))
    jax.tree.map(np.testing.assert_array_equal, a1, a0)  # dL/dA = 0 while B = 0 ...
    assert all(np.any(np.asarray(b)) for b in jax.tree.leaves(first.lora_params)[1::2])  # ... every B moves
    state = first
    for _ in range(5):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 6
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.lora_params)[0::2], a0))
    jax.tree.map(np.testing.assert_array_equal, state.params, params)  # the base never moves
    _, before = loss_fn(lp, params, batch, 0.3)
    _, after = loss_fn(state.lora_params, params, batch, 0.3)
    assert abs(float(before["reward_margin"])) < 1e-5
    assert float(after["reward_accuracy"]) == 1.0
    assert float(after["reward_margin"]) > 0.1
    assert float(after["dpo_loss"]) < float(before["dpo_loss"])


@pytest.fixture(scope="module")
def omni_toy():
    model = OmniModel(OmniConfig(
        llm=LLMConfig(vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64,
                      mrope_sections=(2, 3, 3), remat_policy="none"),
        vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
        connector=ConnectorConfig(output_scale=4.0, position_frequencies=2), placeholder_ids=(PATCH,)))
    batch = toy_batch(61, images=True)
    chosen = train_step.model_inputs({k[len("chosen_"):]: v for k, v in batch.items() if k.startswith("chosen_")})
    params = jax.jit(lambda x: nn.unbox(model.init(jax.random.key(0, impl="rbg"), **x)["params"]))(chosen)
    return model, jax.tree.map(np.asarray, params), batch


def test_omni_alignment_steps_train_lora_only(omni_toy):
    model, params, batch = omni_toy
    lp = lora.init_lora(params, LORA)
    assert set(lp) == {"llm"}
    state = dpo.create_alignment_state(params, lp, optax.adam(1e-2), seed=0)
    step = jax.jit(functools.partial(dpo.alignment_step, model=model, lora_config=LORA))  # adapter dropout on
    for _ in range(3):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    # The vision tower, connector, position features and the LLM's base weights never move ...
    assert {"llm", "vision", "connector", "position_embedding"} <= set(state.params)
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    # ... and every adapter does.
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.lora_params), jax.tree.leaves(lp)))

    # The images are seen: the same step (same dropout draw) on other instruction images differs.
    swapped = dict(batch, instruction_vision_patches=batch["instruction_vision_patches"][::-1])
    _, seen = step(state, batch)
    _, other = step(state, swapped)
    assert abs(float(seen["instruction_loss"]) - float(other["instruction_loss"])) > 1e-4

"""DPO + instruction loss: hand-worked numbers, masking, the 0.3 weight, and a few LoRA-only steps."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.training import dpo, lora

LORA = lora.LoRAConfig(rank=4)
B, T, PROMPT = 4, 10, 5


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


def _sample(tokens):
    n = tokens.shape[0]
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, PROMPT - 1:-1] = 1  # targets PROMPT.. are the response
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (n, 3, T))
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
                segment_ids=np.ones(tokens.shape, np.int32), positions=np.ascontiguousarray(positions))


def toy_batch(vocab):
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, vocab, (B, PROMPT))
    chosen = np.concatenate([prompt, rng.integers(4, vocab, (B, T - PROMPT))], 1).astype(np.int32)
    rejected = np.concatenate([prompt, rng.integers(4, vocab, (B, T - PROMPT))], 1).astype(np.int32)
    instruction = rng.integers(4, vocab, (B, T)).astype(np.int32)
    batch = {}
    for name, tokens in (("chosen", chosen), ("rejected", rejected), ("instruction", instruction)):
        batch.update({f"{name}_{k}": v for k, v in _sample(tokens).items()})
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

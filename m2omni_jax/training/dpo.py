"""The alignment stage: DPO on preference pairs + 0.3 × instruction loss, training LoRA only.

DESIGN §2: DPO(chosen, rejected) + 0.3·instruction loss, LoRA on the LLM,
preference and instruction data 1:1. With sequence log-probs π (policy =
base + LoRA) and ρ (reference = the frozen base, i.e. the same weights
without adapters, so no second copy is kept):

    rewards   r_c = β·(π_c − ρ_c),  r_r = β·(π_r − ρ_r)
    DPO       −log σ(r_c − r_r), mean over pairs          [Rafailov et al. 2023]
    loss      DPO + w·CE(instruction samples),  w = 0.3

CE is the mean over trained instruction tokens. β = 0.1 is DPO's usual value
[ours: DESIGN does not state β].

A batch holds B pairs and B instruction samples (see data/preference.py):
`chosen_*`, `rejected_*`, `instruction_*` with * in tokens, targets,
loss_mask, segment_ids (B,T) and positions (B,3,T), all of one length T,
and for the omni model the media keys vision_patches (B,N,D),
vision_segment_ids (B,N) and vision_hw (B,2,N), all of one pack size N.
The policy sees the three as one batch of 3B rows; chosen and rejected
carry the same image, which the frozen vision tower encodes identically
for the policy and the reference.

Only the LoRA tree is in the optimizer, so the base weights are frozen by
construction; build `tx` with plain optax or with
`optimizers.make_optimizer(config.opt, steps, lora_params)`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from m2omni_jax.training import lora, train_step

DEFAULT_BETA = 0.1
DEFAULT_INSTRUCTION_WEIGHT = 0.3


def token_logprobs(logits, targets):
    """log p(targets[t]) per token, in fp32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits, targets, loss_mask):
    """(B,) sum of log-probs over the trained (response) tokens; prompt and padding masked."""
    return jnp.sum(token_logprobs(logits, targets) * loss_mask, axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = DEFAULT_BETA):
    """(mean −log σ(β·[(π_c − ρ_c) − (π_r − ρ_r)]), metrics) from (B,) sequence log-probs."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -jnp.mean(jax.nn.log_sigmoid(margins))
    metrics = {
        "dpo_loss": loss,
        "reward_accuracy": jnp.mean((margins > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(margins),
        "chosen_reward": jnp.mean(chosen_rewards),
        "rejected_reward": jnp.mean(rejected_rewards),
    }
    return loss, metrics


def instruction_loss(logits, targets, loss_mask):
    """Mean cross-entropy over the trained tokens."""
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_logprobs(logits, targets) * mask) / jnp.maximum(mask.sum(), 1.0)


PARTS = ("chosen", "rejected", "instruction")


def _part(batch, prefix: str) -> dict:
    """The `prefix_*` arrays of the batch, keyed by `*` (text keys, and media keys when present)."""
    return {k[len(prefix) + 1:]: v for k, v in batch.items() if k.startswith(prefix + "_")}


def alignment_loss(lora_params, params, batch, *, model: nn.Module, lora_config=lora.LoRAConfig(),
                   beta: float = DEFAULT_BETA, instruction_weight: float = DEFAULT_INSTRUCTION_WEIGHT,
                   rng=None, deterministic: bool = True):
    """DPO on the pairs + instruction_weight · CE on the instruction samples; (loss, metrics).

    One policy forward over [chosen; rejected; instruction] (so all three share
    one padded length and patch pack) and one reference forward over
    [chosen; rejected]. `model` is an `LLM` or an `OmniModel` (the batch then
    holds the media keys); `params` is its whole tree, `lora_params` the adapters.
    """
    parts = [_part(batch, p) for p in PARTS]
    joined = {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = parts[0]["tokens"].shape[0]
    logits = lora.apply_with_lora(model, params, lora_params, rng=rng, deterministic=deterministic,
                                  config=lora_config, **train_step.model_inputs(joined))
    pairs = {k: v[:2 * n] for k, v in joined.items()}
    ref_logits = model.apply({"params": params}, **train_step.model_inputs(pairs))

    policy_logps = sequence_logprobs(logits[:2 * n], pairs["targets"], pairs["loss_mask"])
    ref_logps = jax.lax.stop_gradient(sequence_logprobs(ref_logits, pairs["targets"], pairs["loss_mask"]))
    dpo, metrics = dpo_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta)
    ce = instruction_loss(logits[2 * n:], parts[2]["targets"], parts[2]["loss_mask"])
    loss = dpo + instruction_weight * ce
    return loss, dict(metrics, instruction_loss=ce, loss=loss)


# --------------------------------------------------------------------------- training


@struct.dataclass
class AlignmentState:
    step: jax.Array
    params: Any  # the frozen base (and the DPO reference)
    lora_params: Any  # the only trained tree
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, like TrainState.rng
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_alignment_state(params, lora_params, tx: optax.GradientTransformation, seed: int = 0):
    return AlignmentState(step=jnp.zeros((), jnp.int32), params=params, lora_params=lora_params,
                          opt_state=tx.init(lora_params), rng=jax.random.key_data(jax.random.key(seed)),
                          tx=tx)


def alignment_step(state: AlignmentState, batch, *, model: nn.Module, lora_config=lora.LoRAConfig(),
                   beta: float = DEFAULT_BETA, instruction_weight: float = DEFAULT_INSTRUCTION_WEIGHT):
    """One optimizer step on the LoRA tree (adapter dropout on); jit with the keywords bound."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss_fn = functools.partial(alignment_loss, model=model, lora_config=lora_config, beta=beta,
                                instruction_weight=instruction_weight, rng=rng, deterministic=False)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.lora_params, state.params, batch)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.lora_params)
    lora_params = optax.apply_updates(state.lora_params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, lora_params=lora_params, opt_state=opt_state), metrics

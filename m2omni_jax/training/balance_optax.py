"""The balance strategies as Optax gradient transformations; their state is optimizer state.

Step balance [paper, PT3] wraps the inner optimizer, in the manner of `optax.MultiSteps`:

    tx = step_balance(make_optimizer(...), weights=w, grad_clip=c)

takes the M single-modality micro-batches' gradients of one cycle one at a time (micro-batch
i has modality i of `config.balance.modalities`), accumulates Σᵢ wᵢ·∇Lᵢ, returns zero
updates until the cycle's last micro-batch, then clips the weighted average Σwᵢ∇Lᵢ/Σw at
`grad_clip` (not the sum, whose weights add up to α: clipping it would fire on almost every
step), scales it back by Σw = α, and hands it to the inner optimizer: one update per cycle,
θ ← θ − η·α·clip(Σwᵢ∇Lᵢ/α). The weights, the running sum and the last cycle's average norm
live in `StepBalanceState`, so they are checkpointed with the optimizer.

Dynamic adaptive balance [paper, IT3] is a weight schedule in the optimizer state:

    tx = optax.chain(make_optimizer(...), dynamic_balance(adaptive))

leaves the updates alone and carries `DynamicBalanceState` (the window of validation
losses, the pass count, the raw and EMA-smoothed weights). `observe_validation_losses`
updates it from one validation pass (a pure function of the optimizer state), and
`loss_weights(opt_state)` is the per-modality vector the train step multiplies its loss
weights by (all ones when the chain has no dynamic balance).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.training.balance import AdaptiveBalance


# --------------------------------------------------------------------------- step balance

class StepBalanceState(NamedTuple):
    micro_step: jax.Array  # int32: micro-batches accumulated so far in this cycle
    grad_sum: Any  # Σᵢ wᵢ·∇Lᵢ over them (like the params)
    weights: jax.Array  # (M,) wᵢ, micro-batch i of a cycle
    average_norm: jax.Array  # ‖Σwᵢ∇Lᵢ/Σw‖ of the last cycle, before clipping
    inner_state: Any


def clip_weighted_sum(grad_sum, total_weight, grad_clip: float):
    """(Σw)·clip(Σᵢwᵢ∇Lᵢ / Σw, grad_clip), and the norm of the average before clipping.
    grad_clip <= 0: no clipping."""
    average = jax.tree.map(lambda g: g / total_weight, grad_sum)
    norm = optax.global_norm(average)
    scale = total_weight
    if grad_clip > 0:
        scale = scale * jnp.minimum(1.0, grad_clip / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), average), norm


def step_balance(inner: optax.GradientTransformation, weights, grad_clip: float = 0.0
                 ) -> optax.GradientTransformation:
    """Step balance around `inner` (which must not clip again: train.optimizer_chain_config)."""
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(f"step balance needs one weight per modality, got shape {weights.shape}")

    def init_fn(params):
        return StepBalanceState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), weights,
                                jnp.zeros((), jnp.float32), inner.init(params))

    def update_fn(grads, state, params=None):
        weight = state.weights[state.micro_step]
        grad_sum = jax.tree.map(lambda acc, g: acc + weight * g, state.grad_sum, grads)

        def apply(_):
            average, norm = clip_weighted_sum(grad_sum, jnp.sum(state.weights), grad_clip)
            updates, inner_state = inner.update(average, state.inner_state, params)
            return updates, StepBalanceState(jnp.zeros_like(state.micro_step), jax.tree.map(jnp.zeros_like, grad_sum),
                                             state.weights, norm, inner_state)

        def accumulate(_):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(apply, None)[0])
            return zeros, state._replace(micro_step=state.micro_step + 1, grad_sum=grad_sum)

        last = state.micro_step == state.weights.shape[0] - 1
        return jax.lax.cond(last, apply, accumulate, None)

    return optax.GradientTransformation(init_fn, update_fn)


def step_balance_state(opt_state) -> StepBalanceState:
    """The StepBalanceState of a `step_balance` optimizer's state (a clear error otherwise)."""
    found = _find(opt_state, StepBalanceState)
    if found is None:
        raise ValueError("the optimizer has no step balance (train.py wraps it with step_balance)")
    return found


# --------------------------------------------------------------------------- dynamic balance

class DynamicBalanceState(NamedTuple):
    history: jax.Array  # (window, M) validation losses, oldest first
    num_passes: jax.Array  # int32
    raw_weights: jax.Array  # (M,) this pass's weights before smoothing
    weights: jax.Array  # (M,) smoothed weights (1 for the first `window` passes)
    modality_ids: jax.Array  # (M,) int32: where they go in the loss-weight vector


def dynamic_balance(adaptive: AdaptiveBalance) -> optax.GradientTransformation:
    """The dynamic balance's weight schedule as optimizer state; updates pass unchanged."""
    ids = jnp.asarray([modality_id(m) for m in adaptive.modalities], jnp.int32)

    def init_fn(params):
        del params
        return DynamicBalanceState(**adaptive.init(), modality_ids=ids)

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def observe_validation_losses(adaptive: AdaptiveBalance, opt_state, val_losses):
    """The optimizer state after one validation pass (`val_losses`: {modality: loss} or (M,))."""
    state = _find(opt_state, DynamicBalanceState)
    if state is None:
        raise ValueError("the optimizer has no dynamic balance (train.py chains dynamic_balance)")
    updated = adaptive.update(state._asdict(), val_losses)
    new = DynamicBalanceState(**updated, modality_ids=state.modality_ids)
    return jax.tree.map(lambda x: new if isinstance(x, DynamicBalanceState) else x, opt_state,
                        is_leaf=lambda x: isinstance(x, DynamicBalanceState))


def loss_weights(opt_state) -> jax.Array:
    """(NUM_MODALITIES,) loss-weight factors: the dynamic balance's smoothed weights for its
    modalities, 1 for the others (1 is the mean balanced weight); all 1 without one."""
    state = _find(opt_state, DynamicBalanceState)
    ones = jnp.ones((NUM_MODALITIES,), jnp.float32)
    return ones if state is None else ones.at[state.modality_ids].set(state.weights)


def balance_metrics(adaptive: AdaptiveBalance, opt_state) -> Mapping[str, jax.Array]:
    """`balance/weight/<modality>` of the current smoothed weights, for the log lines."""
    state = _find(opt_state, DynamicBalanceState)
    return {f"balance/weight/{m}": state.weights[i] for i, m in enumerate(adaptive.modalities)}


def _find(tree, kind):
    """The one node of type `kind` in an optimizer-state tree, or None."""
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)]
    if len(found) > 1:
        raise ValueError(f"the optimizer state holds {len(found)} {kind.__name__}s; expected one")
    return found[0] if found else None

"""Step balance [paper, PT3]: one micro-batch per modality, gradients combined per step.

    θ ← θ − η·Σᵢ wᵢ·∇Lᵢ(Bᵢ),   wᵢ = α·(1/Lᵢ*) / Σⱼ(1/Lⱼ*)   (balance.step_balance_weights)

The M micro-batches arrive stacked on a leading axis (M, B, ...), each holding
one modality; one jitted step runs them through `lax.scan`, accumulating the
weighted gradient, then applies a single optimizer update. Only one
micro-batch's activations are alive at a time, as with gradient accumulation.
`opt.grad_clip` applies to the weighted average Σᵢwᵢ∇Lᵢ/Σw (not to each
micro-batch), and the clipped average is scaled back by Σw = α.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax.modalities import NUM_MODALITIES
from m2omni_jax.parallel import sharding
from m2omni_jax.training.train_step import TrainState, skip_nonfinite

LossFn = Callable  # (params, batch, loss_weights) -> (loss, metrics)


def weighted_gradient(params, micro_batches, micro_weights, loss_fn: LossFn):
    """Σᵢ wᵢ·∇Lᵢ over the stacked micro-batches, plus each micro-batch's loss."""
    unit_weights = jnp.ones(NUM_MODALITIES, jnp.float32)
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, unit_weights), has_aux=True)

    def accumulate(grad_sum, inputs):
        batch, weight = inputs
        (loss, metrics), grads = grad_fn(params, batch)
        grad_sum = jax.tree.map(lambda acc, g: acc + weight * g, grad_sum, grads)
        return grad_sum, (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, (losses, metrics) = jax.lax.scan(accumulate, zeros, (micro_batches, micro_weights))
    return grad_sum, losses, metrics


def clip_weighted_sum(grad_sum, total_weight, grad_clip: float):
    """(Σw)·clip(Σᵢwᵢ∇Lᵢ / Σw, grad_clip), and the norm of the average before clipping.

    `opt.grad_clip` bounds the gradient of one average loss. Σᵢwᵢ∇Lᵢ has weights summing to
    α = 10, so clipping the sum at grad_clip would fire on almost every step; the weighted
    average is what compares with grad_clip. Scaling back by Σw keeps the paper's update,
    θ ← θ − η·α·(clipped average). grad_clip <= 0: no clipping.
    """
    average = jax.tree.map(lambda g: g / total_weight, grad_sum)
    norm = optax.global_norm(average)
    scale = total_weight
    if grad_clip > 0:
        scale = scale * jnp.minimum(1.0, grad_clip / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), average), norm


def balanced_train_step(state: TrainState, micro_batches, micro_weights, *, loss_fn: LossFn,
                        grad_clip: float = 0.0):
    """One optimizer step over M single-modality micro-batches weighted by `micro_weights` (M,).

    The clipping happens here (see clip_weighted_sum), so `state.tx` must not clip again:
    train.py builds it with opt.grad_clip = 0 for step balance.
    """
    grad_sum, losses, metrics = weighted_gradient(state.params, micro_batches, micro_weights, loss_fn)
    grads, average_norm = clip_weighted_sum(grad_sum, jnp.sum(micro_weights), grad_clip)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    summed = jax.tree.map(lambda x: x.sum(0), {k: metrics[k] for k in ("ce_sum", "token_count")})
    # grad_norm: the weighted average's, before clipping (what opt.grad_clip compares with).
    out = dict(summed, loss=jnp.sum(micro_weights * losses), micro_losses=losses,
               grad_norm=average_norm, param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def micro_batch_shardings(mesh, batch_keys_ndim: dict[str, int]) -> dict[str, NamedSharding]:
    """(M, B, ...) arrays: the micro-batch axis is replicated, B is split over the batch axes."""
    return {k: NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (ndim - 1))))
            for k, ndim in batch_keys_ndim.items()}


def jit_balanced_step(loss_fn: LossFn, mesh, rules, state_shardings, batch_keys_ndim: dict[str, int],
                      grad_clip: float = 0.0):
    """The balanced step under jit with explicit shardings; the state is donated."""
    step = skip_nonfinite(functools.partial(balanced_train_step, loss_fn=loss_fn, grad_clip=float(grad_clip)))
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, micro_batch_shardings(mesh, batch_keys_ndim), rep),
                     out_shardings=(state_shardings, rep), donate_argnums=(0,))

    def run(state, micro_batches, micro_weights):
        with sharding.activate(mesh, rules):
            return jitted(state, micro_batches, micro_weights)
    run.jitted = jitted
    return run

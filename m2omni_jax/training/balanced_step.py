"""Step balance [paper, PT3]: one micro-batch per modality, gradients combined per step.

    θ ← θ − η·Σᵢ wᵢ·∇Lᵢ(Bᵢ),   wᵢ = α·(1/Lᵢ*) / Σⱼ(1/Lⱼ*)   (balance.step_balance_weights)

The M micro-batches arrive stacked on a leading axis (M, B, ...), each holding
one modality; one jitted step runs them through `lax.scan`, accumulating the
weighted gradient, then applies a single optimizer update. Only one
micro-batch's activations are alive at a time, as with gradient accumulation.
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


def balanced_train_step(state: TrainState, micro_batches, micro_weights, *, loss_fn: LossFn):
    """One optimizer step over M single-modality micro-batches weighted by `micro_weights` (M,)."""
    grads, losses, metrics = weighted_gradient(state.params, micro_batches, micro_weights, loss_fn)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    summed = jax.tree.map(lambda x: x.sum(0), {k: metrics[k] for k in ("ce_sum", "token_count")})
    out = dict(summed, loss=jnp.sum(micro_weights * losses), micro_losses=losses,
               grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def micro_batch_shardings(mesh, batch_keys_ndim: dict[str, int]) -> dict[str, NamedSharding]:
    """(M, B, ...) arrays: the micro-batch axis is replicated, B is split over the batch axes."""
    return {k: NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (ndim - 1))))
            for k, ndim in batch_keys_ndim.items()}


def jit_balanced_step(loss_fn: LossFn, mesh, rules, state_shardings, batch_keys_ndim: dict[str, int]):
    """The balanced step under jit with explicit shardings; the state is donated."""
    step = skip_nonfinite(functools.partial(balanced_train_step, loss_fn=loss_fn))
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, micro_batch_shardings(mesh, batch_keys_ndim), rep),
                     out_shardings=(state_shardings, rep), donate_argnums=(0,))

    def run(state, micro_batches, micro_weights):
        with sharding.activate(mesh, rules):
            return jitted(state, micro_batches, micro_weights)
    run.jitted = jitted
    return run

"""Step balance [paper, PT3]: one micro-batch per modality, gradients combined per step.

    θ ← θ − η·Σᵢ wᵢ·∇Lᵢ(Bᵢ),   wᵢ = α·(1/Lᵢ*) / Σⱼ(1/Lⱼ*)   (balance.step_balance_weights)

The M micro-batches arrive stacked on a leading axis (M, B, ...), each holding
one modality; one jitted step runs them through `lax.scan`, handing each
micro-batch's gradient to the optimizer, a `balance_optax.step_balance`
transformation that accumulates the weighted sum and makes the one update of
the cycle at its last micro-batch (the clipping is documented there). Only one
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
from m2omni_jax.training.balance_optax import clip_weighted_sum, step_balance_state  # noqa: F401 (re-exported)
from m2omni_jax.training.train_step import TrainState, skip_nonfinite

LossFn = Callable  # (params, batch, loss_weights, *, rng) -> (loss, metrics)


def balanced_train_step(state: TrainState, micro_batches, *, loss_fn: LossFn):
    """One cycle over M single-modality micro-batches: `state.tx` is a step_balance
    transformation with M weights; its updates are zero until the last micro-batch."""
    unit_weights = jnp.ones(NUM_MODALITIES, jnp.float32)
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, unit_weights, rng=r), has_aux=True)
    # The image head's noise and times, as train_step's: a function of the run's key, the step
    # and the micro-batch, so a resumed run draws the same.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def micro_step(carry, xs):
        params, opt_state = carry
        batch, index = xs
        (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, index))
        updates, opt_state = state.tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, metrics)

    num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
    (params, opt_state), (losses, metrics) = jax.lax.scan(micro_step, (state.params, state.opt_state),
                                                          (micro_batches, jnp.arange(num_micro)))
    balance = step_balance_state(opt_state)
    summed = jax.tree.map(lambda x: x.sum(0), {k: metrics[k] for k in ("ce_sum", "token_count")})
    # grad_norm: the weighted average's, before clipping (what opt.grad_clip compares with).
    out = dict(summed, loss=jnp.sum(balance.weights * losses), micro_losses=losses,
               grad_norm=balance.average_norm, param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out


def micro_batch_shardings(mesh, batch_keys_ndim: dict[str, int]) -> dict[str, NamedSharding]:
    """(M, B, ...) arrays: the micro-batch axis is replicated, B is split over the batch axes."""
    return {k: NamedSharding(mesh, P(None, sharding.BATCH_AXES, *([None] * (ndim - 1))))
            for k, ndim in batch_keys_ndim.items()}


def jit_balanced_step(loss_fn: LossFn, mesh, rules, state_shardings, batch_keys_ndim: dict[str, int]):
    """The balanced step under jit with explicit shardings; the state is donated."""
    step = skip_nonfinite(functools.partial(balanced_train_step, loss_fn=loss_fn))
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, micro_batch_shardings(mesh, batch_keys_ndim)),
                     out_shardings=(state_shardings, rep), donate_argnums=(0,))

    def run(state, micro_batches):
        with sharding.activate(mesh, rules):
            return jitted(state, micro_batches)
    run.jitted = jitted
    return run

"""Dynamic adaptive balance [paper, IT3] in the training loop.

Every `interval_steps` steps a validation pass runs each balanced modality's
held-out batches (Sᵢ batches of Bᵢ samples, fixed for the whole run) through
the model; their mean losses feed `balance.AdaptiveBalance`, whose smoothed
weights are the train step's per-modality loss weights until the next pass.
The balance state is optimizer state (`balance_optax.dynamic_balance`): it goes
into every checkpoint with the optimizer, so a resumed run continues the same
weights, and the train step reads the weights from it (`balance_optax.loss_weights`).
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance, balance_optax
from m2omni_jax.training.loop import Callback


def jit_validation_loss(loss_fn: Callable, mesh, rules, param_shardings) -> Callable:
    """(params, batch) -> per-modality (ce_sum, token_count), jitted with explicit shardings."""
    def sums(params, batch):
        _, metrics = loss_fn(params, batch, jnp.ones(NUM_MODALITIES, jnp.float32))
        return metrics["ce_sum"], metrics["token_count"]
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(sums, in_shardings=(param_shardings, None), out_shardings=(rep, rep))

    def run(params, batch):
        with sharding.activate(mesh, rules):
            return jitted(params, batch)
    return run


class DynamicBalancer(Callback):
    """Runs the validation passes of the dynamic balance, whose state is optimizer state
    (`balance_optax.dynamic_balance`): every `interval_steps` steps the new train state and
    the val losses and weights, which join the training log lines from then on."""

    def __init__(self, adaptive: balance.AdaptiveBalance, validation_batches: Mapping[str, Sequence],
                 validation_loss: Callable, interval_steps: int):
        missing = set(adaptive.modalities) - set(validation_batches)
        if missing:
            raise ValueError(f"balance.dynamic: no validation batches for {sorted(missing)}")
        if interval_steps <= 0:
            raise ValueError(f"balance.dynamic.interval_steps must be positive, got {interval_steps}")
        self.adaptive = adaptive
        self.validation_batches = validation_batches
        self.validation_loss = validation_loss
        self.interval_steps = interval_steps
        self._observe = None  # jitted on the first pass, with the optimizer state's shardings

    def due(self, step: int) -> bool:
        return step % self.interval_steps == 0

    def validate(self, params) -> dict[str, float]:
        """Mean held-out loss of each balanced modality on its own batches."""
        return heldout_losses(params, self.validation_batches, self.validation_loss)

    def observe(self, state, losses: Mapping[str, float]):
        """`state` with the balance's optimizer state after this validation pass (jitted, the
        optimizer state donated and its shardings kept)."""
        if self._observe is None:
            shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
            self._observe = jax.jit(functools.partial(balance_optax.observe_validation_losses, self.adaptive),
                                    out_shardings=shardings, donate_argnums=(0,))
        losses = np.asarray(self.adaptive.losses_array(losses))
        return state.replace(opt_state=self._observe(state.opt_state, losses))

    def metrics(self, state, losses: Mapping[str, float]) -> dict[str, float]:
        out = {f"val_loss/{n}": v for n, v in losses.items()}
        weights = jax.device_get(balance_optax.balance_metrics(self.adaptive, state.opt_state))
        out.update({k: float(v) for k, v in weights.items()})
        return out

    # loop.Callback
    def update_state(self, step: int, state):
        if not self.due(step):
            return state, None
        losses = self.validate(state.params)
        state = self.observe(state, losses)
        return state, self.metrics(state, losses)


def heldout_losses(params, batches_by_modality: Mapping[str, Sequence], validation_loss) -> dict[str, float]:
    """Mean loss of each modality's trained tokens over its own held-out batches."""
    losses = {}
    for name, batches in batches_by_modality.items():
        ce_sum = count = 0.0
        for batch in batches:
            sums, counts = jax.device_get(validation_loss(params, batch))
            ce_sum += float(sums[modality_id(name)])
            count += float(counts[modality_id(name)])
        if count == 0:
            raise ValueError(f"the held-out batches of {name!r} hold no trained tokens")
        losses[name] = ce_sum / count
    return losses


def fixed_validation_batches(iterator, num_batches: int, to_global: Callable) -> list:
    """The first `num_batches` batches of `iterator`, kept as global arrays for every pass."""
    return [to_global(next(iterator)) for _ in range(num_batches)]

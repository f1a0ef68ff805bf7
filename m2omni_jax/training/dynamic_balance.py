"""Dynamic adaptive balance [paper, IT3] in the training loop.

Every `interval_steps` steps a validation pass runs each balanced modality's
held-out batches (Sᵢ batches of Bᵢ samples, fixed for the whole run) through
the model; their mean losses feed `balance.AdaptiveBalance`, whose smoothed
weights are the train step's per-modality loss weights until the next pass.
The balance state goes into every checkpoint (`extra["dynamic_balance"]`), so
a resumed run continues the same weights.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance
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
    """Holds the AdaptiveBalance state and runs its validation passes: a loop callback whose
    val losses and weights join the training log lines, its state in every checkpoint."""

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
        self.state = adaptive.init()
        self._update = jax.jit(adaptive.update)
        self.weights = self.weights_vector()  # per modality id, for the train step's loss weights

    def due(self, step: int) -> bool:
        return step % self.interval_steps == 0

    def validate(self, params) -> dict[str, float]:
        """Mean held-out loss of each balanced modality on its own batches."""
        return heldout_losses(params, self.validation_batches, self.validation_loss)

    def update(self, params) -> dict[str, float]:
        """One validation pass; returns what to log (val losses and weights per modality)."""
        losses = self.validate(params)
        self.state = self._update(self.state, losses)
        self.weights = self.weights_vector()
        weights = np.asarray(self.state["weights"])
        out = {f"val_loss/{n}": v for n, v in losses.items()}
        out.update({f"balance/weight/{n}": float(w) for n, w in zip(self.adaptive.modalities, weights)})
        return out

    def weights_vector(self) -> np.ndarray:
        return np.asarray(self.adaptive.weights_vector(self.state))

    def to_json(self) -> str:
        return balance.state_to_json(self.state)

    def load_json(self, text: str) -> None:
        self.state = balance.state_from_json(text)
        self.weights = self.weights_vector()

    # loop.Callback
    def after_step(self, step: int, state) -> dict[str, float] | None:
        return self.update(state.params) if self.due(step) else None

    def checkpoint_extra(self) -> dict:
        return {"dynamic_balance": self.to_json()}

    def restore(self, extra) -> None:
        if "dynamic_balance" in extra:
            self.load_json(extra["dynamic_balance"])


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

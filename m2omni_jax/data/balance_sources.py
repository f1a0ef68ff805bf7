"""Batch sources for the balance strategies, one grain iterator per modality.

  step balance [paper]   `StackedModalityBatches`: one single-modality batch per
                         modality each step, stacked to (M, B, ...) for
                         `training.balanced_step`.
  size-proportional /    `PickedModalityBatches`: each step takes one modality's
  round-robin            batch, chosen by `balance.size_proportional_sampler` or
                         `balance.round_robin`; a pure function of the step, so a
                         resumed run picks the same sequence.

Both are `grain.DatasetIterator`s whose state holds every child iterator's
state, so grain's Orbax handler checkpoints them like any pipeline.
"""
from __future__ import annotations

from typing import Callable, Mapping

import collections

import grain
import numpy as np


def summed_stats(iterators: Mapping[str, grain.DatasetIterator]) -> dict[str, int]:
    """The modality iterators' running totals (`pipeline.StatsIterator.stats`), summed."""
    total = collections.Counter()
    for it in iterators.values():
        total.update(getattr(it, "stats", {}))
    return dict(total)


class StackedModalityBatches(grain.DatasetIterator):
    """next() -> {key: (M, B, ...)}: modality i's batch at index i (order of `iterators`)."""

    def __init__(self, iterators: Mapping[str, grain.DatasetIterator]):
        super().__init__(list(iterators.values()))
        self.modalities = tuple(iterators)
        self._iterators = dict(iterators)

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(self._iterators[m]) for m in self.modalities]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    @property
    def stats(self) -> dict[str, int]:
        return summed_stats(self._iterators)

    def get_state(self) -> dict:
        return {m: it.get_state() for m, it in self._iterators.items()}

    def set_state(self, state: dict) -> None:
        for m, it in self._iterators.items():
            it.set_state(state[m])


class PickedModalityBatches(grain.DatasetIterator):
    """next() -> the batch of modality `pick(step)`; only that modality's iterator advances."""

    def __init__(self, iterators: Mapping[str, grain.DatasetIterator], pick: Callable[[int], str]):
        super().__init__(list(iterators.values()))
        self._iterators = dict(iterators)
        self._pick = pick
        self._step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        modality = self._pick(self._step)
        self._step += 1
        return next(self._iterators[modality])

    @property
    def stats(self) -> dict[str, int]:
        return summed_stats(self._iterators)

    def get_state(self) -> dict:
        return {"step": self._step, "iterators": {m: it.get_state() for m, it in self._iterators.items()}}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])
        for m, it in self._iterators.items():
            it.set_state(state["iterators"][m])

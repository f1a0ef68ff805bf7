"""Modality balance: step balance [paper, PT3], its baselines, dynamic adaptive balance [paper, IT3].

Step balance: every optimizer step runs one micro-batch of each modality and
sums the gradients with weights wᵢ = α·(1/Lᵢ*)/Σⱼ(1/Lⱼ*), where Lᵢ* is the loss
modality i converges to alone (a calibration run, stored as JSON).
Baselines: pick one modality per micro-batch, by dataset size or round robin.

Dynamic adaptive balance: after each validation pass, the slope of each
modality's recent (normalised) validation losses sets its loss weight;
still-falling modalities gain weight, flattened ones lose it. The state is a
plain dict of arrays (checkpointable, JSON round-trip exact).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from m2omni_jax.config_fields import ConfigError
from m2omni_jax.modalities import MODALITIES, NUM_MODALITIES, modality_id


# --------------------------------------------------------------------------- step balance

def _check_modalities(names) -> None:
    for name in names:
        modality_id(name)  # raises ValueError naming the known modalities


def step_balance_weights(converged_losses, alpha: float = 10.0):
    """wᵢ = α·(1/Lᵢ*)/Σⱼ(1/Lⱼ*); a dict {modality: L*} gives a dict, an array gives an array."""
    if not alpha > 0:
        raise ValueError(f"step balance alpha must be > 0, got {alpha!r}")
    if isinstance(converged_losses, Mapping):
        _check_modalities(converged_losses)
        names = list(converged_losses)
        weights = step_balance_weights(np.array([converged_losses[n] for n in names], np.float64),
                                       alpha)
        return {n: float(w) for n, w in zip(names, weights)}
    losses = np.asarray(converged_losses, np.float64)
    if losses.ndim != 1 or losses.size == 0 or not np.all(np.isfinite(losses) & (losses > 0)):
        raise ValueError(f"converged losses must be a non-empty 1-D set of finite values > 0, "
                         f"got {converged_losses!r}")
    inv = 1.0 / losses
    return alpha * inv / inv.sum()


def modality_vector(weights: Mapping[str, float], fill: float) -> np.ndarray:
    """Full (NUM_MODALITIES,) float32 weight vector in MODALITIES order; `fill` for absent ones."""
    _check_modalities(weights)
    out = np.full((NUM_MODALITIES,), fill, np.float32)
    for name, w in weights.items():
        out[modality_id(name)] = w
    return out


def check_calibration_tail(steps: int, tail: int) -> None:
    """The tail averaged for L* is at most the second half of the calibration run (a ConfigError:
    the command exits 2 with the message)."""
    if not 2 <= tail <= steps // 2:
        raise ConfigError(f"--tail={tail} must be in [2, --steps / 2 = {steps // 2}]: "
                          f"L* is the end of a run long enough to have settled; raise --steps={steps}")


def unconverged(convergence: Mapping[str, Mapping], max_change: float) -> list[str]:
    """Modalities whose loss still moves by more than `max_change` of L* over the tail."""
    return [m for m, s in convergence.items() if abs(s["relative_change"]) > max_change]


def tail_convergence(steps: Sequence[int], losses: Sequence[float], tail: int) -> dict[str, float]:
    """L* of a calibration curve: the mean of its last `tail` logged losses, with how flat they are.

    Returns {"converged_loss", "slope_per_step" (least-squares over the tail), "relative_change"
    (that slope times the tail's span of steps, over L*: ≈ 0 once the curve has converged)}.
    """
    if not (isinstance(tail, int) and tail >= 2):
        raise ValueError(f"--tail must be an int >= 2 (a slope needs two points), got {tail!r}")
    if len(losses) != len(steps) or len(losses) < tail:
        raise ValueError(f"a calibration curve of {len(losses)} logged losses is shorter than "
                         f"--tail={tail}; run more --steps")
    x = np.asarray(steps[-tail:], np.float64)
    y = np.asarray(losses[-tail:], np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError(f"the last {tail} calibration losses are not all finite: {y.tolist()}")
    converged = float(y.mean())
    xc = x - x.mean()
    slope = float((xc * (y - converged)).sum() / max((xc * xc).sum(), 1e-30))
    return {"converged_loss": converged, "slope_per_step": slope,
            "relative_change": slope * float(x[-1] - x[0]) / converged}


def save_calibration(path: str, converged_losses: Mapping[str, float],
                     convergence: Mapping | None = None) -> None:
    """Writes the calibration file: JSON {"converged_losses": {modality: L*}, "convergence": ...}.

    `convergence` (optional, JSON-able) records how flat each calibration curve was at its end,
    for the reader; loading ignores it.
    """
    _validate_calibration(dict(converged_losses), path)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)  # epath: a gs:// path too
    data = {"converged_losses": {k: float(v) for k, v in converged_losses.items()}}
    if convergence is not None:
        data["convergence"] = convergence
    epath.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))


def load_calibration(path: str) -> dict[str, float]:
    """{modality: L*} from a calibration file (also the older flat form {modality: L*})."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(
            f"step-balance calibration file {path!r} not found; run the calibration (each "
            f"modality trained alone on a subset) and save its converged losses there")
    try:
        data = json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {path!r} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "converged_losses" in data:
        data = data["converged_losses"]
    _validate_calibration(data, path)
    return {k: float(v) for k, v in data.items()}


def _validate_calibration(data, path: str) -> None:
    if not isinstance(data, dict) or not data:
        raise ValueError(f"calibration {path!r} must be a non-empty JSON object "
                         f"{{modality: converged loss}}, got {type(data).__name__}")
    for name, value in data.items():
        if name not in MODALITIES:
            raise ValueError(f"calibration {path!r}: unknown modality {name!r}; "
                             f"known modalities are {MODALITIES}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"calibration {path!r}: loss for {name!r} must be a finite "
                             f"number > 0, got {value!r}")


def size_proportional_sampler(dataset_sizes: Mapping[str, int], seed: int) -> Callable[[int], str]:
    """pick(step) -> modality of that micro-batch, drawn with probability ∝ dataset size.

    A pure function of (seed, step), so a resumed run draws the same sequence.
    """
    _check_modalities(dataset_sizes)
    names = list(dataset_sizes)
    sizes = np.array([dataset_sizes[n] for n in names], np.float64)
    if sizes.size == 0 or np.any(sizes < 0) or sizes.sum() <= 0:
        raise ValueError(f"dataset_sizes must be >= 0 with a positive total, got {dict(dataset_sizes)}")
    probs = sizes / sizes.sum()

    def pick(step: int) -> str:
        rng = np.random.default_rng([seed, step])
        return names[rng.choice(len(names), p=probs)]
    return pick


def round_robin(modalities: Sequence[str]) -> Callable[[int], str]:
    """pick(step) -> modalities[step mod M]."""
    _check_modalities(modalities)
    names = list(modalities)
    if not names:
        raise ValueError("round_robin needs at least one modality")
    return lambda step: names[step % len(names)]


# --------------------------------------------------------------------------- dynamic adaptive

@dataclasses.dataclass(frozen=True)
class AdaptiveBalance:
    """Dynamic adaptive balance over `modalities` (a subset of MODALITIES, M = len).

    Each `update` appends one validation pass. For the first `window` (H)
    passes every weight is 1; after that, over the last H losses per modality:
      L̃ = (L − min{min_w, ε})/(max_w − min{min_w, ε})  (the paper's form: for positive
      losses ≈ L/max_w, so a flat noisy curve stays flat instead of being stretched to
      [0, 1] as min–max scaling would); aᵢ = least-squares slope of L̃ vs pass index;
      ãᵢ = M·aᵢ/Σⱼ|aⱼ|; sᵢ = softmax(ã)ᵢ·(−ãᵢ); wᵢ = M·softmax(f·s)ᵢ  (Σw = M);
      w̃ ← momentum·w̃ + (1 − momentum)·w,  w̃ starting at 1.
    Modalities not balanced keep weight 1 in the full vector: 1 is the mean
    balanced weight, so they keep their share of the mixture.
    """
    modalities: tuple[str, ...]
    window: int = 5
    temperature: float = 1.0  # f
    momentum: float = 0.9
    eps: float = 1e-6

    def __post_init__(self):
        _check_modalities(self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"balance.dynamic.modalities must be distinct and non-empty, "
                             f"got {self.modalities!r}")
        if not (isinstance(self.window, int) and self.window >= 2):
            raise ValueError(f"balance.dynamic.window must be an int >= 2, got {self.window!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"balance.dynamic.momentum must be in [0, 1), got {self.momentum!r}")

    @classmethod
    def from_config(cls, cfg) -> "AdaptiveBalance":
        return cls(tuple(cfg.modalities), int(cfg.window), float(cfg.temperature),
                   float(cfg.momentum), float(cfg.eps))

    def init(self) -> dict:
        m = len(self.modalities)
        return {"history": jnp.zeros((self.window, m), jnp.float32),
                "num_passes": jnp.zeros((), jnp.int32),
                "raw_weights": jnp.ones((m,), jnp.float32),
                "weights": jnp.ones((m,), jnp.float32)}

    def losses_array(self, val_losses) -> jnp.ndarray:
        """(M,) losses in `modalities` order from a dict {modality: loss} or an array."""
        if isinstance(val_losses, Mapping):
            missing = set(self.modalities) - set(val_losses)
            if missing:
                raise ValueError(f"validation losses missing for {sorted(missing)}")
            val_losses = [val_losses[n] for n in self.modalities]
        return jnp.asarray(val_losses, jnp.float32).reshape(len(self.modalities))

    def update(self, state: dict, val_losses) -> dict:
        """Appends one validation pass and recomputes the weights (pure; jit-able on arrays)."""
        losses = self.losses_array(val_losses)
        history = jnp.concatenate([state["history"][1:], losses[None]], axis=0)
        num_passes = state["num_passes"] + 1
        raw = jnp.where(num_passes > self.window, self.raw_weights(history),
                        jnp.ones_like(losses))
        smoothed = jnp.where(num_passes > self.window,
                             self.momentum * state["weights"] + (1 - self.momentum) * raw,
                             state["weights"])
        return {"history": history, "num_passes": num_passes, "raw_weights": raw,
                "weights": smoothed}

    def raw_weights(self, history: jnp.ndarray) -> jnp.ndarray:
        """w from an (H, M) window of losses, oldest first."""
        m = history.shape[1]
        floor = jnp.minimum(history.min(axis=0), self.eps)
        # The guard only bites when every loss in the window is the same value <= ε.
        normed = (history - floor) / jnp.maximum(history.max(axis=0) - floor, self.eps)
        x = jnp.arange(history.shape[0], dtype=jnp.float32)
        xc = x - x.mean()
        slopes = (xc[:, None] * (normed - normed.mean(axis=0))).sum(axis=0) / (xc * xc).sum()
        # all-flat windows give Σ|a| = 0; the guard makes ã = 0 and w = 1.
        a_tilde = m * slopes / jnp.maximum(jnp.abs(slopes).sum(), 1e-12)
        s = jax.nn.softmax(a_tilde) * (-a_tilde)
        return m * jax.nn.softmax(self.temperature * s)

    def weights_vector(self, state: dict) -> jnp.ndarray:
        """(NUM_MODALITIES,) smoothed weights for the train step; unbalanced modalities get 1."""
        ids = jnp.array([modality_id(n) for n in self.modalities])
        return jnp.ones((NUM_MODALITIES,), jnp.float32).at[ids].set(state["weights"])


def state_to_json(state: dict) -> str:
    """Exact JSON form of an AdaptiveBalance state (float32 values survive float64 text)."""
    return json.dumps({k: np.asarray(v).tolist() for k, v in state.items()})


def state_from_json(text: str) -> dict:
    data = json.loads(text)
    return {"history": jnp.asarray(data["history"], jnp.float32),
            "num_passes": jnp.asarray(data["num_passes"], jnp.int32),
            "raw_weights": jnp.asarray(data["raw_weights"], jnp.float32),
            "weights": jnp.asarray(data["weights"], jnp.float32)}

"""Optimizers: LR schedules, AdamW / FixNorm-AdamW, parameter groups.

`make_optimizer(config.opt, config.train.steps, params)` builds, as one optax chain:

    clip_by_global_norm(grad_clip)
    multi_transform({group: AdamW(lr·multiplier), "frozen": set_to_zero()})
    fixnorm(...)                       # only when opt.name == "fixnorm"

Parameters are addressed by their '/'-joined path in the tree handed in
(e.g. "llm/layers/attn/q/kernel"); every rule is a regex applied with
`re.search`, first match wins. Frozen parameters keep no optimizer state.

FixNorm [FixNorm, arXiv 2103.15345] drops weight decay and holds norms
fixed instead (see `fixnorm`). Which weights count as scale-invariant is
config (`opt.fixnorm.scale_invariant`), empty in base.py; `fixnorm_preset(config)`
fills it from the model config (`fixnorm_scale_invariant`), as the rules
depend on the connector kind [ours]: in our
pre-norm Llama/ViT blocks no kernel is exactly invariant (q/k/v/gate/up read
a normalised input but feed no norm; o/down write into the residual stream,
which the next RMSNorm normalises together with the residual). Exactly
invariant are: the M2-omni connector's last projection (each token is
L2-normalised after it; per tensor, not per channel), q/k kernels under
QK-norm, and C-Abstractor convs followed by a norm. Labelling LLM kernels
anyway only bounds their norms. The LM head is the classifier.

Param trees may be plain arrays, `jax.ShapeDtypeStruct`s or flax
`nn.Partitioned` boxes; labels come back boxed the same way so they line up
with the tree optax sees (the trainer unboxes first; both work).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from m2omni_jax import config_fields
from m2omni_jax.models.llm import LLMConfig

DEFAULT_GROUP = "default"
FROZEN = "frozen"
NO_DECAY_SUFFIX = ":no_decay"
SCALE_INVARIANT = "scale_invariant"
CLASSIFIER = "classifier"
UNCONSTRAINED = "none"

DEFAULT_NO_DECAY = (r"(^|/)(scale|bias)$",)  # norm scales and biases, by name (robust to nn.scan)
DECAYS = ("cosine", "linear", "constant")
WD_CONVENTIONS = ("lr_coupled", "schedule_only")


# --------------------------------------------------------------------------- schedules

def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                  decay: str = "cosine", final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine/linear decay to final_fraction·peak [MM1].

    lr(0) = 0, lr(warmup_steps) = peak, lr(total_steps) = final_fraction·peak and
    constant after. decay="constant" holds the peak after warmup.
    """
    if not (isinstance(peak_lr, (int, float)) and peak_lr > 0 and math.isfinite(peak_lr)):
        raise ValueError(f"opt.peak_lr must be a positive finite number, got {peak_lr!r}")
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(f"config.train.steps (the schedule length) must be a positive int, got {total_steps!r}")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps <= total_steps):
        raise ValueError(f"config.opt.warmup_steps must be an int in [0, config.train.steps={total_steps}], "
                         f"got {warmup_steps!r}")
    if decay not in DECAYS:
        raise ValueError(f"opt.decay must be one of {DECAYS}, got {decay!r}")
    if not (isinstance(final_fraction, (int, float)) and 0.0 <= final_fraction <= 1.0):
        raise ValueError(f"opt.final_fraction must be in [0, 1], got {final_fraction!r}")
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=final_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak_lr, final_fraction * peak_lr, decay_steps)
    else:
        after = optax.constant_schedule(peak_lr)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def mm1_lr_and_wd(num_params: float) -> tuple[float, float]:
    """MM1's fitted peak LR and weight decay for an LLM of `num_params` parameters.

    η = exp(−0.4214·ln N − 0.5535), λ = 0.1·η  (MM1, arXiv 2403.09611, §"Final model
    and training recipe", as transcribed in DESIGN.md §2).

    What we could verify: MM1 does extrapolate the optimal peak LR from a grid
    search on small LLMs with a log-linear law in N, and ties λ to η; the
    coefficients themselves could not be re-read from the paper here, so they
    are DESIGN's transcription. Convention: MM1 trains with AXLearn, whose
    decoupled AdamW decays by schedule_fraction·λ per step (λ not multiplied by
    the peak LR, Loshchilov & Hutter Alg. 2); a λ this small only makes sense
    that way. Use it with opt.weight_decay_convention = "schedule_only"; in
    optax's own convention (decay·lr) the equivalent weight_decay is λ/η = 0.1.
    """
    if not (num_params > 0 and math.isfinite(num_params)):
        raise ValueError(f"num_params must be a positive finite number, got {num_params!r}")
    eta = math.exp(-0.4214 * math.log(num_params) - 0.5535)
    return eta, 0.1 * eta


def mm1_opt_fields(llm_cfg) -> dict:
    """config.opt fields from MM1's law for the LLM `llm_cfg` (config.model.llm):
    peak_lr = η, weight_decay = λ = 0.1·η, in the "schedule_only" convention the law assumes.

    N counts every LLM parameter, embeddings included (Llama-3.1-8B: 8.03e9 → η ≈ 3.85e-5);
    for MoE, those one token uses [ours: MM1's law was fitted on dense models].
    """
    eta, wd = mm1_lr_and_wd(LLMConfig.from_config(llm_cfg).num_params(active=True))
    return dict(peak_lr=eta, weight_decay=wd, weight_decay_convention="schedule_only")


# --------------------------------------------------------------------------- labels

def path_str(path) -> str:
    """'/'-joined keys of a jax key path (dict keys, attribute names, indices): "llm/layers/0/kernel"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _compile(patterns: Sequence[str], field: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"{field}: invalid regex {p!r}: {e}") from None
    return out


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def map_paths(fn: Callable[[str], Any], params) -> Any:
    """Tree of fn(path) mirroring `params`; `nn.Partitioned` boxes are kept around the result."""
    def leaf(path, x):
        value = fn(path_str(path))
        return x.replace_boxed(value) if _is_box(x) else value
    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_box)


def param_labels(params, rules: Sequence[tuple[str, str]], default: str = DEFAULT_GROUP):
    """Label each parameter by the first (regex, label) rule whose regex matches its path."""
    compiled = list(zip(_compile([p for p, _ in rules], "label rules"), [lab for _, lab in rules]))

    def label(path):
        return next((lab for pat, lab in compiled if pat.search(path)), default)
    return map_paths(label, params)


def frozen_mask(opt, params):
    """Tree of bools mirroring `params` (unboxed): True where `opt.frozen` matches the path."""
    frozen = _matches(_get(opt, "frozen", ()), "opt.frozen")
    return map_paths(frozen, params)


def _matches(patterns: Sequence[str], field: str) -> Callable[[str], bool]:
    compiled = _compile(patterns, field)
    return lambda path: any(p.search(path) for p in compiled)


# --------------------------------------------------------------------------- FixNorm

class FixNormState(NamedTuple):
    target_norms: Any  # per leaf: the norm to hold (keepdims shape), or a () zero when untouched


def _reduce_axes(ndim: int, stacked: int, per_channel: bool) -> tuple[int, ...]:
    """Axes a norm sums over: all but the leading stacked (nn.scan) axes, and the last if per channel."""
    stop = ndim - 1 if per_channel and ndim - stacked > 1 else ndim
    return tuple(range(stacked, stop))


def _norm(x, axes):
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def fixnorm(labels, tau: float | None = None, *, per_channel: bool = False,
            classifier_per_class: bool = False, stacked=None) -> optax.GradientTransformation:
    """FixNorm's norm control [FixNorm, arXiv 2103.15345]; must be the LAST element of a chain.

    labels: tree like params (or a callable params -> tree) of strings:
      "scale_invariant": weight followed by a normalisation; its norm is held
          at its initial value ‖w₀‖ (stored in the state at init), so the LR
          schedule alone sets the effective step η/‖w‖².
      "classifier": the final classifier (LM head); its norm is held at τ,
          which sets the logit scale (the paper's cross-boundary risk).
          tau=None holds it at its initial norm instead.
      anything else: passed through untouched.
    per_channel: scale-invariant norms per output channel (last axis) rather
      than per tensor; only right when the following normalisation is per
      channel (BatchNorm/GroupNorm-like), not for LayerNorm/RMSNorm/L2 over
      the feature axis.
    classifier_per_class: τ is the norm of each class vector (last axis, as in
      a flax Dense kernel (embed, vocab)) instead of the whole matrix.
    stacked: optional tree of ints, the number of leading nn.scan layer axes
      of each leaf; norms never mix layers.

    The inner update u is replaced by u' = (w+u)·r/‖w+u‖ − w, so that
    `optax.apply_updates` lands exactly on the sphere of radius r.
    """
    def trees(params):
        lab = labels(params) if callable(labels) else labels
        stk = stacked if stacked is not None else jax.tree.map(lambda _: 0, lab)
        return lab, stk

    def axes_for(label, x, stk):
        per = classifier_per_class if label == CLASSIFIER else per_channel
        return _reduce_axes(x.ndim, stk, per)

    def init_fn(params):
        lab, stk = trees(params)

        def target(label, p, s):
            if label == SCALE_INVARIANT or (label == CLASSIFIER and tau is None):
                return _norm(p, axes_for(label, p, s))
            if label == CLASSIFIER:
                shape = _norm(p, axes_for(label, p, s)).shape
                return jnp.full(shape, tau, jnp.float32)
            return jnp.zeros((), jnp.float32)
        return FixNormState(jax.tree.map(target, lab, params, stk))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("fixnorm needs `params` in update(); pass them to the chain's update")
        lab, stk = trees(params)

        def project(label, u, w, r, s):
            if label not in (SCALE_INVARIANT, CLASSIFIER):
                return u
            new = w.astype(jnp.float32) + u.astype(jnp.float32)
            norm = jnp.maximum(_norm(new, axes_for(label, w, s)), 1e-30)
            return (new * (r / norm) - w.astype(jnp.float32)).astype(u.dtype)
        new_updates = jax.tree.map(project, lab, updates, params, state.target_norms, stk)
        return new_updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- the optimizer

def _get(cfg, key, default):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _group_labels(opt, params):
    """Label per param: 'frozen', a group name, or '<group>:no_decay' (AdamW only)."""
    frozen = _matches(_get(opt, "frozen", ()), "opt.frozen")
    no_decay = _matches(_get(opt, "no_decay", DEFAULT_NO_DECAY), "opt.no_decay")
    rules = [tuple(r) for r in _get(opt, "param_groups", ())]
    for r in rules:
        if len(r) != 2 or r[1] == FROZEN or NO_DECAY_SUFFIX in r[1]:
            raise ValueError(f"opt.param_groups: each rule is (regex, group) and the group may not "
                             f"be {FROZEN!r} or contain {NO_DECAY_SUFFIX!r}; got {r!r}")
    compiled = list(zip(_compile([p for p, _ in rules], "opt.param_groups"), [g for _, g in rules]))
    decays = _get(opt, "name", "adamw") == "adamw" and (_get(opt, "weight_decay", 0.0) or 0.0) > 0

    def label(path):
        if frozen(path):
            return FROZEN
        group = next((g for p, g in compiled if p.search(path)), DEFAULT_GROUP)
        return group + NO_DECAY_SUFFIX if decays and no_decay(path) else group
    return map_paths(label, params), {g for _, g in rules} | {DEFAULT_GROUP}


def _fixnorm_labels(opt, params):
    fn = _get(opt, "fixnorm", {})
    frozen = _matches(_get(opt, "frozen", ()), "opt.frozen")
    classifier = _matches(_get(fn, "classifier", ()), "opt.fixnorm.classifier")
    invariant = _matches(_get(fn, "scale_invariant", ()), "opt.fixnorm.scale_invariant")

    def label(path):
        if frozen(path):
            return UNCONSTRAINED  # a frozen classifier must not be pulled to τ
        if classifier(path):
            return CLASSIFIER
        return SCALE_INVARIANT if invariant(path) else UNCONSTRAINED
    stacked = _matches(_get(fn, "stacked", ()), "opt.fixnorm.stacked")
    return map_paths(label, params), map_paths(lambda p: int(stacked(p)), params)


def fixnorm_scale_invariant(config) -> tuple[str, ...]:
    """Path regexes of the weights the model of `config` normalises right after (per tensor):

    - the linear connector's and the audio projector's last projection: each token is
      L2-normalised after it (their biases, left free, make this near- rather than exactly
      invariant; a bias held at its zero initial norm could never move);
    - the C-Abstractor's convs: each is followed by a LayerNorm over channels and has no bias.
    The avg_pool / attn_pool read-outs feed the LLM unnormalised, and in the pre-norm ViT, SAN-M
    and LLM blocks every kernel writes into the residual stream, so none of those is invariant.
    """
    if _get(config.model, "kind", "llm") != "omni":
        return ()
    connector = config.model.connector
    rules = []
    if connector.kind == "linear":
        rules.append(r"^connector/fc2/kernel$" if connector.mlp else r"^connector/proj/kernel$")
    elif connector.kind == "c_abstractor":
        rules.append(r"^connector/stage[12]_block\d+/(reduce|spatial|expand|shortcut)/kernel$")
    audio = _get(config.model, "audio", {})
    if _get(audio, "enabled", False):
        rules.append(r"^audio/projector/fc2/kernel$" if _get(audio, "projector", "linear") == "mlp"
                     else r"^audio/projector/proj/kernel$")
    return tuple(rules)


def fixnorm_preset(config):
    """A copy of the (typed) `config` switched to FixNorm-AdamW: opt.name = "fixnorm" and the
    model's scale-invariant weights (`fixnorm_scale_invariant`) added to opt.fixnorm.scale_invariant."""
    known = tuple(config.opt.fixnorm.scale_invariant)
    return config_fields.replace(config, **{
        "opt.name": "fixnorm",
        "opt.fixnorm.scale_invariant": known + tuple(r for r in fixnorm_scale_invariant(config) if r not in known)})


def make_schedule_from_config(opt, total_steps: int) -> optax.Schedule:
    """make_schedule from config.opt (peak_lr, warmup_steps, decay, final_fraction)."""
    return make_schedule(_get(opt, "peak_lr", None), total_steps, _get(opt, "warmup_steps", 0),
                         _get(opt, "decay", "cosine"), _get(opt, "final_fraction", 0.1))


def make_optimizer(opt, total_steps: int, params) -> optax.GradientTransformation:
    """Builds the optax chain described in the module docstring from `config.opt`.

    total_steps: length of the LR schedule (config.train.steps).
    params: the (unboxed) parameter tree, or its `jax.eval_shape` structure;
    only paths are read here.
    """
    name = _get(opt, "name", "adamw")
    if name not in ("adamw", "fixnorm"):
        raise ValueError(f"opt.name must be 'adamw' or 'fixnorm', got {name!r}")
    peak_lr = _get(opt, "peak_lr", None)
    schedule = make_schedule_from_config(opt, total_steps)
    labels, groups = _group_labels(opt, params)
    transforms = {}
    for label in set(jax.tree.leaves(labels)):
        transforms[label] = (optax.set_to_zero() if label == FROZEN
                             else _inner(opt, name, label, schedule, peak_lr, groups))
    chain = []
    grad_clip = _get(opt, "grad_clip", 0.0) or 0.0
    if grad_clip < 0:
        raise ValueError(f"opt.grad_clip must be >= 0 (0 disables), got {grad_clip!r}")
    if grad_clip > 0:
        chain.append(optax.clip_by_global_norm(grad_clip))
    chain.append(optax.multi_transform(transforms, labels))
    if name == "fixnorm":
        fn = _get(opt, "fixnorm", {})
        fn_labels, stacked = _fixnorm_labels(opt, params)
        if SCALE_INVARIANT not in jax.tree.leaves(fn_labels):
            logging.warning("opt.name='fixnorm': opt.fixnorm.scale_invariant=%r labels no parameter, so "
                            "only the classifier's norm is held (optimizers.fixnorm_preset(config) labels "
                            "the model's scale-invariant weights)", tuple(_get(fn, "scale_invariant", ())))
        chain.append(fixnorm(fn_labels, _get(fn, "tau", None),
                             per_channel=_get(fn, "per_channel", False),
                             classifier_per_class=_get(fn, "classifier_per_class", False),
                             stacked=stacked))
    return optax.chain(*chain)


def _lr_multiplier(opt, group: str, groups: set) -> float:
    mults = dict(_get(opt, "lr_multipliers", {}) or {})
    unknown = set(mults) - groups
    if unknown:
        raise ValueError(f"opt.lr_multipliers names unknown groups {sorted(unknown)}; "
                         f"groups from opt.param_groups are {sorted(groups)}")
    mult = mults.get(group, 1.0)
    if not (isinstance(mult, (int, float)) and mult >= 0):
        raise ValueError(f"opt.lr_multipliers[{group!r}] must be a number >= 0, got {mult!r}")
    return float(mult)


def _inner(opt, name, label, schedule, peak_lr, groups) -> optax.GradientTransformation:
    """Adam(W) for one group: lr = multiplier·schedule; FixNorm drops weight decay."""
    group = label.removesuffix(NO_DECAY_SUFFIX)
    mult = _lr_multiplier(opt, group, groups)
    lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
    mu_dtype = _get(opt, "mu_dtype", None) or None
    adam_kw = dict(b1=_get(opt, "b1", 0.9), b2=_get(opt, "b2", 0.95), eps=_get(opt, "eps", 1e-8),
                   mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None)
    wd = _get(opt, "weight_decay", 0.0) or 0.0
    if name == "fixnorm" or label.endswith(NO_DECAY_SUFFIX) or wd == 0:
        return optax.adam(lr, **adam_kw)
    convention = _get(opt, "weight_decay_convention", "lr_coupled")
    if convention not in WD_CONVENTIONS:
        raise ValueError(f"opt.weight_decay_convention must be one of {WD_CONVENTIONS}, "
                         f"got {convention!r}")
    if convention == "schedule_only":
        wd = wd / peak_lr  # optax multiplies decay by lr_t = peak·s_t; this leaves s_t·λ
    return optax.adamw(lr, weight_decay=wd, **adam_kw)


# --------------------------------------------------------------------------- FixNorm tuning

class TuningPlan(NamedTuple):
    eta_trials: list  # [(eta, tau_default), ...] run first
    tau_grid: list    # then (best_eta, tau) for each tau here


def fixnorm_tuning_plan(eta_grid: Sequence[float], tau_grid: Sequence[float],
                        tau_default: float) -> TuningPlan:
    """The paper's few-trial search: η at a default τ, then τ at the best η.

    It relies on η and τ being nearly decoupled [FixNorm]: η sets the
    effective step of scale-invariant weights, τ the classifier's logit scale.
    τ = tau_default is not re-run in the second stage.
    """
    if not eta_grid or not tau_grid:
        raise ValueError("fixnorm tuning needs a non-empty eta_grid and tau_grid")
    if any(not (e > 0) for e in eta_grid) or any(not (t > 0) for t in tau_grid) or tau_default <= 0:
        raise ValueError("fixnorm tuning: every eta and tau must be > 0")
    return TuningPlan([(float(e), float(tau_default)) for e in eta_grid],
                      [float(t) for t in tau_grid if t != tau_default])


def tune_fixnorm(run_fn: Callable[[float, float], float], eta_grid: Sequence[float],
                 tau_grid: Sequence[float], tau_default: float, *, mode: str = "min"):
    """Runs the tuning plan; run_fn(eta, tau) -> metric (lower is better unless mode='max').

    Returns ((best_eta, best_tau), table) with one dict per trial:
    {"stage": 1|2, "eta", "tau", "metric"}. NaN metrics (diverged runs) rank last.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sign = 1.0 if mode == "min" else -1.0

    def key(row):
        m = row["metric"]
        return math.inf if m is None or math.isnan(m) else sign * m

    plan = fixnorm_tuning_plan(eta_grid, tau_grid, tau_default)
    table = [dict(stage=1, eta=e, tau=t, metric=float(run_fn(e, t))) for e, t in plan.eta_trials]
    best_eta = min(table, key=key)["eta"]
    table += [dict(stage=2, eta=best_eta, tau=t, metric=float(run_fn(best_eta, t)))
              for t in plan.tau_grid]
    best = min(table, key=key)
    return (best["eta"], best["tau"]), table

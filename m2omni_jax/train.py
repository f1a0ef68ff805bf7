"""Omni / LLM training: config -> (build.py) model, optimizer, data -> the training loop.

`train_and_evaluate(config, workdir)` builds the run and hands it to `training/loop.py`;
what this kind of run adds is here: the balance strategy's step and batch source, the
per-modality metrics, the dynamic balancer, periodic held-out answers and held-out losses.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
import optax
from absl import logging

from m2omni_jax import build, evaluate, faults
from m2omni_jax import workdir as workdir_lib
from m2omni_jax.data import balance_sources, media, pipeline, sources, tokenizer as tokenizer_lib
from m2omni_jax.modalities import MODALITIES, modality_id
from m2omni_jax.models.omni import audio_enabled
from m2omni_jax.parallel import sharding
from m2omni_jax.training import (balance, balance_optax, balanced_step, dynamic_balance, loop as loop_lib, mfu,
                                 optimizers, train_step)
from m2omni_jax.config_fields import replace


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir`'s latest checkpoint); returns the last logged metrics,
    plus `heldout_loss/<modality>` with config.train.heldout_batches."""
    config = build.validate_config(config, jax.device_count(), jax.process_count())
    if balance_strategy(config) == "step":
        step_balance_weights(config)  # no calibration (or a bad one): fail before anything heavy
    workdir_lib.prepare(workdir)  # writable, and ours alone, before anything heavy
    if audio_enabled(config):  # CMVN statistics: measured by the first run, read back on resume
        config = media.with_cmvn(config, workdir)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices; balance strategy %s", dict(mesh.shape), mesh.size,
                 balance_strategy(config))
    tokenizer = process_zero_first(functools.partial(tokenizer_lib.get_tokenizer, config), "tokenizer")
    model, tx, shapes = build.make_model_and_optimizer(optimizer_chain_config(config), tokenizer)
    tx = balanced_optimizer(config, tx)
    state, abstract_state, state_shardings = train_step.create_train_state(
        model, tx, mesh, rules, shapes, config.seed)
    validation_loss = dynamic_balance.jit_validation_loss(
        functools.partial(train_step.loss_fn, model=model, z_loss_weight=config.train.z_loss_weight),
        mesh, rules, state_shardings.params)
    balancer = make_balancer(config, tokenizer, mesh, validation_loss)
    step_fn, to_global = make_step(config, model, mesh, rules, abstract_state, state_shardings)
    callbacks = [c for c in (balancer, periodic_evaluator(config, model, tokenizer, mesh, rules),
                             heldout_losses(config, tokenizer, mesh, validation_loss)) if c is not None]
    loop = loop_lib.Loop(
        step_fn, make_batch_source(config, tokenizer), loop_lib.LoopOptions.from_config(config), workdir,
        to_global=to_global, metrics_fn=per_modality_metrics, throughput=throughput(config, model),
        schedule=optimizers.make_schedule_from_config(config.opt, config.train.steps), callbacks=callbacks,
        fresh_start=(functools.partial(build.init_from_previous_stage, config, workdir,
                                       abstract_state=abstract_state, state_shardings=state_shardings)
                     if config.init_from else None))
    _, metrics = loop.run(state)
    return metrics


def process_zero_first(fn: Callable, name: str):
    """fn() on process 0, then on the others once it is done: what it writes once (the built-in
    tokenizer and the text it is trained on) is written by process 0 and read by the rest on a
    shared file system (and made the same way on each host's own disk otherwise)."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"m2omni_{name}_ready")
    return out if jax.process_index() == 0 else fn()


def make_step(config, model, mesh, rules, abstract_state, state_shardings) -> tuple[Callable, Callable]:
    """(step_fn(state, global batch), local batch -> global arrays) for the balance strategy
    (the dynamic balance's weights are read from the optimizer state by the step)."""
    loss_weights = loss_weight_vector(config)
    frozen = optimizers.frozen_mask(config.opt, abstract_state.params) if config.opt.frozen else None
    if balance_strategy(config) == "step":
        loss_fn = functools.partial(train_step.loss_fn, model=model, z_loss_weight=config.train.z_loss_weight)
        ndims = {k: train_step._BATCH_NDIM.get(k, 2) for k in build.batch_keys(config)}
        step_loss = loss_fn if frozen is None else train_step.without_gradient_through(frozen, loss_fn)
        balanced = balanced_step.jit_balanced_step(step_loss, mesh, rules, state_shardings, ndims)
        return balanced, functools.partial(stacked_global_batch, mesh=mesh)
    step = train_step.jit_train_step(model, mesh, rules, state_shardings, z_loss_weight=config.train.z_loss_weight,
                                     batch_keys=build.batch_keys(config), frozen=frozen)
    to_global = functools.partial(pipeline.make_global_batch, mesh=mesh)
    return (lambda st, batch: step(st, batch, loss_weights)), to_global


def balanced_optimizer(config, tx):
    """The optimizer with the balance strategy's Optax transformation (balance_optax), so the
    strategy's state is optimizer state: step balance wraps it, the dynamic balance's weight
    schedule is chained after it."""
    strategy = balance_strategy(config)
    if strategy == "step":
        weights = step_balance_weights(config)
        logging.info("step balance weights %s", dict(zip(config.balance.modalities, weights.tolist())))
        return balance_optax.step_balance(tx, weights, grad_clip=float(config.opt.grad_clip or 0.0))
    if strategy == "dynamic":
        return optax.chain(tx, balance_optax.dynamic_balance(adaptive_balance(config)))
    return tx


def adaptive_balance(config) -> balance.AdaptiveBalance:
    dyn = config.balance.dynamic
    return balance.AdaptiveBalance(tuple(config.balance.modalities), int(dyn.window), float(dyn.temperature),
                                   float(dyn.momentum), float(dyn.eps))


def throughput(config, model) -> loop_lib.Throughput:
    micro_batches = len(config.balance.modalities) if balance_strategy(config) == "step" else 1
    tokens_per_step = micro_batches * config.train.batch_size * config.data.seq_len
    return loop_lib.Throughput(
        items_per_step=tokens_per_step, item="tokens",
        flops_per_step=build.model_flops_per_token(config, model) * tokens_per_step,
        peak_flops=mfu.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count())


def loss_weight_vector(config) -> np.ndarray:
    weights = np.ones(len(MODALITIES), np.float32)
    for name, value in config.train.loss_weights.items():
        weights[modality_id(name)] = value
    return weights


def per_modality_metrics(metrics: dict, local_batch) -> dict[str, float]:
    """The step's scalars, loss/<modality> from its per-modality sums for modalities present,
    and the batch's packing efficiency."""
    metrics = dict(metrics)
    metrics.pop("micro_losses", None)
    sums, counts = np.asarray(metrics.pop("ce_sum")), np.asarray(metrics.pop("token_count"))
    out = {k: float(v) for k, v in metrics.items()}
    for i, name in enumerate(MODALITIES):
        if counts[i] > 0:
            out[f"loss/{name}"] = float(sums[i] / counts[i])
    out["packing_efficiency"] = pipeline.packing_efficiency(local_batch)
    return out


BALANCE_STRATEGIES = ("none", "step", "size_proportional", "round_robin", "dynamic")


def balance_strategy(config) -> str:
    strategy = config.balance.strategy
    if strategy not in BALANCE_STRATEGIES:
        raise ValueError(f"config.balance.strategy={strategy!r}; use one of {BALANCE_STRATEGIES}")
    return strategy


def make_batch_source(config, tokenizer):
    """The checkpointable training iterator the balance strategy asks for."""
    strategy = balance_strategy(config)
    if strategy in ("none", "dynamic"):
        return build.make_train_iterator(config, tokenizer)
    modalities = tuple(config.balance.modalities)
    iterators = {m: build.make_train_iterator(build.single_modality_config(config, m), tokenizer) for m in modalities}
    if strategy == "step":
        return balance_sources.StackedModalityBatches(iterators)
    if strategy == "round_robin":
        return balance_sources.PickedModalityBatches(iterators, balance.round_robin(modalities))
    return balance_sources.PickedModalityBatches(
        iterators, balance.size_proportional_sampler(dataset_sizes(config, modalities), config.seed))


def dataset_sizes(config, modalities) -> dict[str, int]:
    """Training records of each modality: the sum over the configured sources' parts."""
    sizes = {m: 0 for m in modalities}
    for part in sources.parts(config, "train").values():
        if part.modality in sizes:
            sizes[part.modality] += len(part.records())
    empty = sorted(m for m, n in sizes.items() if n == 0)
    if empty:
        raise faults.ConfigError(f"config.balance.strategy='size_proportional': config.balance.modalities "
                                 f"has {empty} but config.data.sources hold no training records of them")
    return sizes


def optimizer_chain_config(config):
    """The config the optax chain is built from. Step balance clips the weighted average in its
    own transformation (balance_optax.clip_weighted_sum), so its chain must not clip the α-sized sum again."""
    if balance_strategy(config) != "step" or not config.opt.grad_clip:
        return config
    return replace(config, **{"opt.grad_clip": 0.0})


def step_balance_weights(config) -> np.ndarray:
    """wᵢ in config.balance.modalities order, from the calibration file, or α/M each when
    balance.step.equal_weights is set instead; a ConfigError naming the field otherwise."""
    modalities = tuple(config.balance.modalities)
    path = config.balance.step.calibration_file
    equal = bool(config.balance.step.equal_weights)
    if bool(path) == equal:
        raise faults.ConfigError(
            f"config.balance.strategy='step' needs exactly one of config.balance.step.calibration_file "
            f"(converged losses from m2omni-calibrate; got {path!r}) and "
            f"config.balance.step.equal_weights=True (got {equal})")
    try:
        converged = balance.load_calibration(path) if path else {m: 1.0 for m in modalities}
    except (OSError, ValueError) as e:
        raise faults.ConfigError(f"config.balance.step.calibration_file={path!r}: {e}") from e
    missing = set(modalities) - set(converged)
    if missing:
        raise faults.ConfigError(f"config.balance.step.calibration_file={path!r} has no converged loss "
                                 f"for {sorted(missing)} of config.balance.modalities")
    weights = balance.step_balance_weights({m: converged[m] for m in modalities}, config.balance.step.alpha)
    return np.asarray([weights[m] for m in modalities], np.float32)


def heldout_batches(config, tokenizer, mesh, modalities, num_batches: int, batch_size: int,
                    split: str = "eval") -> dict:
    """Fixed held-out batches per modality of `split` ("eval", or "validation": held out of the
    training data for the dynamic balance), as global arrays."""
    out = {}
    for m in modalities:
        it = build.make_train_iterator(build.single_modality_config(config, m, split=split, batch_size=batch_size),
                                       tokenizer)
        out[m] = dynamic_balance.fixed_validation_batches(
            it, num_batches, lambda b: pipeline.make_global_batch(b, mesh))
    return out


def make_balancer(config, tokenizer, mesh, validation_loss) -> dynamic_balance.DynamicBalancer | None:
    """The dynamic adaptive balance [paper, IT3] (a loop callback), for strategy "dynamic"."""
    if balance_strategy(config) != "dynamic":
        return None
    dyn = config.balance.dynamic
    adaptive = adaptive_balance(config)
    # Sᵢ batches of Bᵢ from records held out of the training data [paper], never the eval split.
    batches = heldout_batches(config, tokenizer, mesh, adaptive.modalities, dyn.val_batches, dyn.val_batch_size,
                              split="validation")
    return dynamic_balance.DynamicBalancer(adaptive, batches, validation_loss, int(dyn.interval_steps))


class HeldoutLosses(loop_lib.Callback):
    """At the end of the run: the mean held-out loss of each modality, `heldout_loss/<m>`
    (`make_batches()` -> {modality: global batches}, read only then)."""

    def __init__(self, make_batches: Callable[[], dict], validation_loss: Callable):
        self.make_batches, self.validation_loss = make_batches, validation_loss

    def finish(self, state) -> dict[str, float]:
        losses = dynamic_balance.heldout_losses(state.params, self.make_batches(), self.validation_loss)
        return {f"heldout_loss/{m}": v for m, v in losses.items()}


def heldout_losses(config, tokenizer, mesh, validation_loss) -> HeldoutLosses | None:
    """config.train.heldout_batches > 0: held-out losses per balanced modality at the end."""
    num_batches = int(config.train.heldout_batches)
    if num_batches <= 0:
        return None
    modalities = tuple(config.balance.modalities) if build.is_omni(config) else ("text",)
    batch_size = int(config.train.heldout_batch_size) or int(config.train.batch_size)
    return HeldoutLosses(functools.partial(heldout_batches, config, tokenizer, mesh, modalities, num_batches,
                                           batch_size), validation_loss)


def periodic_evaluator(config, model, tokenizer, mesh, rules) -> loop_lib.Periodic | None:
    """A loop callback: flat held-out metrics (greedy answers, `m2omni-eval`'s) every
    `config.eval.every` steps and at the last, on the first `config.eval.periodic_num_samples`
    held-out records (0: `num_samples`, as m2omni-eval); None when `every` is 0."""
    every = int(config.eval.every)
    if every <= 0:
        return None
    if not build.is_omni(config):
        raise ValueError(f"config.eval.every={every} needs config.model.kind='omni' (held-out "
                         "shapes-world answers); set it to 0 for a text-only run")
    if jax.process_count() > 1:
        raise ValueError(f"config.eval.every={every} runs in one process only (its prompts are host "
                         "arrays); set it to 0 and run m2omni-eval on the checkpoints")
    num_records = int(config.eval.periodic_num_samples) or int(config.eval.num_samples)
    periodic = replace(config, **{"eval.num_samples": num_records})
    evaluate_fn = evaluate.make_evaluator(periodic, model, tokenizer, mesh, rules)
    return loop_lib.Periodic(every, lambda state: {**evaluate.scalar_metrics(evaluate_fn(state.params)),
                                                   "eval/num_records": float(num_records)},
                             last_step=int(config.train.steps), label="eval")


def stacked_global_batch(local_batch, mesh):
    """(M, B_local, ...) micro-batches -> global arrays split over the batch axes on dim 1."""
    out = {}
    for k, v in local_batch.items():
        spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES, *([None] * (np.ndim(v) - 2)))
        global_shape = (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:]
        out[k] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), v, global_shape)
    return out

"""The training loop: config -> mesh, data, model, optimizer -> steps -> checkpoints."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from m2omni_jax import build, evaluate
from m2omni_jax.data import balance_sources, omni_pipeline, pipeline, tokenizer as tokenizer_lib
from m2omni_jax.modalities import MODALITIES, modality_id
from m2omni_jax.models.omni import audio_enabled
from m2omni_jax.parallel import sharding
from m2omni_jax.training import (balance, balanced_step, checkpointing, dynamic_balance, metrics_logging, mfu,
                                 optimizers, train_step)



def loss_weight_vector(config) -> np.ndarray:
    weights = np.ones(len(MODALITIES), np.float32)
    for name, value in config.train.loss_weights.items():
        weights[modality_id(name)] = value
    return weights


@dataclasses.dataclass
class Throughput:
    """Tokens/s and MFU over the steps since the last report."""
    flops_per_token: float
    peak_flops: float  # all devices
    tokens_per_step: int
    _start: float = 0.0
    _steps: int = 0

    def start(self):
        self._start, self._steps = time.perf_counter(), 0

    def tick(self):
        self._steps += 1

    def exclude(self, seconds: float):
        """Leaves `seconds` of non-step work (an evaluation) out of the next report."""
        self._start += seconds

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._steps * self.tokens_per_step / elapsed
        out = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed / max(self._steps, 1),
               "mfu": tokens_per_s * self.flops_per_token / self.peak_flops}
        self.start()
        return out


def per_modality_metrics(metrics: dict) -> dict[str, float]:
    """Turns the step's per-modality sums into loss/<modality> for modalities present."""
    sums, counts = np.asarray(metrics.pop("ce_sum")), np.asarray(metrics.pop("token_count"))
    out = {k: float(v) for k, v in metrics.items()}
    for i, name in enumerate(MODALITIES):
        if counts[i] > 0:
            out[f"loss/{name}"] = float(sums[i] / counts[i])
    return out


BALANCE_STRATEGIES = ("none", "step", "size_proportional", "round_robin", "dynamic")


def balance_strategy(config) -> str:
    strategy = config.get("balance", {}).get("strategy", "none")
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
    sizes = omni_pipeline.modality_weights(config.data) if config.model.get("kind") == "omni" else {"text": 1.0}
    return balance_sources.PickedModalityBatches(
        iterators, balance.size_proportional_sampler({m: sizes.get(m, 0.0) for m in modalities}, config.seed))


def step_balance_weights(config) -> np.ndarray:
    """wᵢ in config.balance.modalities order, from the calibration file (or equal: α/M)."""
    modalities = tuple(config.balance.modalities)
    path = config.balance.step.calibration_file
    converged = balance.load_calibration(path) if path else {m: 1.0 for m in modalities}
    missing = set(modalities) - set(converged)
    if missing:
        raise ValueError(f"calibration file {path} has no converged loss for {sorted(missing)}")
    weights = balance.step_balance_weights({m: converged[m] for m in modalities}, config.balance.step.alpha)
    return np.asarray([weights[m] for m in modalities], np.float32)


def heldout_batches(config, tokenizer, mesh, modalities, num_batches: int, batch_size: int) -> dict:
    """Fixed held-out batches per modality (the eval split), as global arrays."""
    out = {}
    for m in modalities:
        it = build.make_train_iterator(build.single_modality_config(config, m, split="eval", batch_size=batch_size), tokenizer)
        out[m] = dynamic_balance.fixed_validation_batches(
            it, num_batches, lambda b: pipeline.make_global_batch(b, mesh))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    build.validate_config(config, jax.device_count(), jax.process_count())
    if audio_enabled(config):  # CMVN statistics: measured by the first run, read back on resume
        config = omni_pipeline.with_cmvn(config, workdir)
    strategy = balance_strategy(config)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices; balance strategy %s", dict(mesh.shape), mesh.size, strategy)

    tokenizer = tokenizer_lib.get_tokenizer(config)
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    data_iter = make_batch_source(config, tokenizer)
    state, abstract_state, state_shardings = train_step.create_train_state(
        model, tx, mesh, rules, shapes, config.seed)

    checkpointer = checkpointing.Checkpointer(f"{workdir}/checkpoints", save_every=config.checkpoint.every,
                                              keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    loss_fn = functools.partial(train_step.loss_fn, model=model, z_loss_weight=config.train.z_loss_weight)
    validation_loss = dynamic_balance.jit_validation_loss(loss_fn, mesh, rules, state_shardings.params)
    balancer = None
    if strategy == "dynamic":
        dyn = config.balance.dynamic
        adaptive = balance.AdaptiveBalance(tuple(config.balance.modalities), int(dyn.window),
                                           float(dyn.temperature), float(dyn.momentum), float(dyn.eps))
        batches = heldout_batches(config, tokenizer, mesh, adaptive.modalities, dyn.val_batches, dyn.val_batch_size)
        balancer = dynamic_balance.DynamicBalancer(adaptive, batches, validation_loss, int(dyn.interval_steps))

    if checkpointer.latest_step() is not None:
        state, extra = checkpointer.restore(build.abstract_state_with(abstract_state, state_shardings), data_iter)
        if balancer is not None and "dynamic_balance" in extra:
            balancer.load_json(extra["dynamic_balance"])
        logging.info("resumed from step %d", int(state.step))
    elif config.get("init_from"):
        state = build.init_from_previous_stage(config, workdir, state, abstract_state, state_shardings)
    start_step = int(state.step)

    frozen = optimizers.frozen_mask(config.opt, abstract_state.params) if config.opt.get("frozen") else None
    if strategy == "step":
        ndims = {k: train_step._BATCH_NDIM.get(k, 2) for k in build.batch_keys(config)}
        step_loss = loss_fn if frozen is None else train_step.without_gradient_through(frozen, loss_fn)
        balanced = balanced_step.jit_balanced_step(step_loss, mesh, rules, state_shardings, ndims)
        micro_weights = step_balance_weights(config)
        logging.info("step balance weights %s", dict(zip(config.balance.modalities, micro_weights.tolist())))
        step_fn = lambda st, batch, weights: balanced(st, batch, micro_weights)  # noqa: E731
        to_global = functools.partial(stacked_global_batch, mesh=mesh)
    else:
        step_fn = train_step.jit_train_step(model, mesh, rules, state_shardings,
                                            z_loss_weight=config.train.z_loss_weight,
                                            batch_keys=build.batch_keys(config), frozen=frozen)
        to_global = functools.partial(pipeline.make_global_batch, mesh=mesh)
    micro_batches = len(config.balance.modalities) if strategy == "step" else 1
    throughput = Throughput(
        flops_per_token=build.model_flops_per_token(config, model),
        peak_flops=mfu.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count(),
        tokens_per_step=micro_batches * config.train.batch_size * config.data.seq_len)
    schedule = optimizers.make_schedule_from_config(config.opt, config.train.steps)
    logger = metrics_logging.MetricLogger(workdir, config.train.steps, log_every=config.train.log_every,
                                          start_step=start_step)
    loop = Loop(config, step_fn, to_global, data_iter, loss_weight_vector(config), throughput, schedule,
                logger, checkpointer, balancer, make_periodic_evaluator(config, model, tokenizer, mesh, rules))
    with checkpointer, checkpointing.StopSignal() as stop:
        state, last = loop.run(state, stop)
    if config.train.get("heldout_batches", 0) > 0:
        modalities = tuple(config.balance.modalities) if config.model.get("kind") == "omni" else ("text",)
        batches = heldout_batches(config, tokenizer, mesh, modalities, config.train.heldout_batches,
                                  config.train.get("heldout_batch_size", 0) or config.train.batch_size)
        losses = dynamic_balance.heldout_losses(state.params, batches, validation_loss)
        last.update({f"heldout_loss/{m}": v for m, v in losses.items()})
    logger.summary({k: v for k, v in last.items() if k.startswith("heldout_loss/")})
    logger.close()
    return last


def make_periodic_evaluator(config, model, tokenizer, mesh, rules) -> Callable[[Any], dict] | None:
    """params -> flat held-out metrics (greedy answers, `m2omni-eval`'s), for the loop to run
    every `config.eval.every` steps on the first `config.eval.periodic_num_samples` held-out
    records (0: `num_samples`, as m2omni-eval); None when `every` is 0."""
    every = int(config.eval.get("every", 0))
    if every <= 0:
        return None
    if config.model.get("kind", "llm") != "omni":
        raise ValueError(f"config.eval.every={every} needs config.model.kind='omni' (held-out "
                         "shapes-world answers); set it to 0 for a text-only run")
    if jax.process_count() > 1:
        raise ValueError(f"config.eval.every={every} runs in one process only (its prompts are host "
                         "arrays); set it to 0 and run m2omni-eval on the checkpoints")
    num_records = int(config.eval.get("periodic_num_samples", 0)) or int(config.eval.num_samples)
    periodic = config.copy_and_resolve_references()
    with periodic.unlocked():
        periodic.eval.num_samples = num_records
    evaluate_fn = evaluate.make_evaluator(periodic, model, tokenizer, mesh, rules)
    return lambda params: {**evaluate.scalar_metrics(evaluate_fn(params)), "eval/num_records": float(num_records)}


def stacked_global_batch(local_batch, mesh):
    """(M, B_local, ...) micro-batches -> global arrays split over the batch axes on dim 1."""
    out = {}
    for k, v in local_batch.items():
        spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES, *([None] * (np.ndim(v) - 2)))
        global_shape = (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:]
        out[k] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), v, global_shape)
    return out


@dataclasses.dataclass
class Loop:
    """Steps until config.train.steps or a stop request; always leaves a checkpoint."""
    config: ml_collections.ConfigDict
    step_fn: Callable
    to_global: Callable
    data_iter: Any
    loss_weights: np.ndarray
    throughput: Throughput
    schedule: Callable
    logger: metrics_logging.MetricLogger
    checkpointer: checkpointing.Checkpointer
    balancer: dynamic_balance.DynamicBalancer | None = None
    evaluator: Callable[[Any], dict] | None = None  # params -> held-out metrics, every config.eval.every

    def evaluate(self, step, state):
        if self.evaluator is None:
            return
        every = int(self.config.eval.every)
        if step % every and step != self.config.train.steps:
            return
        start = time.perf_counter()
        results = self.evaluator(state.params)
        self.throughput.exclude(time.perf_counter() - start)
        self.logger.record(step, results)

    def extra(self) -> dict | None:
        return None if self.balancer is None else {"dynamic_balance": self.balancer.to_json()}

    def save(self, step, state, force=False):
        self.checkpointer.save(step, state, self.data_iter, extra=self.extra(), force=force)

    def run(self, state, stop):
        step, last, balance_logs = int(state.step), {}, {}
        weights = self.loss_weights if self.balancer is None else self.loss_weights * self.balancer.weights_vector()
        self.throughput.start()
        while step < self.config.train.steps:
            local_batch = next(self.data_iter)
            state, metrics = self.step_fn(state, self.to_global(local_batch), weights)
            step += 1
            self.throughput.tick()
            if self.balancer is not None and self.balancer.due(step):
                balance_logs = self.balancer.update(state.params)
                weights = self.loss_weights * self.balancer.weights_vector()
            if self.logger.should_log(step):
                fetched = jax.device_get(metrics)
                fetched.pop("micro_losses", None)
                last = per_modality_metrics(fetched)
                last.update(self.throughput.report(), lr=float(self.schedule(step - 1)),
                            packing_efficiency=pipeline.packing_efficiency(local_batch), **balance_logs)
            self.logger.log(step, last)
            self.evaluate(step, state)
            if stop.should_stop(step):
                logging.warning("stop requested: saving step %d and exiting", step)
                break
            if self.checkpointer.should_save(step):
                self.save(step, state)
        if self.checkpointer.latest_step() != step:
            self.save(step, state, force=True)
        self.checkpointer.wait()
        return state, last

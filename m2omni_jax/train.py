"""The training loop: config -> mesh, data, model, optimizer -> steps -> checkpoints."""
from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from m2omni_jax.data import pipeline, tokenizer as tokenizer_lib
from m2omni_jax.modalities import MODALITIES, modality_id
from m2omni_jax.models.llm import LLM, LLMConfig, training_flops_per_token
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, metrics_logging, mfu, optimizers, train_step


def validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """Fails before anything compiles, naming the field and the value."""
    mesh_shape = sharding.mesh_shape_from_config(config.mesh, num_devices)
    batch_ways = int(np.prod([s for a, s in zip(sharding.MESH_AXES, mesh_shape) if a in sharding.BATCH_AXES]))
    batch = config.train.batch_size
    if batch <= 0 or batch % batch_ways:
        raise ValueError(f"config.train.batch_size={batch} must be a positive multiple of the batch mesh "
                         f"axes {sharding.BATCH_AXES} = {batch_ways} (mesh {dict(zip(sharding.MESH_AXES, mesh_shape))})")
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} must divide evenly among {process_count} processes")
    for name in config.train.loss_weights:
        modality_id(name)  # raises naming the unknown modality
    if config.tokenizer.vocab_size > config.model.llm.vocab_size:
        raise ValueError(f"config.tokenizer.vocab_size={config.tokenizer.vocab_size} exceeds "
                         f"config.model.llm.vocab_size={config.model.llm.vocab_size}")
    LLMConfig.from_config(config.model.llm)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    validate_config(config, jax.device_count(), jax.process_count())
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)

    tokenizer = tokenizer_lib.get_tokenizer(config)
    model = LLM(LLMConfig.from_config(config.model.llm))
    data_iter = pipeline.make_train_iterator(config, tokenizer)

    batch_shape = (config.train.batch_size, config.data.seq_len)
    abstract_params = nn.unbox(train_step.abstract_boxed_params(model, {"tokens": batch_shape}))
    tx = optimizers.make_optimizer(config.opt, config.train.steps, abstract_params)
    state, abstract_state, state_shardings = train_step.create_train_state(
        model, tx, mesh, rules, {"tokens": batch_shape}, config.seed)

    checkpointer = checkpointing.Checkpointer(f"{workdir}/checkpoints", save_every=config.checkpoint.every,
                                              keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(abstract_state_with(abstract_state, state_shardings), data_iter)
        logging.info("resumed from step %d", int(state.step))
    start_step = int(state.step)

    step_fn = train_step.jit_train_step(model, mesh, rules, state_shardings,
                                        z_loss_weight=config.train.z_loss_weight)
    loss_weights = loss_weight_vector(config)
    throughput = Throughput(
        flops_per_token=training_flops_per_token(model.config, config.data.seq_len),
        peak_flops=mfu.peak_flops_per_device(config.train.peak_flops_per_device) * jax.device_count(),
        tokens_per_step=config.train.batch_size * config.data.seq_len)
    schedule = optimizers.make_schedule_from_config(config.opt, config.train.steps)
    logger = metrics_logging.MetricLogger(workdir, config.train.steps, log_every=config.train.log_every,
                                          start_step=start_step)
    with checkpointer, checkpointing.StopSignal() as stop:
        last = run_steps(config, state, step_fn, data_iter, mesh, loss_weights, throughput, schedule,
                         logger, checkpointer, stop)
    logger.summary()
    logger.close()
    return last


def run_steps(config, state, step_fn, data_iter, mesh, loss_weights, throughput, schedule,
              logger, checkpointer, stop) -> dict[str, float]:
    """Steps until config.train.steps or a stop request; always leaves a checkpoint."""
    step, last = int(state.step), {}
    throughput.start()
    while step < config.train.steps:
        local_batch = next(data_iter)
        batch = pipeline.make_global_batch(local_batch, mesh)
        state, metrics = step_fn(state, batch, loss_weights)
        step += 1
        throughput.tick()
        if logger.should_log(step):
            last = per_modality_metrics(jax.device_get(metrics))
            last.update(throughput.report(), lr=float(schedule(step - 1)),
                        packing_efficiency=pipeline.packing_efficiency(local_batch))
        logger.log(step, last)
        if stop.should_stop(step):
            logging.warning("stop requested: saving step %d and exiting", step)
            break
        if checkpointer.should_save(step):
            checkpointer.save(step, state, data_iter)
    if checkpointer.latest_step() != step:
        checkpointer.save(step, state, data_iter, force=True)
    checkpointer.wait()
    return last


def abstract_state_with(abstract_state, shardings):
    """Pairs each abstract leaf with its sharding, for restoring in place."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)

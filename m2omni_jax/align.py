"""Alignment stage [paper]: DPO(chosen, rejected) + 0.3·instruction loss, LoRA on the LLM.

    python -m m2omni_jax.align --config=configs/stages/alignment.py:tiny --workdir=/tmp/m2omni_stages/align

The LLM's parameters come from the previous stage (`config.init_from`; an
omni checkpoint's `llm/` subtree or a text-only one) and stay frozen: they
are the policy's base and the DPO reference at once. Only the LoRA tree
(q, k, v, o, gate, up, down; rank for ~5% of the LLM, alpha 2r, dropout 0.05)
is trained, on 1:1 preference and instruction batches from the shapes world.
Checkpoints hold the LoRA tree and its optimizer state (the batches are a
function of the step, so resume is exact); at the end the adapters are merged
into the base and held-out reward accuracy is reported.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from m2omni_jax.data import preference, tokenizer as tokenizer_lib
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, dpo, lora, metrics_logging, optimizers, train_step


def lora_config(config) -> lora.LoRAConfig:
    cfg = config.alignment
    return lora.LoRAConfig(rank=cfg.lora_rank or None, alpha=cfg.lora_alpha or None,
                           dropout=cfg.lora_dropout, target_fraction=cfg.lora_target_fraction)


def resolve_init_from(config, workdir: str) -> str:
    if not config.init_from:
        raise ValueError("alignment needs config.init_from: the instruction-tuned stage's workdir")
    path = config.init_from
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(workdir, path))


def load_llm_params(directory: str, abstract_params):
    """The LLM's params from an omni (`llm/…`) or text-only checkpoint, in their shardings."""
    loaded, missing = checkpointing.load_params(directory, {"llm": abstract_params})
    if not missing:
        return loaded["llm"]
    loaded, missing = checkpointing.load_params(directory, abstract_params)
    if missing:
        raise ValueError(f"init_from {directory}: the LLM parameters {missing[:5]}… are not in the checkpoint")
    return loaded


def build(config, workdir: str):
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    model = LLM(LLMConfig.from_config(config.model.llm))
    shape = (config.alignment.batch_size, config.data.seq_len)
    boxed = train_step.abstract_boxed_params(model, {"tokens": shape})
    param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), param_shardings)
    params = load_llm_params(resolve_init_from(config, workdir), abstract)

    lcfg = lora_config(config)
    boxed_lora = jax.eval_shape(lambda p: lora.init_lora(p, lcfg, boxed=True), nn.unbox(boxed))
    lora_shardings = sharding.logical_to_mesh_sharding(boxed_lora, mesh, rules)
    with sharding.activate(mesh, rules):
        lora_params = jax.jit(lambda p: lora.init_lora(p, lcfg), out_shardings=lora_shardings)(params)
    logging.info("LoRA: %.2f%% of the LLM's parameters", 100 * lora.lora_fraction(params, lora_params))

    tx = optimizers.make_optimizer(config.opt, config.train.steps, lora_params)
    state = dpo.create_alignment_state(params, lora_params, tx, config.seed)
    rep = sharding.replicated(mesh)
    state_shardings = state.replace(
        step=rep, rng=rep, params=param_shardings, lora_params=lora_shardings,
        opt_state=train_step.optimizer_state_shardings(state.opt_state, lora_params, lora_shardings, mesh))
    return mesh, rules, model, lcfg, jax.device_put(state, state_shardings), state_shardings


def jit_alignment_step(model, lcfg, config, mesh, rules, state_shardings):
    step = functools.partial(dpo.alignment_step, model=model, lora_config=lcfg, beta=config.alignment.beta,
                             instruction_weight=config.alignment.instruction_weight)
    batch_shardings = {f"{part}_{k}": sharding.batch_sharding(mesh, 3 if k == "positions" else 2)
                       for part in ("chosen", "rejected", "instruction") for k in dpo.SAMPLE_KEYS}
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run


def held_out_reward_accuracy(state, model, lcfg, config, tokenizer, mesh, rules) -> dict[str, float]:
    batch = preference.alignment_batch(tokenizer, seed=config.data.seed, split="eval", step=0,
                                       batch_size=config.alignment.batch_size, seq_len=config.data.seq_len)
    loss = functools.partial(dpo.alignment_loss, model=model, lora_config=lcfg, beta=config.alignment.beta,
                             instruction_weight=config.alignment.instruction_weight, deterministic=True)
    with sharding.activate(mesh, rules):
        _, metrics = jax.jit(loss)(state.lora_params, state.params, batch)
    return {f"eval/{k}": float(v) for k, v in jax.device_get(metrics).items()}


def align(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    tokenizer = tokenizer_lib.get_tokenizer(config)
    mesh, rules, model, lcfg, state, state_shardings = build(config, workdir)
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              save_every=config.checkpoint.every, keep=config.checkpoint.keep)
    if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, _ = checkpointer.restore(abstract)
        logging.info("resumed alignment from step %d", int(state.step))
    step_fn = jit_alignment_step(model, lcfg, config, mesh, rules, state_shardings)
    batches = preference.alignment_batches(tokenizer, seed=config.data.seed, batch_size=config.alignment.batch_size,
                                           seq_len=config.data.seq_len, first_step=int(state.step))
    logger = metrics_logging.MetricLogger(workdir, config.train.steps, log_every=config.train.log_every,
                                          start_step=int(state.step))
    step, last = int(state.step), {}
    with checkpointer, checkpointing.StopSignal() as stop:
        while step < config.train.steps:
            batch = {k: jax.make_array_from_process_local_data(
                sharding.batch_sharding(mesh, np.ndim(v)), v) for k, v in next(batches).items()}
            state, metrics = step_fn(state, batch)
            step += 1
            if logger.should_log(step):
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
            logger.log(step, last)
            if stop.should_stop(step):
                break
            if checkpointer.should_save(step):
                checkpointer.save(step, state)
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state, force=True)
        checkpointer.wait()
    final = held_out_reward_accuracy(state, model, lcfg, config, tokenizer, mesh, rules)
    logger.summary(final)
    logger.close()
    return final


FLAGS = flags.FLAGS


def main(argv):
    del argv
    align(FLAGS.config, os.path.abspath(FLAGS.workdir))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Alignment stage config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

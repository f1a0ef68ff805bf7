"""Alignment stage [paper]: DPO(chosen, rejected) + 0.3·instruction loss, LoRA on the LLM.

    m2omni-align --config=configs/stages/alignment.py:tiny --workdir=/tmp/m2omni_stages/align

The model (`config.model.kind`: "omni", the LLM with its vision tower and
connector, or "llm", the LLM alone) starts from the previous stage's
checkpoint (`config.init_from`: IT3's workdir; the whole omni tree `llm/`,
`vision/`, `connector/`, ... or, for "llm", an omni checkpoint's `llm/`
subtree or a text-only one) and stays frozen: it is the policy's base and
the DPO reference at once. Only the LoRA tree on the LLM's q, k, v, o, gate,
up, down (rank for ~5% of the LLM, alpha 2r, dropout 0.05) is trained, on 1:1
preference and instruction batches from the shapes world; for "omni" every
row carries its image's patches (data/preference.py), so the policy sees the
image it is asked about. Checkpoints hold the frozen base, the LoRA tree and
its optimizer state (the batches are a function of the step, so resume is
exact); at the end the held-out reward accuracy (eval split, adapters in
eval mode) is reported.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax import build, cli, workdir as workdir_lib
from m2omni_jax.data import media, tokenizer as tokenizer_lib
from m2omni_jax.experiments.shapes_world import preference
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, dpo, lora, loop as loop_lib, optimizers, train_step
from m2omni_jax.run_config import RunConfig


def lora_config(config) -> lora.LoRAConfig:
    cfg = config.section("alignment")
    return lora.LoRAConfig(rank=cfg.lora_rank or None, alpha=cfg.lora_alpha or None,
                           dropout=cfg.lora_dropout, target_fraction=cfg.lora_target_fraction)


def vision_options(config) -> media.VisionOptions | None:
    """The image preprocessing of the rows (None: text-only rows for model.kind="llm")."""
    if build.model_kind(config) != "omni":
        return None
    return media.VisionOptions.from_config(config)  # + model.connector: tokens per image


def resolve_init_from(config, workdir: str) -> str:
    if not config.init_from:
        raise ValueError("alignment needs config.init_from: the instruction-tuned stage's workdir")
    return workdir_lib.resolve(config.init_from, workdir)  # a gs:// workdir keeps its scheme


def load_llm_params(directory: str, abstract_params):
    """The LLM's params from an omni (`llm/…`) or text-only checkpoint, in their shardings."""
    loaded, missing = checkpointing.load_params(directory, {"llm": abstract_params})
    if not missing:
        return loaded["llm"]
    loaded, missing = checkpointing.load_params(directory, abstract_params)
    if missing:
        raise ValueError(f"init_from {directory}: the LLM parameters {missing[:5]}… are not in the checkpoint")
    return loaded


def load_omni_params(directory: str, abstract_params):
    """The whole omni tree (llm/, vision/, connector/, ...) from an omni checkpoint, in its shardings."""
    loaded, missing = checkpointing.load_params(directory, abstract_params)
    if missing:
        raise ValueError(f"init_from {directory}: {len(missing)} omni parameters ({missing[:5]}…) are not in "
                         "the checkpoint (or have other shapes); it must come from an omni run with the same "
                         "config.model, or set config.model.kind='llm' to align the LLM alone")
    return loaded


def check_batch_size(config, mesh) -> None:
    ways = sharding.batch_axis_size(mesh)
    batch_size = config.section("alignment").batch_size
    if batch_size <= 0 or batch_size % ways:
        raise ValueError(f"config.alignment.batch_size={batch_size} must be a positive "
                         f"multiple of the batch mesh axes' size {ways}")


def build_alignment(config, workdir: str, tokenizer):
    """(mesh, rules, model, LoRA config, sharded AlignmentState, its shardings)."""
    mesh = sharding.make_mesh(config.mesh)
    check_batch_size(config, mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    model = build.build_model(config, tokenizer)
    boxed = train_step.abstract_boxed_params(model, build.example_batch_shapes(config))
    param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.unbox(boxed), param_shardings)
    load = load_omni_params if build.model_kind(config) == "omni" else load_llm_params
    params = load(resolve_init_from(config, workdir), abstract)

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


def batch_shardings(mesh, vision: bool) -> dict[str, NamedSharding]:
    return {k: sharding.batch_sharding(mesh, ndim) for k, ndim in preference.batch_ndims(vision).items()}


def jit_alignment_step(model, lcfg, config, mesh, rules, state_shardings):
    step = train_step.skip_nonfinite(functools.partial(
        dpo.alignment_step, model=model, lora_config=lcfg, beta=config.section("alignment").beta,
        instruction_weight=config.section("alignment").instruction_weight))
    in_shardings = (state_shardings, batch_shardings(mesh, vision=vision_options(config) is not None))
    jitted = jax.jit(step, in_shardings=in_shardings,
                     out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), v)
            for k, v in batch.items()}


def held_out_reward_accuracy(state, model, lcfg, config, tokenizer, mesh, rules) -> dict[str, float]:
    """DPO metrics on the eval split's first batch (with its images for "omni"), no adapter dropout."""
    batch = preference.alignment_batch(tokenizer, seed=config.data.seed, split="eval", step=0,
                                       batch_size=config.section("alignment").batch_size, seq_len=config.data.seq_len,
                                       vision=vision_options(config))
    loss = functools.partial(dpo.alignment_loss, model=model, lora_config=lcfg, beta=config.section("alignment").beta,
                             instruction_weight=config.section("alignment").instruction_weight, deterministic=True)
    with sharding.activate(mesh, rules):
        _, metrics = jax.jit(loss)(state.lora_params, state.params, global_batch(batch, mesh))
    return {f"eval/{k}": float(v) for k, v in jax.device_get(metrics).items()}


class HeldoutRewardAccuracy(loop_lib.Callback):
    """At the end of the run: DPO metrics on the eval split (`held_out_reward_accuracy`)."""

    def __init__(self, model, lcfg, config, tokenizer, mesh, rules):
        self.args = (model, lcfg, config, tokenizer, mesh, rules)

    def finish(self, state) -> dict[str, float]:
        return held_out_reward_accuracy(state, *self.args)


def align(config, workdir: str) -> dict[str, float]:
    """LoRA + DPO steps from the previous stage (resuming from `workdir`); returns the held-out
    reward accuracy (`eval/...`) when the run reached config.train.steps, else {}."""
    config = RunConfig.of(config)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    mesh, rules, model, lcfg, state, state_shardings = build_alignment(config, workdir, tokenizer)

    def batches(first_step: int):  # a function of the step: nothing to checkpoint
        return preference.alignment_batches(tokenizer, seed=config.data.seed, batch_size=config.section("alignment").batch_size,
                                            seq_len=config.data.seq_len, first_step=first_step,
                                            vision=vision_options(config))
    loop = loop_lib.Loop(
        jit_alignment_step(model, lcfg, config, mesh, rules, state_shardings), batches,
        loop_lib.LoopOptions.from_config(config), workdir, to_global=functools.partial(global_batch, mesh=mesh),
        callbacks=[HeldoutRewardAccuracy(model, lcfg, config, tokenizer, mesh, rules)])
    _, metrics = loop.run(state)
    return {k: v for k, v in metrics.items() if k.startswith("eval/")}


def run():
    cli.run(align, "m2omni-align")


if __name__ == "__main__":
    run()

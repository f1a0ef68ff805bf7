"""Building a run from its config, in one place for every command (train, eval, align,
calibration, the benchmarks): validation, the model, its optimizer, example batch shapes,
the data iterator, restoring parameters.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from m2omni_jax import faults, workdir as workdir_lib
from m2omni_jax.config_fields import ConfigError, replace
from m2omni_jax.data import audio_tokens, chat, media, omni_pipeline, pipeline
from m2omni_jax.modalities import modality_id
from m2omni_jax.models import omni as omni_lib
from m2omni_jax.models.llm import LLM, LLMConfig, training_flops_per_token
from m2omni_jax.models.omni import OmniConfig, OmniModel
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import checkpointing, optimizers, train_step

MODEL_KINDS = omni_lib.MODEL_KINDS
model_kind, is_omni = omni_lib.model_kind, omni_lib.is_omni


def validate_config(config, num_devices: int, process_count: int) -> RunConfig:
    """The typed config (`RunConfig.of`), checked against the devices: fails before anything
    compiles with a `ConfigError` naming the field and the value. A short run's
    `opt.warmup_steps` is clipped to its `train.steps` (with a warning)."""
    config = RunConfig.of(config)
    try:
        config = _check_run_lengths(config)
        _check_model_and_data(config, num_devices, process_count)
    except ConfigError:
        raise
    except ValueError as e:  # the checks of the config sections' own classes
        raise ConfigError(str(e)) from e
    if config.opt.lr_law:
        logging.info("opt.peak_lr=%r: peak_lr %.3g, weight_decay %.3g (%s) for the LLM's %.3g parameters",
                     config.opt.lr_law, config.opt.peak_lr, config.opt.weight_decay,
                     config.opt.weight_decay_convention, config.model.llm.num_params(active=True))
    return config


POSITIVE_FIELDS = ("train.steps", "train.log_every", "checkpoint.every", "checkpoint.keep")


def _check_run_lengths(config: RunConfig) -> RunConfig:
    for field in POSITIVE_FIELDS:
        section, key = field.split(".")
        value = getattr(getattr(config, section), key)
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"config.{field}={value!r} must be a positive integer")
    steps, warmup = config.train.steps, config.opt.warmup_steps
    if warmup > steps:
        logging.warning("config.opt.warmup_steps=%d is longer than config.train.steps=%d; warming up over "
                        "all %d steps", warmup, steps, steps)
        config = replace(config, **{"opt.warmup_steps": steps})
    return config


def _check_model_and_data(config, num_devices: int, process_count: int) -> None:
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
    if config.tokenizer.vocab_size + config.tokenizer.audio_codes > config.model.llm.vocab_size:
        needed = f"config.tokenizer.vocab_size={config.tokenizer.vocab_size}"
        if config.tokenizer.audio_codes:
            needed += f" + config.tokenizer.audio_codes={config.tokenizer.audio_codes}"
        raise ValueError(f"{needed} exceeds config.model.llm.vocab_size={config.model.llm.vocab_size}")
    LLMConfig.from_config(config.model.llm)
    if is_omni(config):
        OmniConfig.from_config(config.model, placeholder_ids=())
        media.VisionOptions.from_config(config)
        media.AudioOptions.from_config(config, read_cmvn=False)
        omni_pipeline.modality_weights(config.data)
        omni_pipeline.check_audio_mixture(config)
        omni_pipeline.check_drawing_mixture(config)
        speech = omni_pipeline.modality_weights(config.data).get(audio_tokens.TTS_MODALITY, 0.0)
        if speech > 0 and not config.tokenizer.audio_codes:
            raise ValueError(f"the data mixture gives modality {audio_tokens.TTS_MODALITY!r} weight {speech}, but "
                             "config.tokenizer.audio_codes=0: the LLM has no <audio_k> tokens to speak with")


def build_model(config, tokenizer) -> nn.Module:
    """The LLM, or the omni model with the connector plug-in `model.connector.extras` names.
    The functions here take a `RunConfig` or a ConfigDict (typed on the way in)."""
    config = RunConfig.of(config)
    if is_omni(config):
        omni_config = OmniConfig.from_config(
            config.model, chat.placeholder_ids(tokenizer),
            audio_placeholder_id=tokenizer.special_id("<audioPatch>"),
            end_of_audio_id=tokenizer.special_id("<end_of_audio>"))
        return OmniModel(omni_config, connector_extras=omni_lib.make_connector_extras(config, tokenizer))
    return LLM(LLMConfig.from_config(config.model.llm))


def example_batch_shapes(config) -> dict:
    """Global batch shapes the model is initialised (and the step compiled) with."""
    if is_omni(config):
        return {k: jax.ShapeDtypeStruct(shape, dtype)
                for k, (shape, dtype) in omni_pipeline.example_batch_shapes(config).items()}
    return {"tokens": (config.train.batch_size, config.data.seq_len)}


def batch_keys(config) -> tuple[str, ...]:
    return omni_pipeline.batch_keys(config) if is_omni(config) else pipeline.BATCH_KEYS


def make_train_iterator(config, tokenizer):
    config = RunConfig.of(config)
    pipeline.single_threaded_blas()
    if is_omni(config):
        return omni_pipeline.make_train_iterator(config, tokenizer)
    return pipeline.make_train_iterator(config, tokenizer)


def make_model_and_optimizer(config, tokenizer):
    """(model, optax chain, example batch shapes): the pieces a train state is built from."""
    config = RunConfig.of(config)
    model = build_model(config, tokenizer)
    shapes = example_batch_shapes(config)
    abstract_params = nn.unbox(train_step.abstract_boxed_params(model, shapes))
    return model, optimizers.make_optimizer(config.opt, config.train.steps, abstract_params), shapes


def restore_params(config, workdir: str, model, mesh, rules) -> tuple[dict, int]:
    """(params, step) of the latest checkpoint in `workdir/checkpoints`, sharded by the mesh and
    rules. Only `state/params` is read, so a run trained with any optimizer or balance strategy
    (whose optimizer state differs) restores; a missing checkpoint or parameter is a `RunError`."""
    boxed = train_step.abstract_boxed_params(model, example_batch_shapes(config))
    shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
    directory = os.fspath(workdir_lib.path(workdir, "checkpoints"))
    steps = checkpointing.committed_steps(directory)
    if not steps:
        raise faults.RunError(f"no checkpoint in {directory}; train first (m2omni-train)")
    params, missing = checkpointing.load_params(directory, abstract, step=steps[-1])
    if missing:
        raise faults.RunError(f"the checkpoint in {directory} lacks {len(missing)} parameters of this config's model "
                              f"(or holds them with other shapes): {', '.join(missing[:3])}...; is it the run's config?")
    return params, steps[-1]


def llm_config(model) -> LLMConfig:
    return model.config.llm if isinstance(model, OmniModel) else model.config


def model_flops_per_token(config, model) -> float:
    """Training FLOPs per LLM token slot: the LLM's, plus for omni the vision tower's and
    connector's over every patch slot of a row spread over its tokens. The audio tower's
    are not counted (MFU is a lower bound when audio is on)."""
    flops = training_flops_per_token(llm_config(model), config.data.seq_len)
    if isinstance(model, OmniModel):
        pack = int(config.data.vision.patches_per_row)
        vision = omni_lib.vision_training_flops_per_pack(model.config, pack, model.connector_extras)
        flops += vision / config.data.seq_len
    return flops


def single_modality_config(config: RunConfig, modality: str, *, split: str = "train",
                           batch_size: int | None = None) -> RunConfig:
    """The same data config reading one modality only (and optionally another split/batch)."""
    changes = {"data.split": split}
    modality = "image_gen" if modality == "image_out" else modality  # the image head's loss: drawing requests
    if is_omni(config):
        weights = {name: 0.0 for name in config.data.modality_weights}
        changes.update({"data.mixture": "custom", "data.modality_weights": {**weights, modality: 1.0}})
    elif modality != "text":
        raise ValueError(f"config.balance.modalities has {modality!r} but model.kind='llm' reads text only")
    if batch_size:
        changes["train.batch_size"] = batch_size
    return replace(config, **changes)


def init_from_previous_stage(config, workdir, state, abstract_state, state_shardings):
    """This run's fresh state with the parameters of config.init_from's latest checkpoint."""
    path = workdir_lib.resolve(config.init_from, workdir)  # relative: to this workdir; a gs:// URL as is
    abstract = abstract_state_with(abstract_state, state_shardings).params
    loaded, missing = checkpointing.load_params(path, abstract,
                                                include=tuple(config.init_from_include))
    # A checkpoint from before the <audio_k> tokens: its embedding / LM head grown, old rows kept.
    loaded, missing = audio_tokens.grow_vocab_on_load(path, abstract, loaded, missing,
                                                      include=tuple(config.init_from_include))
    if missing:
        logging.warning("init_from %s: %d tensors not in the checkpoint keep their fresh init (%s...)",
                        path, len(missing), missing[:3])
    return state.replace(params=merge_params(state.params, loaded))


def merge_params(fresh, loaded):
    if not isinstance(fresh, dict):
        return loaded
    return {k: merge_params(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}


def abstract_state_with(abstract_state, shardings):
    """Pairs each abstract leaf with its sharding, for restoring in place."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)

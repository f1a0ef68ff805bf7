"""The typed config: ConfigDict -> frozen RunConfig once, errors naming the field, replace."""
import dataclasses
import importlib

import ml_collections
import pytest

from configs import base, tiny
from m2omni_jax.config_fields import ConfigError, Section, replace
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.run_config import RunConfig

CONFIGS = ("configs.tiny", "configs.bench_32m", "configs.m2omni_9b", "configs.m2omni_72b",
           "configs.experiments.shapes_world_vqa")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_types_with_its_values(name):
    config = importlib.import_module(name).get_config()
    typed = RunConfig.of(config)
    assert isinstance(typed.model.llm, LLMConfig)
    assert typed.train.steps == config.train.steps
    if config.opt.peak_lr == "mm1":  # the 9B / 72B: MM1's law, resolved from the LLM's size at entry
        assert typed.opt.lr_law == "mm1" and 0 < typed.opt.peak_lr < 1e-4
    else:
        assert typed.opt.peak_lr == config.opt.peak_lr and typed.opt.lr_law == ""
    assert typed.model.llm.mrope_sections == tuple(config.model.llm.mrope_sections)
    assert list(typed.data.sources) == list(config.data.sources.keys())
    assert RunConfig.of(typed) is typed  # typing is done once


def test_typed_config_is_frozen_and_replace_makes_a_changed_copy():
    typed = RunConfig.of(tiny.get_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.train.steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.data.sources["text"].num_docs = 3
    changed = replace(typed, **{"train.steps": 3, "data.split": "eval", "data.modality_weights": {"text": 1.0}})
    assert (changed.train.steps, changed.data.split, typed.train.steps) == (3, "eval", tiny.get_config().train.steps)
    assert isinstance(changed.data.modality_weights, Section) and changed.data.modality_weights.text == 1.0
    assert changed.opt is typed.opt  # untouched sections are shared, not copied
    with pytest.raises(TypeError):
        replace(typed, **{"train.stepz": 3})


def test_the_audio_tower_writes_llm_wide_tokens_unless_told_otherwise():
    config = tiny.get_config()
    assert RunConfig.of(config).model.audio.out_width == config.model.llm.width


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["train"].update(stepz=3), r"config.train has unknown fields \['stepz'\]"),
    (lambda c: c["train"].pop("log_every"), r"config.train.log_every is missing"),
    (lambda c: c["opt"].update(no_decay="scale"), r"config.opt.no_decay='scale' must be a tuple"),
    (lambda c: c["train"].update(steps="10"), r"config.train.steps='10' must be of type int"),
    (lambda c: c["model"]["llm"].update(mrope_sections=(8, 8, 8)), r"model.llm.mrope_sections=\(8, 8, 8\) must sum"),
    (lambda c: c["model"].update(kind="vlm"), r"config.model.kind='vlm'; use one of"),
    (lambda c: c.update(stepz=3), r"config.stepz=3 is not a field"),
])
def test_a_bad_config_is_one_error_naming_the_field(mutate, message):
    config = base.get_config().to_dict()  # as a config file could build it
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        RunConfig.of(config)


def test_a_command_or_experiment_section_is_kept_frozen_and_named_when_missing():
    config = tiny.get_config()
    config.alignment = ml_collections.ConfigDict(dict(beta=0.1, batch_size=4))
    typed = RunConfig.of(config)
    assert typed.section("alignment").beta == 0.1 and typed.section("alignment").get("missing", 7) == 7
    with pytest.raises(ConfigError, match=r"config.tower_pretrain is missing"):
        typed.section("tower_pretrain")


def test_peak_lr_mm1_resolves_from_the_llm_size_and_bad_values_are_named():
    config = tiny.get_config()
    config.opt.peak_lr = "mm1"
    typed = RunConfig.of(config)
    n = typed.model.llm.num_params(active=True)
    eta = 2.718281828459045 ** (-0.4214 * __import__("math").log(n) - 0.5535)  # MM1's law, written out
    assert typed.opt.peak_lr == pytest.approx(eta, rel=1e-12)
    assert typed.opt.weight_decay == pytest.approx(0.1 * eta, rel=1e-12)
    assert (typed.opt.weight_decay_convention, typed.opt.lr_law) == ("schedule_only", "mm1")
    assert RunConfig.of(tiny.get_config()).opt.lr_law == ""  # a number stays as given
    for bad in ("MM1", "fast", True):
        config.opt.peak_lr = bad
        with pytest.raises(ConfigError, match=r"config\.opt\.peak_lr=.*number or one of \('mm1',\)"):
            RunConfig.of(config)


@pytest.mark.parametrize("name", ["m2omni_9b", "m2omni_72b"])
def test_the_large_configs_are_omni_models_with_the_text_only_llm_as_a_variant(name):
    from m2omni_jax import build

    module = importlib.import_module(f"configs.{name}")
    omni, llm = module.get_config(), module.get_config("llm")
    assert omni.model.kind == "omni" and omni.model.audio.enabled and omni.model.vision.width == 1280
    assert llm.model.kind == "llm" and not llm.model.audio.enabled
    assert llm.model.llm.to_dict() == omni.model.llm.to_dict()  # the same LLM
    build.validate_config(llm, num_devices=64, process_count=1)
    with pytest.raises(ValueError, match=rf"one of \('omni', 'llm'\), got 'text'.*configs/{name}.py:llm"):
        module.get_config("text")

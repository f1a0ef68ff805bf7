"""The stage configs (configs/stages/) as DESIGN §2 lays them out, for every size."""
import importlib
import os

import pytest

from m2omni_jax import build
from m2omni_jax.data import omni_pipeline

STAGES = ("pt1", "pt2", "pt3", "it1", "it2", "it3", "alignment")
PREVIOUS = {"pt1": "", "pt2": "../pt1", "pt3": "../pt2", "it1": "../pt3", "it2": "../it1", "it3": "../it2",
            "alignment": "../it3"}


def stage(name, size="tiny"):
    return importlib.import_module(f"configs.stages.{name}").get_config(size)


@pytest.mark.parametrize("size", ["tiny", "9b", "72b"])
@pytest.mark.parametrize("name", STAGES)
def test_every_stage_validates_and_chains_to_the_previous_one(name, size):
    config = stage(name, size)
    build.validate_config(config, num_devices=8 if size == "tiny" else 64, process_count=1)
    assert config.init_from == PREVIOUS[name]


def test_mixtures_follow_the_recipe():
    weights = {name: omni_pipeline.modality_weights(stage(name).data) for name in STAGES if name != "alignment"}
    share = {name: {m: v / sum(w.values()) for m, v in w.items()} for name, w in weights.items()}
    assert share["pt1"].get("text", 0) == 0 and share["pt1"]["audio"] > 0  # encoders align on image/audio–text
    assert share["pt2"]["text"] == pytest.approx(0.15)
    assert share["it1"]["text"] == pytest.approx(0.3)
    for name in ("pt3", "it2", "it3"):
        assert share[name]["text"] == pytest.approx(0.25)
    assert share["pt3"]["audio"] > 0 and share["it3"]["audio"] > 0
    assert "spoken_vqa" in stage("it3").data.sources.shapes_world.speech.tasks  # IT3 adds audio QA


def test_balance_strategy_and_frozen_towers_per_stage():
    assert stage("pt1").opt.frozen == (r"^llm/",)
    assert stage("pt3").balance.strategy == "step" and "audio" in stage("pt3").balance.modalities
    assert stage("it3").balance.strategy == "dynamic" and "audio" in stage("it3").balance.modalities


def test_pt3_step_balance_needs_the_calibration_the_pipeline_passes():
    from m2omni_jax import train
    with pytest.raises(ValueError, match=r"config\.balance\.step\.calibration_file"):
        train.step_balance_weights(stage("pt3"))  # no silent fall-back to equal weights
    script = open(os.path.join(os.path.dirname(__file__), "..", "launch", "tiny_pipeline.sh")).read()
    pt3 = script[script.index("m2omni-train --config=configs/stages/pt3.py"):]
    assert "--config.balance.step.calibration_file=" in pt3.split("for stage")[0]


def test_large_stages_use_the_papers_towers():
    config = stage("pt3", "9b")
    assert (config.model.vision.width, config.model.vision.depth) == (1280, 32)
    assert (config.model.audio.width, config.model.audio.depth, config.model.audio.num_audio_tokens) == (512, 50, 256)
    assert config.model.connector.output_scale == 1.0 and config.model.audio.output_scale == 1.0


@pytest.mark.parametrize("extras", ["+speak", "+draw+speak"])
def test_it3_speaks_with_speech_output_records_balanced_as_their_own_modality(extras):
    plain, speaking = stage("it3", "tiny" + extras.replace("+speak", "")), stage("it3", "tiny" + extras)
    build.validate_config(speaking, num_devices=8, process_count=1)
    share = omni_pipeline.modality_weights(speaking.data)
    assert share["speech_gen"] == pytest.approx(0.1 * sum(share.values()))
    assert share["text"] / share["image"] == pytest.approx(plain.data.modality_weights["text"]
                                                           / plain.data.modality_weights["image"])
    assert "speech_gen" in speaking.balance.modalities and ("image_out" in speaking.balance.modalities) == ("draw" in extras)
    tts, answers = speaking.data.sources.tts, speaking.data.sources.spoken_answers
    assert (tts.kind, tts.get("speak", "transcripts"), answers.kind, answers.speak, answers.voice) == (
        "tts", "transcripts", "tts", "answers", "espeak")
    assert tts.tokenizer_workdir == answers.tokenizer_workdir == speaking.speech_tokenizer.workdir
    assert speaking.tokenizer.audio_codes == 1000  # the tokenizer's FSQ levels (8, 5, 5, 5)
    assert speaking.model.llm.vocab_size == plain.model.llm.vocab_size + 1024  # text ids unchanged, codes after
    with pytest.raises(ValueError, match=r"any of \+draw, \+speak, got tiny\+sing"):
        stage("it3", "tiny+sing")

"""Evaluation: cached greedy decoding equals the full forward's argmax; scoring (the shapes world's
registered scorer, the default exact match); eval.json end to end."""
import json
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from m2omni_jax import build, evaluate, faults, scoring
from m2omni_jax.config_fields import replace
from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.data import chat as chat_lib, media as media_lib
from m2omni_jax.experiments.shapes_world import metrics as shapes_metrics
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import speech
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.models.omni import ConnectorConfig, OmniConfig, OmniModel
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step
from m2omni_jax.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, PATCH, END = 4, 6, 5
TINY_LLM = dict(vocab_size=512, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                mrope_sections=(2, 3, 3))
TINY_VISION = dict(width=16, depth=1, num_heads=2, out_width=16)
TINY_AUDIO = dict(width=16, depth=1, num_heads=2, mlp_dim=32)


def synthetic_prompt(seed, num_text):
    """bos-like text, a 56x84 image (2x3 merged tokens), more text."""
    rng = np.random.default_rng(seed)
    patches, grid = ip.patchify(rng.normal(size=(56, 84, 3)).astype(np.float32))
    ids = np.concatenate([[2, 30, IMG], [PATCH] * 6, [END], rng.integers(10, 500, num_text)]).astype(np.int32)
    return {"ids": ids, "positions": chat_lib.mrope_positions(ids, [(1, 2, 3)], (PATCH,)), "patches": patches,
            "hw": ip.hw_positions(grid), "frames": np.ones(len(patches), np.int32)}


def test_greedy_decode_equals_argmax_of_the_full_forward():
    config = OmniConfig(llm=LLMConfig(**TINY_LLM), vision=VisionConfig.tiny(**TINY_VISION),
                        connector=ConnectorConfig(), placeholder_ids=(PATCH,))
    model = OmniModel(config)
    prompt_len, num_new, patches = 20, 6, 32
    batch = chat_lib.batch_prompts([synthetic_prompt(0, 5), synthetic_prompt(1, 9)], prompt_len, patches)
    next_position = batch.pop("next_position")
    inputs = dict(batch, positions=np.moveaxis(batch["positions"], 1, 0))
    params = nn.unbox(jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs))
    # Sharper logits than at init, so argmax ties cannot flip between the two computations.
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 30
    decode = evaluate.make_greedy_decoder(model, prompt_len + num_new)
    generated = decode(params, inputs, next_position, num_new)

    full = dict(inputs)
    full["tokens"] = np.concatenate([batch["tokens"], generated[:, :-1]], 1)
    full["segment_ids"] = np.concatenate([batch["segment_ids"], np.ones((2, num_new - 1), np.int32)], 1)
    new_positions = next_position[:, None] + np.arange(num_new - 1)
    full["positions"] = np.concatenate([inputs["positions"], np.broadcast_to(new_positions, (3, 2, num_new - 1))], 2)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, full)
    np.testing.assert_array_equal(np.argmax(logits[:, prompt_len - 1:], -1), generated)


def test_cut_at_stop():
    assert evaluate.cut_at_stop([5, 6, 9, 7, 9], (9,)) == [5, 6]
    assert evaluate.cut_at_stop([5, 6], (9,)) == [5, 6]


def test_score_per_question_type():
    records = [sw.make_record(0, "eval", i, ("vqa_color", "vqa_shape", "caption", "video_motion"))
               for i in range(8)]
    perfect = shapes_metrics.score([r["answer"] for r in records], records)
    assert perfect["vqa_accuracy"] == {"color": 1.0, "shape": 1.0, "overall": 1.0}
    assert perfect["caption_attribute_accuracy"] == 1.0 and perfect["video_motion_accuracy"] == 1.0
    assert perfect["counts"] == {"vqa": {"color": 2, "shape": 2}, "caption": 2, "video_motion": 2}
    wrong = shapes_metrics.score(["nothing"] * 8, records)
    assert wrong["vqa_accuracy"]["overall"] == 0.0 and wrong["caption_attribute_accuracy"] == 0.0
    assert "vqa_accuracy/color" in shapes_metrics.format_table(perfect)


def test_vqa_accuracy_by_number_of_objects():
    records = [sw.make_record(0, "eval", i, ("vqa_color",)) for i in range(30)]
    n_objects = [len(r["attributes"]["objects"]) for r in records]
    # Right on the one-object scenes only.
    answers = [r["answer"] if n == 1 else "nothing" for r, n in zip(records, n_objects)]
    by_objects = shapes_metrics.score(answers, records)["vqa_accuracy_by_num_objects"]
    assert set(by_objects) == {"color"}
    assert by_objects["color"] == {str(n): float(n == 1) for n in sorted(set(n_objects))}


def test_shape_accuracy_by_selector_splits_colour_from_position_questions():
    records = [sw.make_record(0, "eval", i, ("vqa_shape",)) for i in range(30)]
    by_colour = [" object?" in r["messages"][0]["content"] for r in records]
    assert 0 < sum(by_colour) < len(records)
    answers = [r["answer"] if c else "nothing" for r, c in zip(records, by_colour)]  # right by colour only
    result = shapes_metrics.score(answers, records)
    assert result["shape_accuracy_by_selector"] == {"color": 1.0, "position": 0.0}
    assert re.search(r"shape by selector +color:1.00 position:0.00", shapes_metrics.format_table(result))


def test_score_speech_tasks():
    records = [speech.make_record(0, "eval", i) for i in range(8)]  # 2 of each speech task
    perfect = shapes_metrics.score([r["answer"] for r in records], records)
    assert perfect["asr_wer"] == 0.0
    assert perfect["spoken_vqa_accuracy"]["overall"] == perfect["audio_qa_accuracy"]["overall"] == 1.0
    counts = perfect["counts"]
    assert counts["asr"] == 2 and sum(counts["spoken_vqa"].values()) == 2 and sum(counts["audio_qa"].values()) == 4
    wrong = shapes_metrics.score(["a blue square"] * 8, records)
    assert wrong["asr_wer"] > 0.5 and wrong["spoken_vqa_accuracy"]["overall"] == 0.0
    table = shapes_metrics.format_table(perfect)
    assert "asr_wer" in table and "spoken_vqa_accuracy/overall" in table and "audio_qa_accuracy/overall" in table


def test_the_shapes_world_registers_its_scorer_and_other_kinds_get_exact_match():
    assert scoring.scorer_for("shapes_world").score is shapes_metrics.score
    records = [{"task": "qa", "answer": "A red circle.", "messages": [{"content": "q"}, {"content": "a"}]},
               {"task": "qa", "answer": "two", "messages": [{"content": "q"}, {"content": "a"}]},
               {"task": "asr", "answer": "the red circle", "messages": [{"content": "q"}, {"content": "a"}]}]
    result = scoring.scorer_for("some_other_source").score(["a red circle", "three", "the red square"], records)
    assert result["exact_match"] == {"asr": 0.0, "qa": 0.5, "overall": 1 / 3}
    assert result["wer"] == {"asr": 1 / 3} and result["counts"] == {"asr": 1, "qa": 2}
    assert re.search(r"exact_match/overall +0.333 +3", scoring.format_table(result))


def test_several_source_kinds_are_scored_each_by_its_own_scorer():
    shapes = [sw.make_record(0, "eval", i, ("vqa_color",)) for i in range(2)]
    other = [{"task": "qa", "answer": "yes", "messages": [{"content": "q"}, {"content": "a"}]}]
    sources = [evaluate.HeldOut("shapes_world", shapes, 24), evaluate.HeldOut("other", other, 8)]
    result = evaluate.score_answers(sources, [r["answer"] for r in shapes] + ["no"])
    assert result["shapes_world"]["vqa_accuracy"]["overall"] == 1.0
    assert result["other"]["exact_match"]["overall"] == 0.0
    assert "[other]" in evaluate.format_table(result, ("shapes_world", "other"))


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    sys.path.insert(0, REPO)
    from configs import tiny
    config = tiny.get_config()
    config.model.llm.update(TINY_LLM)
    config.model.vision.update(TINY_VISION)
    config.model.audio.update(TINY_AUDIO)
    config.data.update(dict(dir=str(root / "data"), seq_len=128))
    config.data.sources.text.update(dict(num_docs=200, tokenizer_docs=200))
    config.data.sources.shapes_world.update(dict(num_train=70, num_eval=35))
    config.data.sources.shapes_world.speech.update(dict(num_train=8, num_eval=8))
    config.data.audio.cmvn_samples = 4
    config.data.vision.patches_per_row = 128
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=512))
    config.train.batch_size = 8
    config.eval.update(dict(num_samples=10, num_speech_samples=4, batch_size=8, max_new_tokens=5))
    return config


def test_evaluate_restores_the_checkpoint_and_writes_json(eval_config, tmp_path):
    config = media_lib.with_cmvn(RunConfig.of(eval_config), str(tmp_path))  # what training leaves in its workdir
    tokenizer = get_tokenizer(config)
    mesh = sharding.make_mesh(config.mesh)
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    state, _, _ = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES, shapes, seed=0)
    with checkpointing.Checkpointer(tmp_path / "checkpoints", save_every=10, keep=1, async_save=False) as ckpt:
        ckpt.save(3, state, force=True)

    # The flags of a short run (warm-up longer than its steps: m2omni-train clips it) evaluate too.
    short_run = eval_config.copy_and_resolve_references()
    short_run.train.steps, short_run.opt.warmup_steps = 3, 50
    result = evaluate.evaluate(short_run, str(tmp_path))  # reads the workdir's cmvn.json
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["step"] == result["step"] == 3
    assert set(saved["vqa_accuracy"]) >= {"color", "shape", "overall"}
    for key in ("caption_attribute_accuracy", "video_motion_accuracy", "interleaved_caption_attribute_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    assert 0.0 <= saved["spoken_vqa_accuracy"]["overall"] <= 1.0 and 0.0 <= saved["audio_qa_accuracy"]["overall"] <= 1.0
    assert saved["asr_wer"] >= 0.0
    assert len(saved["examples"]) == 14 and all(isinstance(e["prediction"], str) for e in saved["examples"])
    assert [e["task"] for e in saved["examples"][10:]] == list(speech.TASKS) and saved["examples"][10]["spoken"]
    assert sum(sum(c.values()) if isinstance(c, dict) else c for c in saved["counts"].values()) == 14
    assert "answers" not in saved
    answers = [json.loads(line) for line in (tmp_path / "eval_answers.jsonl").read_text().splitlines()]
    assert [a["prediction"] for a in answers] == [e["prediction"] for e in saved["examples"]]
    assert all(a["attributes"] for a in answers)
    vqa = [a for a in answers if a["task"].startswith("vqa_")]
    assert vqa and all(a["attributes"]["question_type"] and a["attributes"]["objects"] for a in vqa)
    with pytest.raises(FileNotFoundError, match="cmvn"):
        evaluate.evaluate(eval_config, str(tmp_path / "elsewhere"))


def test_eval_batch_is_a_multiple_of_the_batch_axes(eval_config):
    mesh = sharding.make_mesh({"data": -1})
    config = eval_config.copy_and_resolve_references()
    config.eval.batch_size = 5
    assert evaluate._eval_batch_size(config, mesh) == 8


def test_a_run_trained_with_a_balance_strategy_restores_its_parameters(eval_config, tmp_path):
    from m2omni_jax import train

    config = RunConfig.of(eval_config)
    config = replace(config, **{"balance.strategy": "dynamic", "balance.modalities": ("text", "image")})
    tokenizer = get_tokenizer(config)
    mesh = sharding.make_mesh(config.mesh)
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    tx = train.balanced_optimizer(config, tx)  # its optimizer state holds the balance's window and weights
    state, _, _ = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES, shapes, seed=0)
    with checkpointing.Checkpointer(tmp_path / "checkpoints", save_every=10, keep=1, async_save=False) as ckpt:
        ckpt.save(5, state, force=True)
    _, params, step = evaluate.restore_params(config, str(tmp_path), tokenizer, mesh, sharding.LOGICAL_AXIS_RULES)
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, params, state.params)
    with pytest.raises(faults.RunError, match="no checkpoint in .*elsewhere.*train first"):
        evaluate.restore_params(config, str(tmp_path / "elsewhere"), tokenizer, mesh, sharding.LOGICAL_AXIS_RULES)

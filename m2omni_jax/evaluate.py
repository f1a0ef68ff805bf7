"""Held-out evaluation: greedy decoding with the KV cache on the shapes-world eval split.

    m2omni-eval --config=configs/tiny.py --workdir=/tmp/m2omni_tiny

Restores the latest checkpoint of `workdir/checkpoints`, answers the first
`config.eval.num_samples` held-out records (round-robin over the data set's
tasks; interleaved chats are asked their first turn) and, with the audio
tower, the first `config.eval.num_speech_samples` held-out speech records
(features normalised with the run's `workdir/cmvn.json`), and reports
  vqa_accuracy                 normalised exact match per question type
                               (color, shape, count, position, relation, ocr) and overall
  vqa_accuracy_by_num_objects  the same per number of objects in the scene (1-3)
  shape_accuracy_by_selector   shape questions by what names the object: its colour or its position
  caption_attribute_accuracy   fraction of a scene's (colour, shape) pairs the caption names
  video_motion_accuracy        fraction of moving objects with colour, shape and direction right
  asr_wer                      corpus word error rate of the transcripts (jiwer)
  spoken_vqa_accuracy          image + spoken question: exact match per question type and overall
  audio_qa_accuracy            spoken question about a described scene, or text question about
                               a spoken caption (no image): exact match per question type and overall
as `workdir/eval.json` and one printed table.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax import build, cli
from m2omni_jax.data import omni_pipeline, tokenizer as tokenizer_lib
from m2omni_jax.experiments.shapes_world import world as sw, speech
from m2omni_jax.models.omni import audio_enabled, init_cache
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step

VQA_TASKS = ("vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr")
AUDIO_QA_TASKS = ("spoken_scene_qa", "spoken_caption_qa")  # answered from audio and text alone
NUM_EXAMPLES_SAVED = 24
NUM_SPEECH_EXAMPLES_SAVED = 8


# ----------------------------------------------------------------------------- decoding


def make_greedy_decoder(model, max_len: int):
    """Returns decode(params, prompt_inputs, next_position, num_new) -> (B, num_new) token ids.

    prompt_inputs: the model's inputs for the (left-padded) prompts, tokens (B,L),
    positions (3,B,L), segment_ids (B,L) (+ media keys). The prompt is one
    prefill call writing the cache; each new token is one cached call at
    M-RoPE position next_position + i (t = h = w, as text after the prompt).
    """
    def apply(params, cache, inputs):
        return model.apply({"params": params, "cache": cache}, **inputs, decode=True, mutable=["cache"])

    @jax.jit
    def prefill(params, inputs):
        cache = init_cache(model, inputs["tokens"].shape[0], max_len)
        logits, variables = apply(params, cache, inputs)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), variables["cache"]

    @jax.jit
    def step(params, cache, token, position):
        inputs = {"tokens": token[:, None], "positions": jnp.broadcast_to(position[None, :, None], (3,) + token.shape + (1,)),
                  "segment_ids": jnp.ones((token.shape[0], 1), jnp.int32)}
        logits, variables = apply(params, cache, inputs)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), variables["cache"]

    def decode(params, prompt_inputs, next_position, num_new: int, stop_ids: Sequence[int] = ()):
        token, cache = prefill(params, prompt_inputs)
        out = [np.asarray(token)]
        done = np.isin(out[-1], stop_ids)
        for i in range(1, num_new):
            if done.all():
                break
            token, cache = step(params, cache, token, jnp.asarray(next_position + i - 1, jnp.int32))
            out.append(np.asarray(token))
            done |= np.isin(out[-1], stop_ids)
        tokens = np.stack(out, 1)
        return np.pad(tokens, ((0, 0), (0, num_new - tokens.shape[1])))
    return decode


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    stops = [i for i, t in enumerate(ids) if t in stop_ids]
    return ids[:stops[0]] if stops else ids


# ----------------------------------------------------------------------------- metrics


def question_type(record: dict) -> str:
    return "ocr" if record["task"] == "ocr" else record["attributes"]["question_type"]


def accuracy_by_question_type(answered: Sequence[tuple[str, dict]]) -> tuple[dict, dict]:
    """(exact match per question type and overall, count per question type) of (prediction, record)s."""
    typed = [(p, dict(r, task=question_type(r))) for p, r in answered]
    accuracy = sw.vqa_accuracy([p for p, _ in typed], [r for _, r in typed])
    return accuracy, {t: sum(r["task"] == t for _, r in typed) for t in accuracy if t != "overall"}


def shape_question_selector(record: dict) -> str:
    """"position" for "What is the shape at the top left?", "color" for "... the red object?"."""
    obj = record["attributes"]["objects"][record["attributes"]["target"][0]]
    return "position" if sw.position_phrase(obj["position"]) in record["messages"][0]["content"] else "color"


def shape_accuracy_by_selector(answered: Sequence[tuple[str, dict]]) -> dict:
    """{"color" | "position": exact match} of the shape questions among (prediction, record)s:
    finding an object by its colour and by where it is are different skills."""
    groups: dict[str, list[bool]] = {}
    for prediction, record in answered:
        if question_type(record) == "shape" and record["attributes"].get("objects"):
            hit = sw.normalize_answer(prediction) == sw.normalize_answer(record["answer"])
            groups.setdefault(shape_question_selector(record), []).append(hit)
    return {selector: sum(h) / len(h) for selector, h in sorted(groups.items())}


def vqa_accuracy_by_num_objects(answered: Sequence[tuple[str, dict]]) -> dict:
    """{question type: {objects in the scene: exact match}} of (prediction, record)s: with one
    object a colour or shape answer needs no finding, so the gap to 2-3 objects is what
    locating the asked-about object costs."""
    groups: dict[str, dict[str, list[bool]]] = {}
    for prediction, record in answered:
        objects = record["attributes"].get("objects")
        if objects:
            hit = sw.normalize_answer(prediction) == sw.normalize_answer(record["answer"])
            groups.setdefault(question_type(record), {}).setdefault(str(len(objects)), []).append(hit)
    return {qtype: {n: sum(h) / len(h) for n, h in sorted(by_n.items())} for qtype, by_n in sorted(groups.items())}


def score(predictions: Sequence[str], records: Sequence[dict]) -> dict:
    """The metrics of the module docstring, plus per-metric sample counts."""
    by_task: dict[str, list[tuple[str, dict]]] = {}
    for prediction, record in zip(predictions, records, strict=True):
        by_task.setdefault(record["task"], []).append((prediction, record))
    result, counts = {}, {}
    for name, tasks in (("vqa", VQA_TASKS), ("spoken_vqa", ("spoken_vqa",)), ("audio_qa", AUDIO_QA_TASKS)):
        answered = [pair for t in tasks for pair in by_task.get(t, [])]
        if answered:
            result[f"{name}_accuracy"], counts[name] = accuracy_by_question_type(answered)
    by_objects = vqa_accuracy_by_num_objects([pair for t in VQA_TASKS for pair in by_task.get(t, [])])
    if by_objects:
        result["vqa_accuracy_by_num_objects"] = by_objects
    by_selector = shape_accuracy_by_selector(by_task.get("vqa_shape", []))
    if by_selector:
        result["shape_accuracy_by_selector"] = by_selector
    transcripts = by_task.get("asr", [])
    if transcripts:
        result["asr_wer"] = speech.word_error_rate([r["answer"] for _, r in transcripts], [p for p, _ in transcripts])
        counts["asr"] = len(transcripts)
    captions = by_task.get("caption", [])
    if captions:
        result["caption_attribute_accuracy"] = float(np.mean(
            [sw.caption_attribute_accuracy(p, r["attributes"]) for p, r in captions]))
        counts["caption"] = len(captions)
    first_turns = by_task.get("interleaved", [])
    if first_turns:  # the first reply describes the first scene
        result["interleaved_caption_attribute_accuracy"] = float(np.mean(
            [sw.caption_attribute_accuracy(p, r["attributes"]["scenes"][0]) for p, r in first_turns]))
        counts["interleaved"] = len(first_turns)
    videos = by_task.get("video_motion", [])
    if videos:
        result["video_motion_accuracy"] = sw.video_motion_accuracy([p for p, _ in videos], [r for _, r in videos])
        counts["video_motion"] = len(videos)
    result["counts"] = counts
    return result


def format_table(result: dict) -> str:
    rows = [("metric", "value", "n")]
    counts = result.get("counts", {})
    for name in ("vqa", "spoken_vqa", "audio_qa"):
        by_type = counts.get(name, {})
        for qtype, value in result.get(f"{name}_accuracy", {}).items():
            n = sum(by_type.values()) if qtype == "overall" else by_type.get(qtype, "")
            rows.append((f"{name}_accuracy/{qtype}", f"{value:.3f}", str(n)))
    for qtype, by_n in result.get("vqa_accuracy_by_num_objects", {}).items():
        rows.append((f"vqa_accuracy/{qtype} by objects", " ".join(f"{n}:{v:.2f}" for n, v in by_n.items()), ""))
    if "shape_accuracy_by_selector" in result:
        rows.append(("vqa_accuracy/shape by selector",
                     " ".join(f"{k}:{v:.2f}" for k, v in result["shape_accuracy_by_selector"].items()), ""))
    for name, count_key in (("caption_attribute_accuracy", "caption"),
                            ("interleaved_caption_attribute_accuracy", "interleaved"),
                            ("video_motion_accuracy", "video_motion"), ("asr_wer", "asr")):
        if name in result:
            rows.append((name, f"{result[name]:.3f}", str(counts.get(count_key, ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# ----------------------------------------------------------------------------- evaluation


def make_answerer(config, model, tokenizer, records: Sequence[dict], mesh, rules):
    """answer(params) -> greedy answers to the first user turn of each record, batched and
    left-padded. Prompts, batches and the compiled decoder are made once, so a training loop
    can call it every `config.eval.every` steps without recompiling."""
    opts = omni_pipeline.VisionOptions.from_config(config)  # + model.connector: tokens per image
    audio_opts = omni_pipeline.AudioOptions.from_config(config)
    prompts = [omni_pipeline.eval_prompt(r, tokenizer, opts, audio_opts) for r in records]
    prompt_len = int(config.eval.prompt_len) or -(-max(len(p["ids"]) for p in prompts) // 8) * 8
    max_new = int(config.eval.max_new_tokens)
    batch_size = _eval_batch_size(config, mesh)
    decode = make_greedy_decoder(model, prompt_len + max_new)
    stop_ids = (tokenizer.special_id("<|eot_id|>"), tokenizer.eos_id)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one compiled batch shape
        batch = omni_pipeline.batch_prompts(padded, prompt_len, int(config.data.vision.patches_per_row), audio_opts,
                                            max_segments_per_row=opts.max_segments_per_row)
        next_position = batch.pop("next_position")
        inputs = {k: v for k, v in batch.items() if k in _input_keys(config)}
        inputs["positions"] = np.moveaxis(inputs["positions"], 1, 0)
        batches.append((len(chunk), inputs, next_position))

    def answer(params) -> list[str]:
        answers = []
        for size, inputs, next_position in batches:
            with sharding.activate(mesh, rules):
                tokens = decode(params, inputs, next_position, max_new, stop_ids)
            answers += [tokenizer.decode(cut_at_stop(row, stop_ids)) for row in tokens[:size]]
        return answers
    return answer


def generate_answers(config, model, params, tokenizer, records: Sequence[dict], mesh, rules) -> list[str]:
    """Greedy answers to the first user turn of each record (see `make_answerer`)."""
    return make_answerer(config, model, tokenizer, records, mesh, rules)(params)


def _input_keys(config) -> tuple[str, ...]:
    text_keys = ("tokens", "segment_ids", "positions")
    return text_keys + (omni_pipeline.MEDIA_KEYS if config.model.get("kind", "llm") == "omni" else ())


def _eval_batch_size(config, mesh) -> int:
    ways = sharding.batch_axis_size(mesh)
    return -(-int(config.eval.batch_size) // ways) * ways  # a multiple of the batch mesh axes


def make_evaluator(config, model, tokenizer, mesh, rules):
    """evaluate(params) -> the metrics of the module docstring plus example answers, on the
    first `config.eval.num_samples` held-out records (and speech records with audio)."""
    records = list(omni_pipeline.eval_records(config, int(config.eval.num_samples)))
    spoken = list(omni_pipeline.speech_eval_records(config, int(config.eval.num_speech_samples))
                  if audio_enabled(config) else [])
    answer = make_answerer(config, model, tokenizer, records + spoken, mesh, rules)

    def evaluate_fn(params, *, every_answer: bool = False) -> dict:
        answers = answer(params)
        result = score(answers, records + spoken)
        shown = (list(zip(records, answers))[:NUM_EXAMPLES_SAVED]
                 + list(zip(spoken, answers[len(records):]))[:NUM_SPEECH_EXAMPLES_SAVED])
        result["examples"] = [example(r, a) for r, a in shown]
        if every_answer:  # with what each record shows, for reading the failures
            result["answers"] = [{**example(r, a), "attributes": r["attributes"]}
                                 for r, a in zip(records + spoken, answers)]
        return result
    return evaluate_fn


def evaluate_params(config, model, params, tokenizer, mesh, rules, *, every_answer: bool = False) -> dict:
    """Scores `params` on the held-out records; returns the metrics plus example answers
    (and, with `every_answer`, under "answers" every record's answer and attributes)."""
    return make_evaluator(config, model, tokenizer, mesh, rules)(params, every_answer=every_answer)


def scalar_metrics(result: dict, prefix: str = "eval") -> dict[str, float]:
    """The numbers of an evaluation result, flattened: {"eval/vqa_accuracy/color": 0.9, ...}
    (sample counts and examples left out), for the training log."""
    out = {}
    for key, value in result.items():
        if key in ("counts", "examples", "answers", "step"):
            continue
        if isinstance(value, dict):
            out.update(scalar_metrics(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
    return out


def example(record: dict, prediction: str) -> dict:
    """A record's question, answer and the prediction (and what its clips say) for eval.json."""
    out = {"id": record["id"], "task": record["task"], "question": record["messages"][0]["content"],
           "answer": record["messages"][1]["content"], "prediction": prediction}
    if record.get("audio"):
        out["spoken"] = [voice["text"] for voice in record["attributes"]["voices"]]
    return out


def restore_params(config, workdir: str, tokenizer, mesh, rules):
    """(model, params, step) from the latest checkpoint in `workdir/checkpoints`."""
    # The model and optimizer of training, so the restored state tree matches.
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    abstract, shardings = train_step.state_shardings(model, tx, mesh, rules, shapes)
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              save_every=int(config.checkpoint.every),
                                              keep=int(config.checkpoint.keep), async_save=False)
    with checkpointer:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first")
        state, _ = checkpointer.restore(build.abstract_state_with(abstract, shardings), step=step)
    return model, state.params, step


def evaluate(config, workdir: str) -> dict:
    """Restores the latest checkpoint, evaluates, writes `workdir/eval.json` (the metrics and
    a few examples) and `workdir/eval_answers.jsonl` (every record's question, answer,
    prediction and attributes), prints the table."""
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    if audio_enabled(config):  # the CMVN statistics the run was trained with
        config = omni_pipeline.with_cmvn(config, workdir, compute=False)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    model, params, step = restore_params(config, workdir, tokenizer, mesh, rules)
    result = {"step": step, **evaluate_params(config, model, params, tokenizer, mesh, rules, every_answer=True)}
    with open(os.path.join(workdir, "eval_answers.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in result.pop("answers"))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"eval at step {step} ({os.path.join(workdir, 'eval.json')}):\n{format_table(result)}")
    return result


def run():
    cli.run(evaluate, "m2omni-eval", quiet=True)


if __name__ == "__main__":
    run()

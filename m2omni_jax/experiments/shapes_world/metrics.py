"""The shapes world's held-out metrics, registered as the scorer of source kind "shapes_world".

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
  gen_image_accuracy           drawings (the predictions are uint8 images) read by the attribute
                               checker (image_checker.py), per requested object: position, color,
                               shape, size, object (all four); empty_cells, all_correct per image
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from m2omni_jax import scoring
from m2omni_jax.experiments.shapes_world import image_checker, speech, world as sw

KIND = "shapes_world"
VQA_TASKS = ("vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr")
AUDIO_QA_TASKS = ("spoken_scene_qa", "spoken_caption_qa")  # answered from audio and text alone


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
    drawings = by_task.get("gen_image", [])
    if drawings:
        side = int(np.shape(drawings[0][0])[0])
        checker = image_checker.cached_checker(side if side in image_checker.CACHED_TRAINING else 32)
        result["gen_image_accuracy"] = image_checker.gen_image_accuracy(
            checker, [r for _, r in drawings], [np.asarray(p) for p, _ in drawings])
        counts["gen_image"] = len(drawings)
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
    for name, value in result.get("gen_image_accuracy", {}).items():
        if not name.startswith("num_"):
            rows.append((f"gen_image_accuracy/{name}", f"{value:.3f}", str(counts.get("gen_image", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def example(record: dict, prediction: str) -> dict:
    """A record's question, answer and the prediction (and what its clips say) for eval.json."""
    out = scoring.example(record, prediction)
    if record.get("audio"):
        out["spoken"] = [voice["text"] for voice in record["attributes"]["voices"]]
    return out


scoring.register(KIND, score, format_table=format_table, example=example)

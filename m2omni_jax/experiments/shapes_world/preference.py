"""Preference pairs and instruction samples from the shapes world, for the alignment stage.

A pair is one VQA record (vqa_color / vqa_shape / vqa_count / vqa_position):
the prompt is its user turn (`<image>` placeholder + question) with the
record's image, chosen is the ground-truth answer, rejected a wrong answer of
the same type: another colour, shape, count (0-3) or grid position, or for
"is A left or right of B" relation questions the opposite relation.
Instruction (SFT) samples are whole records of `INSTRUCTION_TASKS`, trained
on the assistant turn.

Rows go through the omni assembly (`media.record_media` and
`assemble_chat`, given `VisionOptions`): each `<image>` becomes `<image>` +
N×`<imagePatch>` + `</image>` with M-RoPE positions, and the row carries its
image's patches in a fixed-size pack, so the policy sees the image it is
asked about. Chosen and rejected share the prompt tokens and the patches.
With `vision=None` (a text-only LLM, `model.kind="llm"`) the placeholder
stays one token and the pixels are dropped.

Indexing: pair k is record 2k and instruction sample k record 2k+1 of the
split, so the two never share a scene; the task cycles with k, and the
rejected answer comes from its own RNG stream of (seed, split, k). Every
batch holds B pairs and B instruction samples (1:1, DESIGN §2), one sample
per row, as numpy arrays padded to `seq_len` (T) and `patches_per_row` (N):

  {chosen,rejected,instruction}_tokens              int32 (B,T)
  {chosen,rejected,instruction}_targets             int32 (B,T)   next token (0 after the last)
  {chosen,rejected,instruction}_loss_mask           float32 (B,T) 1 on assistant-answer targets
  {chosen,rejected,instruction}_segment_ids         int32 (B,T)   1 on the sample, 0 = padding
  {chosen,rejected,instruction}_positions           int32 (B,3,T) M-RoPE ids (t = h = w for text)
with vision, also
  {chosen,rejected,instruction}_vision_patches      float32 (B,N,1176) the row's patches, in order
  {chosen,rejected,instruction}_vision_segment_ids  int32 (B,N)   1, 2, ... per image, 0 = padding
  {chosen,rejected,instruction}_vision_hw           int32 (B,2,N) (row, col) of each patch
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from m2omni_jax.data import chat as chat_lib, media as media_lib
from m2omni_jax.experiments.shapes_world import world as shapes_world

VQA_TASKS = ("vqa_color", "vqa_shape", "vqa_count", "vqa_position")
INSTRUCTION_TASKS = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position")
MAX_OBJECTS = 3  # shapes_world.sample_scene draws 1-3 shapes, so counts are 0-3
ANSWERS = {
    "color": tuple(shapes_world.COLORS),
    "shape": tuple(shapes_world.SHAPES),
    "count": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "position": tuple(shapes_world.POSITIONS),
}
OPPOSITE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}
PARTS = ("chosen", "rejected", "instruction")
SAMPLE_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
VISION_KEYS = ("vision_patches", "vision_segment_ids", "vision_hw")  # the omni model's image inputs
_NDIM = {"positions": 3, "vision_patches": 3, "vision_hw": 3}  # every other key: (B, T) / (B, N)
_REJECTED_STREAM = 1  # appended to (seed, split, k): a stream no record uses


def batch_ndims(vision: bool) -> dict[str, int]:
    """{batch key: ndim} of an alignment batch (with or without the media keys)."""
    keys = SAMPLE_KEYS + (VISION_KEYS if vision else ())
    return {f"{part}_{k}": _NDIM.get(k, 2) for part in PARTS for k in keys}


def wrong_answer(record: dict, rng: np.random.Generator) -> str:
    """A wrong answer of the record's question type."""
    question_type, answer = record["attributes"]["question_type"], record["answer"]
    if question_type == "relation":
        return OPPOSITE_RELATION[answer]
    wrong = [a for a in ANSWERS[question_type] if a != answer]
    return wrong[int(rng.integers(len(wrong)))]


def make_pair(seed: int, split: str, k: int) -> dict:
    """Pair k: {"id", "question_type", "prompt" (user messages), "chosen", "rejected",
    "images", "video"} (the record's media, so `media.record_media` reads a pair)."""
    record = shapes_world.make_record(seed, split, 2 * k, (VQA_TASKS[k % len(VQA_TASKS)],))
    rng = np.random.default_rng([seed, shapes_world.SPLITS.index(split), k, _REJECTED_STREAM])
    return {"id": record["id"], "question_type": record["attributes"]["question_type"],
            "prompt": record["messages"][:-1], "chosen": record["answer"],
            "rejected": wrong_answer(record, rng), "images": record["images"], "video": record["video"]}


def make_instruction(seed: int, split: str, k: int, tasks: Sequence[str] = INSTRUCTION_TASKS) -> dict:
    """Instruction sample k: the record's full chat."""
    return shapes_world.make_record(seed, split, 2 * k + 1, (tasks[k % len(tasks)],))


def _token_row(ids: Sequence[int], mask: Sequence[int], positions: np.ndarray, seq_len: int) -> dict:
    """Token arrays (T,) and positions (3,T) of one chat, padded; answers are never truncated."""
    n = len(ids)
    if n > seq_len:
        raise ValueError(f"a chat of {n} tokens does not fit config.data.seq_len={seq_len}; raise it")
    out = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros((3, seq_len), np.int32)}
    out["tokens"][:n] = ids
    out["targets"][:n - 1] = ids[1:]
    out["loss_mask"][:n - 1] = mask[1:]
    out["segment_ids"][:n] = 1
    out["positions"][:, :n] = positions
    return out


def tokenize_chat(messages: Sequence[dict], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Text only: one chat as padded arrays, `<image>` a single token, positions t = h = w."""
    ids, mask = tokenizer.apply_chat_template(messages)
    return _token_row(ids, mask, np.tile(np.arange(len(ids), dtype=np.int32), (3, 1)), seq_len)


def assemble_row(messages: Sequence[dict], media: Sequence[media_lib.MediaItem], tokenizer, seq_len: int,
                 patches_per_row: int) -> dict[str, np.ndarray]:
    """One chat with its media (omni assembly): padded token arrays and the row's patch pack."""
    chat = chat_lib.assemble_chat(tokenizer, messages, media)
    out = _token_row(chat["ids"], chat["mask"], chat["positions"], seq_len)
    n = len(chat["patches"])
    if n > patches_per_row:
        raise ValueError(f"a chat's {n} image patches do not fit "
                         f"config.data.vision.patches_per_row={patches_per_row}; raise it")
    out["vision_patches"] = np.zeros((patches_per_row, media_lib.PATCH_DIM), np.float32)
    out["vision_segment_ids"] = np.zeros(patches_per_row, np.int32)
    out["vision_hw"] = np.zeros((2, patches_per_row), np.int32)
    out["vision_patches"][:n] = chat["patches"]
    out["vision_segment_ids"][:n] = chat["frames"]  # one sample per row: its images are the segments
    out["vision_hw"][:, :n] = chat["hw"]
    return out


def tokenize_pair(pair: dict, tokenizer, seq_len: int,
                  vision: media_lib.VisionOptions | None = None) -> dict[str, np.ndarray]:
    """chosen_* and rejected_* arrays of one pair: same prompt and image, different answer."""
    media = None if vision is None else media_lib.record_media(pair, vision, pair["prompt"])
    out = {}
    for side in ("chosen", "rejected"):
        chat = list(pair["prompt"]) + [{"role": "assistant", "content": pair[side]}]
        row = (tokenize_chat(chat, tokenizer, seq_len) if media is None
               else assemble_row(chat, media, tokenizer, seq_len, vision.patches_per_row))
        out.update({f"{side}_{k}": v for k, v in row.items()})
    return out


def tokenize_instruction(record: dict, tokenizer, seq_len: int,
                         vision: media_lib.VisionOptions | None = None) -> dict[str, np.ndarray]:
    """instruction_* arrays of one record's full chat."""
    if vision is None:
        row = tokenize_chat(record["messages"], tokenizer, seq_len)
    else:
        row = assemble_row(record["messages"], media_lib.record_media(record, vision), tokenizer, seq_len,
                           vision.patches_per_row)
    return {f"instruction_{k}": v for k, v in row.items()}


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def preference_batch(tokenizer, *, seed: int, split: str, start: int, batch_size: int, seq_len: int,
                     vision: media_lib.VisionOptions | None = None) -> dict[str, np.ndarray]:
    """Pairs start .. start+batch_size-1 as chosen_* / rejected_* arrays."""
    return _stack([tokenize_pair(make_pair(seed, split, k), tokenizer, seq_len, vision)
                   for k in range(start, start + batch_size)])


def instruction_batch(tokenizer, *, seed: int, split: str, start: int, batch_size: int, seq_len: int,
                      tasks: Sequence[str] = INSTRUCTION_TASKS,
                      vision: media_lib.VisionOptions | None = None) -> dict[str, np.ndarray]:
    """Instruction samples start .. start+batch_size-1 as instruction_* arrays."""
    return _stack([tokenize_instruction(make_instruction(seed, split, k, tasks), tokenizer, seq_len, vision)
                   for k in range(start, start + batch_size)])


def alignment_batch(tokenizer, *, seed: int, split: str, step: int, batch_size: int, seq_len: int,
                    tasks: Sequence[str] = INSTRUCTION_TASKS,
                    vision: media_lib.VisionOptions | None = None) -> dict[str, np.ndarray]:
    """Batch `step`: batch_size pairs and batch_size instruction samples (1:1); with
    `vision`, every row carries its image patches (see the module docstring)."""
    common = dict(seed=seed, split=split, start=step * batch_size, batch_size=batch_size, seq_len=seq_len,
                  vision=vision)
    return {**preference_batch(tokenizer, **common), **instruction_batch(tokenizer, tasks=tasks, **common)}


def alignment_batches(tokenizer, *, seed: int, batch_size: int, seq_len: int, split: str = "train",
                      first_step: int = 0, vision: media_lib.VisionOptions | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Batches first_step, first_step+1, ... (resume by passing the step to start from)."""
    step = first_step
    while True:
        yield alignment_batch(tokenizer, seed=seed, split=split, step=step, batch_size=batch_size,
                              seq_len=seq_len, vision=vision)
        step += 1

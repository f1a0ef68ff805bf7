"""Preference pairs and instruction samples from the shapes world, for the alignment stage.

A pair is one VQA record (vqa_color / vqa_shape / vqa_count / vqa_position):
the prompt is its user turn (`<image>` placeholder + question), chosen is the
ground-truth answer, rejected a wrong answer of the same type: another colour,
shape, count (0-3) or grid position, or for "is A left or right of B"
relation questions the opposite relation. Instruction (SFT) samples are
whole records of `INSTRUCTION_TASKS`, trained on the assistant turn.

TEXT ONLY for now: the `<image>` placeholder stays a single token and the
record's pixels are dropped. The omni pipeline will later expand it into
image patches and feed the vision tower.

Indexing: pair k is record 2k and instruction sample k record 2k+1 of the
split, so the two never share a scene; the task cycles with k, and the
rejected answer comes from its own RNG stream of (seed, split, k). Every
batch holds B pairs and B instruction samples (1:1, DESIGN §2), as numpy
arrays padded to `seq_len`:

  {chosen,rejected,instruction}_tokens       int32 (B,T)
  {chosen,rejected,instruction}_targets      int32 (B,T)   next token (0 after the last)
  {chosen,rejected,instruction}_loss_mask    float32 (B,T) 1 on assistant-answer targets
  {chosen,rejected,instruction}_segment_ids  int32 (B,T)   1 on the sample, 0 = padding
  {chosen,rejected,instruction}_positions    int32 (B,3,T) M-RoPE ids, t = h = w for text
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from m2omni_jax.data import shapes_world

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
SAMPLE_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_REJECTED_STREAM = 1  # appended to (seed, split, k): a stream no record uses


def wrong_answer(record: dict, rng: np.random.Generator) -> str:
    """A wrong answer of the record's question type."""
    question_type, answer = record["attributes"]["question_type"], record["answer"]
    if question_type == "relation":
        return OPPOSITE_RELATION[answer]
    wrong = [a for a in ANSWERS[question_type] if a != answer]
    return wrong[int(rng.integers(len(wrong)))]


def make_pair(seed: int, split: str, k: int) -> dict:
    """Pair k: {"id", "question_type", "prompt" (user messages), "chosen", "rejected"}."""
    record = shapes_world.make_record(seed, split, 2 * k, (VQA_TASKS[k % len(VQA_TASKS)],))
    rng = np.random.default_rng([seed, shapes_world.SPLITS.index(split), k, _REJECTED_STREAM])
    return {"id": record["id"], "question_type": record["attributes"]["question_type"],
            "prompt": record["messages"][:-1], "chosen": record["answer"],
            "rejected": wrong_answer(record, rng)}


def make_instruction(seed: int, split: str, k: int, tasks: Sequence[str] = INSTRUCTION_TASKS) -> dict:
    """Instruction sample k: the record's full chat."""
    return shapes_world.make_record(seed, split, 2 * k + 1, (tasks[k % len(tasks)],))


def tokenize_chat(messages: Sequence[dict], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """One chat as padded arrays (T,) and positions (3,T); answers are never truncated."""
    ids, mask = tokenizer.apply_chat_template(messages)
    n = len(ids)
    if n > seq_len:
        raise ValueError(f"a chat of {n} tokens does not fit seq_len={seq_len}; raise seq_len")
    out = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32)}
    out["tokens"][:n] = ids
    out["targets"][:n - 1] = ids[1:]
    out["loss_mask"][:n - 1] = mask[1:]
    out["segment_ids"][:n] = 1
    out["positions"] = np.tile(np.where(out["segment_ids"] > 0, np.arange(seq_len), 0), (3, 1)).astype(np.int32)
    return out


def tokenize_pair(pair: dict, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """chosen_* and rejected_* arrays of one pair (same prompt, different answer)."""
    out = {}
    for side in ("chosen", "rejected"):
        chat = list(pair["prompt"]) + [{"role": "assistant", "content": pair[side]}]
        out.update({f"{side}_{k}": v for k, v in tokenize_chat(chat, tokenizer, seq_len).items()})
    return out


def _stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def preference_batch(tokenizer, *, seed: int, split: str, start: int, batch_size: int,
                     seq_len: int) -> dict[str, np.ndarray]:
    """Pairs start .. start+batch_size-1 as chosen_* / rejected_* arrays."""
    return _stack([tokenize_pair(make_pair(seed, split, k), tokenizer, seq_len)
                   for k in range(start, start + batch_size)])


def instruction_batch(tokenizer, *, seed: int, split: str, start: int, batch_size: int, seq_len: int,
                      tasks: Sequence[str] = INSTRUCTION_TASKS) -> dict[str, np.ndarray]:
    """Instruction samples start .. start+batch_size-1 as instruction_* arrays."""
    rows = [tokenize_chat(make_instruction(seed, split, k, tasks)["messages"], tokenizer, seq_len)
            for k in range(start, start + batch_size)]
    return {f"instruction_{k}": v for k, v in _stack(rows).items()}


def alignment_batch(tokenizer, *, seed: int, split: str, step: int, batch_size: int, seq_len: int,
                    tasks: Sequence[str] = INSTRUCTION_TASKS) -> dict[str, np.ndarray]:
    """Batch `step`: batch_size pairs and batch_size instruction samples (1:1)."""
    common = dict(seed=seed, split=split, start=step * batch_size, batch_size=batch_size, seq_len=seq_len)
    return {**preference_batch(tokenizer, **common), **instruction_batch(tokenizer, tasks=tasks, **common)}


def alignment_batches(tokenizer, *, seed: int, batch_size: int, seq_len: int, split: str = "train",
                      first_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches first_step, first_step+1, ... (resume by passing the step to start from)."""
    step = first_step
    while True:
        yield alignment_batch(tokenizer, seed=seed, split=split, step=step, batch_size=batch_size,
                              seq_len=seq_len)
        step += 1

"""Scoring held-out answers: one scorer per source kind, exact match (and WER) by default.

A source kind (the built-in shapes world, a data set of yours) registers how its answers
are scored, printed and shown:

    scoring.register("shapes_world", score, format_table=format_table, example=example)

`m2omni-eval` and the periodic evaluation of training score each kind's held-out records
with its scorer (`scorer_for`); a kind with none gets `exact_match`: normalised exact match
per task and overall, and corpus WER for transcription tasks (`WER_TASKS`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

Score = Callable[[Sequence[str], Sequence[dict]], dict]  # (predictions, records) -> metrics + "counts"
WER_TASKS = ("asr", "transcription")  # tasks whose answers are transcripts: scored by WER too


def example(record: dict, prediction: str) -> dict:
    """A record's question, reference answer and the prediction, as eval.json shows it."""
    return {"id": record.get("id"), "task": record.get("task"), "question": record["messages"][0]["content"],
            "answer": record["messages"][1]["content"], "prediction": prediction}


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total word edits / total reference words) of normalised texts."""
    import jiwer  # lazily: only transcription tasks need it

    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not kept:
        raise ValueError("word_error_rate: every reference transcript is empty")
    return float(jiwer.wer([r for r, _ in kept], [h for _, h in kept]))


def exact_match(predictions: Sequence[str], records: Sequence[dict]) -> dict:
    """{"exact_match": {task: share, "overall": share}, "wer": {task: WER} for WER_TASKS,
    "counts": {task: n}}; the reference is record["answer"] (else the second turn)."""
    by_task: dict[str, list[tuple[str, str]]] = {}
    for prediction, record in zip(predictions, records, strict=True):
        reference = record.get("answer", record["messages"][1]["content"])
        by_task.setdefault(record.get("task", "all"), []).append((prediction, reference))
    hits = {task: [normalize(p) == normalize(r) for p, r in pairs] for task, pairs in sorted(by_task.items())}
    result = {"exact_match": {task: sum(h) / len(h) for task, h in hits.items()}}
    every = [h for task_hits in hits.values() for h in task_hits]
    if every:
        result["exact_match"]["overall"] = sum(every) / len(every)
    wer = {task: word_error_rate([r for _, r in pairs], [p for p, _ in pairs])
           for task, pairs in sorted(by_task.items()) if task in WER_TASKS}
    if wer:
        result["wer"] = wer
    result["counts"] = {task: len(pairs) for task, pairs in sorted(by_task.items())}
    return result


def format_table(result: dict) -> str:
    """One row per number (nested names joined by "/"), with its task's count where known."""
    counts = result.get("counts", {})
    rows = [("metric", "value", "n")]

    def add(prefix: str, value, task: str):
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner, key)
        elif isinstance(value, (int, float)):
            n = sum(counts.values()) if task == "overall" else counts.get(task, "")
            rows.append((prefix, f"{value:.3f}", str(n)))
    for name, value in result.items():
        if name not in ("counts", "examples", "answers", "step"):
            add(name, value, name)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


@dataclasses.dataclass(frozen=True)
class Scorer:
    score: Score = exact_match
    format_table: Callable[[dict], str] = format_table
    example: Callable[[dict, str], dict] = example  # (record, prediction) -> what eval.json shows


_SCORERS: dict[str, Scorer] = {}


def register(kind: str, score: Score, *, format_table: Callable[[dict], str] | None = None,
             example: Callable[[dict, str], dict] | None = None) -> Scorer:
    """Makes `score` (and its table and example layout) the scorer of source kind `kind`."""
    defaults = Scorer()
    scorer = Scorer(score, format_table or defaults.format_table, example or defaults.example)
    _SCORERS[kind] = scorer
    return scorer


def scorer_for(kind: str) -> Scorer:
    """The registered scorer of `kind`, else exact match (+ WER) with the default table."""
    return _SCORERS.get(kind, Scorer())


def registered_kinds() -> tuple[str, ...]:
    return tuple(_SCORERS)

"""Held-out evaluation: greedy decoding with the KV cache on the held-out records.

    m2omni-eval --config=configs/tiny.py --workdir=/tmp/m2omni_tiny

Restores the latest checkpoint of `workdir/checkpoints`, answers the first
`config.eval.num_samples` held-out records (interleaved chats are asked their first
turn) and, with the audio tower, the first `config.eval.num_speech_samples` held-out
speech records (features normalised with the run's `workdir/cmvn.json`), in batches of
left-padded prompts through one compiled decoder (`make_answerer`). Each source kind's
answers are scored by the scorer it registered (`scoring.register`; the shapes world's
is experiments/shapes_world/metrics.py: accuracy per question type, caption attributes,
ASR WER, ...), any other kind's by exact match (+ WER for transcripts). Writes
`workdir/eval.json` (metrics and examples), `workdir/eval_answers.jsonl` (every answer)
and prints one table.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from m2omni_jax import build, cli, scoring
from m2omni_jax.data import chat, media, tokenizer as tokenizer_lib
from m2omni_jax.data import sources as data_sources
from m2omni_jax.inference import decoding
from m2omni_jax.models.omni import audio_enabled
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step
from m2omni_jax.run_config import RunConfig

NUM_EXAMPLES_SAVED = 24
NUM_SPEECH_EXAMPLES_SAVED = 8


# ----------------------------------------------------------------------------- decoding


# The shared KV-cache decoder (m2omni_jax/inference/decoding.py), greedy here.
make_greedy_decoder = decoding.make_greedy_decoder
cut_at_stop = decoding.cut_at_stop


# ----------------------------------------------------------------------------- evaluation


def make_answerer(config, model, tokenizer, records: Sequence[dict], mesh, rules):
    """answer(params) -> greedy answers to the first user turn of each record, batched and
    left-padded. Prompts, batches and the compiled decoder are made once, so a training loop
    can call it every `config.eval.every` steps without recompiling."""
    opts = media.VisionOptions.from_config(config)  # + model.connector: tokens per image
    audio_opts = media.AudioOptions.from_config(config)
    prompts = [chat.eval_prompt(r, tokenizer, opts, audio_opts) for r in records]
    prompt_len = int(config.eval.prompt_len) or -(-max(len(p["ids"]) for p in prompts) // 8) * 8
    max_new = int(config.eval.max_new_tokens)
    batch_size = _eval_batch_size(config, mesh)
    decode = make_greedy_decoder(model, prompt_len + max_new)
    stop_ids = (tokenizer.special_id("<|eot_id|>"), tokenizer.eos_id)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one compiled batch shape
        inputs, next_position = decoding.prompt_inputs(config, padded, prompt_len, opts, audio_opts)
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


def _eval_batch_size(config, mesh) -> int:
    ways = sharding.batch_axis_size(mesh)
    return -(-int(config.eval.batch_size) // ways) * ways  # a multiple of the batch mesh axes


@dataclasses.dataclass
class HeldOut:
    """Held-out records of one source: its kind names the scorer (`scoring.scorer_for`)."""
    kind: str
    records: list[dict]
    num_examples: int  # how many of its answers eval.json shows


def heldout_records(config) -> list[HeldOut]:
    """The held-out records to answer, per configured source with non-text parts: the first
    `eval.num_samples` of its image / video / interleaved parts and, with the audio tower,
    the first `eval.num_speech_samples` of its audio parts (round-robin over the parts)."""
    out = []
    for name, source in data_sources.make_sources(config).items():
        by_modality = {}
        for part_name, part in source.parts("eval").items():
            by_modality.setdefault(part.modality, []).append(part_name)
        visual = [n for m in ("image", "video", "interleaved") for n in by_modality.get(m, ())]
        spoken = by_modality.get("audio", []) if audio_enabled(config) else []
        for names, num, shown in ((visual, config.eval.num_samples, NUM_EXAMPLES_SAVED),
                                  (spoken, config.eval.num_speech_samples, NUM_SPEECH_EXAMPLES_SAVED)):
            if names:
                records = data_sources.eval_records(config, int(num), names=names)
                out.append(HeldOut(source.cfg.kind, records, shown))
    return out


def score_answers(sources: Sequence[HeldOut], answers: Sequence[str]) -> dict:
    """Each kind's answers by its scorer: the scorer's result itself with one kind (the
    shapes world's eval.json layout), {kind: result} with several."""
    by_kind: dict[str, tuple[list[str], list[dict]]] = {}
    start = 0
    for source in sources:
        predictions, records = by_kind.setdefault(source.kind, ([], []))
        predictions += answers[start:start + len(source.records)]
        records += source.records
        start += len(source.records)
    results = {kind: scoring.scorer_for(kind).score(p, r) for kind, (p, r) in by_kind.items()}
    return next(iter(results.values())) if len(results) == 1 else results


def format_table(result: dict, kinds: Sequence[str]) -> str:
    """The printed table: each kind's scorer's (under a heading when there are several)."""
    if len(kinds) == 1:
        return scoring.scorer_for(kinds[0]).format_table(result)
    return "\n\n".join(f"[{kind}]\n{scoring.scorer_for(kind).format_table(result[kind])}" for kind in kinds)


def make_evaluator(config, model, tokenizer, mesh, rules):
    """evaluate(params) -> each source kind's metrics plus example answers, on the first
    `config.eval.num_samples` held-out records (and speech records with audio)."""
    sources = heldout_records(config)
    records = [r for source in sources for r in source.records]
    answer = make_answerer(config, model, tokenizer, records, mesh, rules)

    def evaluate_fn(params, *, every_answer: bool = False) -> dict:
        answers = answer(params)
        result = score_answers(sources, answers)
        result["examples"], start = [], 0
        for source in sources:
            example = scoring.scorer_for(source.kind).example
            shown = list(zip(source.records, answers[start:start + len(source.records)]))[:source.num_examples]
            result["examples"] += [example(r, a) for r, a in shown]
            start += len(source.records)
        if every_answer:  # with what each record shows, for reading the failures
            result["answers"] = [{**scoring.scorer_for(source.kind).example(r, a), "attributes": r.get("attributes")}
                                 for source, r, a in zip(_source_per_record(sources), records, answers)]
        return result
    evaluate_fn.kinds = tuple(dict.fromkeys(source.kind for source in sources))
    return evaluate_fn


def _source_per_record(sources: Sequence[HeldOut]) -> list[HeldOut]:
    return [source for source in sources for _ in source.records]


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
    config = RunConfig.of(config)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    if audio_enabled(config):  # the CMVN statistics the run was trained with
        config = media.with_cmvn(config, workdir, compute=False)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    model, params, step = restore_params(config, workdir, tokenizer, mesh, rules)
    evaluate_fn = make_evaluator(config, model, tokenizer, mesh, rules)
    result = {"step": step, **evaluate_fn(params, every_answer=True)}
    with open(os.path.join(workdir, "eval_answers.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in result.pop("answers"))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"eval at step {step} ({os.path.join(workdir, 'eval.json')}):\n{format_table(result, evaluate_fn.kinds)}")
    return result


def run():
    cli.run(evaluate, "m2omni-eval", quiet=True)


if __name__ == "__main__":
    run()

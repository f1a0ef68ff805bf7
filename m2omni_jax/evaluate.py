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

With the image head (`model.image_head.enabled`), the first `eval.num_samples` held-out
drawing requests (parts of modality "image_gen") are drawn too (`make_drawer`): on the
caption route the model writes its description greedily, on the query route its span is
the N `<gen_imagePatch>` queries; the span's hidden states condition the image head
(`inference.generator.ImageDrawer`). Their source kind's scorer scores the images (its
`score(images, records)`: the shapes world's is `gen_image_accuracy`, colour / shape /
position / size per requested object, read by its attribute checker); `m2omni-eval` writes
`workdir/gen_image_grid.png` (each drawing beside the reference).

With `<audio_k>` tokens (`tokenizer.audio_codes`) and held-out speech output records (modality
"speech_gen": TTS and spoken answers), the first `eval.num_tts_samples` are spoken
(`make_speaker`) and scored per task (`score_speech`): WER of the speech tokenizer's own ASR
on the generated speech, the share heard exactly, MCD against the reference recording;
eval.json's "tts" and "spoken_answer", `eval.tts_wavs` pairs in `workdir/tts_wavs/`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from m2omni_jax import build, cli, scoring, workdir as workdir_lib
from m2omni_jax.data import audio_tokens, chat, media, records as records_lib, tokenizer as tokenizer_lib
from m2omni_jax.data import sources as data_sources
from m2omni_jax.data import omni_pipeline
from m2omni_jax.inference import decoding, generator, speech_output
from m2omni_jax.models import vocoder
from m2omni_jax.models.omni import audio_enabled, image_output_enabled
from m2omni_jax.parallel import sharding

NUM_EXAMPLES_SAVED = 24
NUM_SPEECH_EXAMPLES_SAVED = 8
NUM_DRAWINGS_SHOWN = 32  # in gen_image_grid.png
DRAWING_SEED = 0  # the sampler's noise: every evaluation draws from the same


# ----------------------------------------------------------------------------- decoding


# The shared KV-cache decoder (m2omni_jax/inference/decoding.py), greedy here.
make_greedy_decoder = decoding.make_greedy_decoder
cut_at_stop = decoding.cut_at_stop


# ----------------------------------------------------------------------------- evaluation


def make_answerer(config, model, tokenizer, records: Sequence[dict], mesh, rules, *,
                  stop_ids: Sequence[int] | None = None, keep_ids: bool = False):
    """answer(params) -> greedy answers to the first user turn of each record, batched and
    left-padded. Prompts, batches and the compiled decoder are made once, so a training loop
    can call it every `config.eval.every` steps without recompiling."""
    opts = media.VisionOptions.from_config(config)  # + model.connector: tokens per image
    audio_opts = media.AudioOptions.from_config(config)
    prompts = [chat.eval_prompt(r, tokenizer, opts, audio_opts) for r in records]
    prompt_len = int(config.eval.prompt_len) or -(-max([len(p["ids"]) for p in prompts] or [1]) // 8) * 8
    max_new = int(config.eval.max_new_tokens)
    batch_size = _eval_batch_size(config, mesh)
    if not records:
        return lambda params: []
    decode = make_greedy_decoder(model, prompt_len + max_new)
    stop_ids = tuple(stop_ids or (tokenizer.special_id("<|eot_id|>"), tokenizer.eos_id))
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
            answers += ([list(row) for row in tokens[:size]] if keep_ids else
                        [tokenizer.decode(cut_at_stop(row, stop_ids)) for row in tokens[:size]])
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
            if names and int(num) > 0:
                records = data_sources.eval_records(config, int(num), names=names)
                out.append(HeldOut(source.cfg.kind, records, shown))
    return out


def drawing_records(config) -> list[HeldOut]:
    """The first `eval.num_samples` held-out drawing requests of each source kind (parts of
    modality "image_gen", a `reverse=True` source's included); none without the image head."""
    if not image_output_enabled(config):
        return []
    by_kind: dict[str, list] = {}
    for part in omni_pipeline.split_parts(config, "eval").values():
        if part.modality == "image_gen":
            by_kind.setdefault(config.data.sources[part.source].kind, []).append(part)
    out = []
    for kind, parts in by_kind.items():
        good = (r for r in data_sources.round_robin([p.records() for p in parts]) if not records_lib.is_bad(r))
        out.append(HeldOut(kind, list(itertools.islice(good, int(config.eval.num_samples))), 0))
    return out


def make_drawer(config, model, tokenizer, records: Sequence[dict], mesh, rules):
    """draw(params) -> (replies, uint8 images (n, H, W, 3)) for drawing requests: the reply
    up to its first `</gen_image>` (caption route: greedy, at most `eval.max_new_tokens`; query
    route: `<gen_image>` + the queries), then `generator.ImageDrawer`."""
    head = model.config.image_head
    opts, audio_opts = media.VisionOptions.from_config(config), media.AudioOptions.from_config(config)
    prompts = [chat.eval_prompt(r, tokenizer, opts, audio_opts) for r in records]
    open_, close = (tokenizer.special_id(t) for t in records_lib.GEN_IMAGE_SPAN)
    drawer = generator.ImageDrawer(model, tokenizer, config, mesh, rules, int(config.eval.batch_size))
    if head.route == "query":
        queries = [open_] + [tokenizer.special_id("<gen_imagePatch>")] * head.num_queries + [close]
        reply_for = lambda params: [queries] * len(prompts)  # noqa: E731
    else:
        caption_records = [dict(r, messages=r["messages"][:1]) for r in records]
        eot = tokenizer.special_id("<|eot_id|>")
        answer = make_answerer(config, model, tokenizer, caption_records, mesh, rules, stop_ids=(close, eot),
                               keep_ids=True)

        def reply_for(params):
            return [decoding.cut_at_stop(ids, (eot, tokenizer.eos_id))[:_through(ids, close)]
                    for ids in answer(params)]

    def draw(params):
        replies = reply_for(params)
        sequences = [generator.continue_prompt(p, ids) for p, ids in zip(prompts, replies)]
        return [tokenizer.decode(ids) for ids in replies], drawer(params, sequences, DRAWING_SEED)
    return draw


def _through(ids: Sequence[int], token: int) -> int:
    """The length of `ids` up to and including the first `token` (all of them without one)."""
    ids = list(ids)
    return ids.index(token) + 1 if token in ids else len(ids)


SPEECH_OUTPUT_TASKS = {"tts": "TTS", audio_tokens.SPOKEN_ANSWER_TASK: "spoken answers"}  # eval.json keys


def tts_records(config, tokenizer) -> list[dict]:
    """The first `eval.num_tts_samples` held-out TTS records (parts of modality "speech_gen"),
    round-robin over those parts; none without `<audio_k>` tokens."""
    if getattr(tokenizer, "audio", None) is None or int(config.eval.num_tts_samples) <= 0:
        return []
    parts = [p for p in omni_pipeline.split_parts(config, "eval").values() if p.modality == audio_tokens.TTS_MODALITY]
    good = (r for r in data_sources.round_robin([p.records() for p in parts]) if not records_lib.is_bad(r))
    return list(itertools.islice(good, int(config.eval.num_tts_samples)))


def make_speaker(config, model, tokenizer, records: Sequence[dict], mesh, rules):
    """speak(params) -> (replies, waveforms): each TTS prompt answered greedily up to its
    `</gen_audio>` (at most `eval.max_new_tokens`), its `<audio_k>` codes spoken by the run's
    speech decoder and Griffin-Lim (`speech_output.SpeechOutputHead`, one shot: the streamed
    chunks join to the same within its tolerance)."""
    close, eot = tokenizer.special_id(audio_tokens.GEN_AUDIO_SPAN[1]), tokenizer.special_id("<|eot_id|>")
    prompts = [dict(r, messages=r["messages"][:-1]) for r in records]  # every turn before the spoken reply
    answer = make_answerer(config, model, tokenizer, prompts, mesh, rules, stop_ids=(close, eot), keep_ids=True)
    head = speech_output.load_speech_head(config, tokenizer.audio, max_tokens=int(config.eval.max_new_tokens))

    def speak(params):
        replies = [decoding.cut_at_stop(ids, (close, eot, tokenizer.eos_id)) for ids in answer(params)]
        return [tokenizer.decode(ids) for ids in replies], [head(ids) for ids in replies]
    return speak


def score_speech(config, records: Sequence[dict], replies: Sequence[str], waves) -> dict:
    """TTS intelligibility and fidelity: the speech tokenizer's own ASR (its CTC head) on the
    generated speech, word / character error rates against the text asked for; mel-cepstral
    distortion against each record's reference recording (`reference_audio`: eSpeak's, for the
    built-in speech) over the replies that hold speech."""
    import jiwer

    from m2omni_jax.models.speech_tokenizer import normalize_text

    run = config.section("speech_tokenizer")
    asr = audio_tokens.SpeechCodes.of_run(run["workdir"], run["tokenizer"]["model"])
    normalize = lambda text: normalize_text(text, asr.model.config.alphabet)  # noqa: E731
    texts, heard = [normalize(r["answer"]) for r in records], [normalize(h) for h in asr.transcribe(waves)]
    references = [records_lib.decode_pcm16(r["reference_audio"]) for r in records]
    spoken = [i for i, w in enumerate(waves) if len(w) > vocoder.MEL.n_fft]
    mcd = [vocoder.mel_cepstral_distortion(references[i], waves[i]) for i in spoken]
    return {"wer": float(jiwer.wer(texts, heard)), "cer": float(jiwer.cer(texts, heard)),
            "heard_exactly": float(np.mean([t == h for t, h in zip(texts, heard)])) if texts else float("nan"),
            "mcd_db": float(np.mean(mcd)) if mcd else float("nan"), "spoken_fraction": len(spoken) / max(len(waves), 1),
            "reference_wer": float(jiwer.wer(texts, [normalize(h) for h in asr.transcribe(references)])),
            "num_sentences": len(records),
            "examples": [{"text": t, "heard": h, "codes": len(r.split("<audio_")) - 1}
                         for t, h, r in list(zip(texts, heard, replies))[:NUM_EXAMPLES_SAVED]]}


def write_speech(workdir: str, records: Sequence[dict], waves, count: int) -> None:
    """`workdir/tts_wavs/NN_generated.wav` and `NN_reference.wav` for the first `count` sentences."""
    folder = os.fspath(workdir_lib.path(workdir, "tts_wavs"))
    for i, (record, wave) in enumerate(list(zip(records, waves))[:count]):
        vocoder.write_wav(os.path.join(folder, f"{i:02d}_generated.wav"), wave)
        vocoder.write_wav(os.path.join(folder, f"{i:02d}_reference.wav"),
                          records_lib.decode_pcm16(record["reference_audio"]))


def score_drawings(sources: Sequence[HeldOut], images) -> dict:
    """Each kind's drawings by its scorer's `score(images, records)` (a kind without a scorer
    of its own gets none: exact match does not read images)."""
    out, start = {}, 0
    for source in sources:
        chunk = list(images[start:start + len(source.records)])
        start += len(source.records)
        if source.kind in scoring.registered_kinds():
            out[source.kind] = scoring.scorer_for(source.kind).score(chunk, source.records)
    return out


def drawing_grid(records: Sequence[dict], images, size: int, columns: int = 8) -> np.ndarray:
    """uint8 grid: each drawing with the reference image (`gen_images[0]`, resized) below it."""
    cells = []
    for record, image in zip(records, images):
        reference = chat.drawing_target(record["gen_images"][0], size) if record.get("gen_images") else None
        reference = np.zeros_like(image) if reference is None else generator.to_uint8(reference)
        cells.append(np.concatenate([image, reference], axis=0))
    cells += [np.full_like(cells[0], 255)] * (-len(cells) % columns)
    rows = [np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells[i:i + columns]], 1)
            for i in range(0, len(cells), columns)]
    return np.concatenate(rows, 0)


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
    return merge_kinds(results)


def merge_kinds(results: dict) -> dict:
    """{kind: result} -> the result itself when there is one kind."""
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
    drawing_sources = drawing_records(config)
    drawing_requests = [r for source in drawing_sources for r in source.records]
    draw = make_drawer(config, model, tokenizer, drawing_requests, mesh, rules) if drawing_requests else None

    def evaluate_fn(params, *, every_answer: bool = False, with_drawings: bool = False) -> dict:
        answers = answer(params)
        result = score_answers(sources, answers) if sources else {}
        if draw is not None:
            replies, images = draw(params)
            scored = score_drawings(drawing_sources, images)
            drawn = merge_kinds(scored) if scored else {}
            counts = {**result.get("counts", {}), **drawn.pop("counts", {})}
            result = {**result, **drawn, "counts": counts}
            if with_drawings:
                result["drawings"] = {"records": drawing_requests, "replies": replies, "images": images}
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
    evaluate_fn.kinds = tuple(dict.fromkeys(source.kind for source in list(sources) + drawing_sources))
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
    """(model, params, step) from the latest checkpoint in `workdir/checkpoints` (its parameters
    only: a run trained with a balance strategy has other optimizer state)."""
    model = build.build_model(config, tokenizer)
    params, step = build.restore_params(config, workdir, model, mesh, rules)
    return model, params, step


def evaluate(config, workdir: str) -> dict:
    """Restores the latest checkpoint, evaluates, writes `workdir/eval.json` (the metrics and
    a few examples) and `workdir/eval_answers.jsonl` (every record's question, answer,
    prediction and attributes), prints the table."""
    # Checked as m2omni-train checks it, so the same flags restore the same state (a short run's
    # warm-up clipped to its steps, say).
    config = build.validate_config(config, jax.device_count(), jax.process_count())
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    if audio_enabled(config):  # the CMVN statistics the run was trained with
        config = media.with_cmvn(config, workdir, compute=False)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    model, params, step = restore_params(config, workdir, tokenizer, mesh, rules)
    evaluate_fn = make_evaluator(config, model, tokenizer, mesh, rules)
    result = {"step": step, **evaluate_fn(params, every_answer=True, with_drawings=True)}
    drawings = result.pop("drawings", None)
    if drawings is not None:
        write_drawings(workdir, drawings, model.config.image_head.image_size)
        result["examples"] += [{"id": r.get("id"), "task": r.get("task"), "question": r["messages"][0]["content"],
                                "reply": reply} for r, reply in list(zip(drawings["records"], drawings["replies"]))[:8]]
    spoken = tts_records(config, tokenizer)
    if spoken:
        replies, waves = make_speaker(config, model, tokenizer, spoken, mesh, rules)(params)
        for task in sorted({r.get("task", "tts") for r in spoken}):  # "tts", "spoken_answer"
            chosen = [i for i, r in enumerate(spoken) if r.get("task", "tts") == task]
            result[task] = score_speech(config, [spoken[i] for i in chosen], [replies[i] for i in chosen],
                                        [waves[i] for i in chosen])
        write_speech(workdir, spoken, waves, int(config.eval.tts_wavs))
    answers = "".join(json.dumps(line) + "\n" for line in result.pop("answers"))
    workdir_lib.path(workdir, "eval_answers.jsonl").write_text(answers)  # epath: a gs:// workdir too
    workdir_lib.path(workdir, "eval.json").write_text(json.dumps(result, indent=1))
    print(f"eval at step {step} ({workdir_lib.path(workdir, 'eval.json')}):\n{format_table(result, evaluate_fn.kinds)}")
    for task, title in SPEECH_OUTPUT_TASKS.items():
        if task in result:
            tts = result[task]
            print(f"{title} ({tts['num_sentences']} held-out): own-ASR WER {tts['wer']:.1%} (eSpeak reference "
                  f"{tts['reference_wer']:.1%}), heard exactly {tts['heard_exactly']:.1%}, MCD {tts['mcd_db']:.2f} dB; "
                  f"WAVs in {workdir_lib.path(workdir, 'tts_wavs')}")
    return result


def write_drawings(workdir: str, drawings: dict, size: int) -> None:
    """`workdir/gen_image_grid.png`: the first drawings, each above its reference image."""
    shown = drawings["records"][:NUM_DRAWINGS_SHOWN], drawings["images"][:NUM_DRAWINGS_SHOWN]
    grid = drawing_grid(*shown, size=size)
    with workdir_lib.path(workdir, "gen_image_grid.png").open("wb") as f:
        Image.fromarray(np.kron(grid, np.ones((2, 2, 1), np.uint8))).save(f, format="PNG")


def run():
    cli.run(evaluate, "m2omni-eval", quiet=True)


if __name__ == "__main__":
    run()

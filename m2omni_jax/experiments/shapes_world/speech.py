"""Speech in the shapes world: offline TTS (eSpeak NG) and audio task records.

`synthesize` speaks English text with libespeak-ng (shipped by the
`espeakng-loader` wheel, loaded with ctypes) and returns float32 PCM at
16 kHz. The same text and `Voice` give the same PCM, whatever was spoken
before (see `VARIANTS`). One engine per process, behind a lock.

Task records follow `shapes_world.make_record`'s schema with modality
"audio" and these additions:
  audio: [float32 (N,) PCM at `SAMPLE_RATE`, values on the int16 grid
    (k/32768), so encoding to int16 is lossless]; one `<audio>` placeholder
    per clip in `messages`, in order
  sample_rate: 16000
  attributes["voices"]: per clip, its text and voice (language, variant,
    rate, pitch)
Encoded records (`encode_record`) hold each clip as little-endian int16 PCM
bytes inside the same msgpack map as the PNG images.

Tasks: `asr` (spoken caption -> its text), `spoken_vqa` (image + spoken
question), `spoken_scene_qa` (scene described in text + spoken question),
`spoken_caption_qa` (spoken caption + text question).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import threading
from typing import Callable, Sequence

import numpy as np

from m2omni_jax.data import audio as audio_frontend, records as records_lib
from m2omni_jax.experiments.shapes_world import world as sw

SAMPLE_RATE = audio_frontend.SAMPLE_RATE
AUDIO_TOKEN = "<audio>"
# English accents x voice variants. Only variants that set `flutter 0` and
# `roughness 0` are used: eSpeak keeps the flutter phase and the roughness
# cycle in static state across calls, so other variants make the PCM depend
# on what was spoken before. en-gb-scotland drifts the same way.
LANGUAGES = ("en-us", "en", "en-gb-x-rp", "en-us-nyc", "en-029")
VARIANTS = ("shelby", "Storm", "Denis", "Hugo", "miguel", "Diogo", "Henrique", "michel")
RATE_RANGE = (140, 200)  # words per minute
PITCH_RANGE = (30, 70)  # eSpeak's 0-100 scale; 50 is the voice's default

# espeak-ng/speak_lib.h constants
_AUDIO_OUTPUT_RETRIEVAL = 1
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class Voice:
    language: str = "en-us"
    variant: str = "shelby"
    rate: int = 175
    pitch: int = 50

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}"


def sample_voice(rng: np.random.Generator) -> Voice:
    return Voice(language=_pick(rng, LANGUAGES), variant=_pick(rng, VARIANTS),
                 rate=int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
                 pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))


class _ESpeak:
    """The process-wide libespeak-ng: initialised once, one synthesis at a time."""

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_RETRIEVAL, 0, data_path,
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data at {data_path!r}")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._receive)  # referenced: C keeps only the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _receive(self, wav, num_samples, events):
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = keep going

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        """int16 PCM at `self.sample_rate`; callers hold `_LOCK`."""
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"eSpeak has no voice {voice.name!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, voice.rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        self.lib.espeak_ng_SetRandSeed(0)  # breath and fricative noise
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        self.lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.int16)


_LOCK = threading.Lock()
_ENGINE: _ESpeak | None = None


def _engine() -> _ESpeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _ESpeak()
    return _ENGINE


def synthesize(text: str, voice: Voice = Voice()) -> np.ndarray:
    """English text -> float32 PCM at 16 kHz, rounded to the int16 grid."""
    with _LOCK:
        engine = _engine()
        pcm = engine.synthesize(text, voice)
        native_rate = engine.sample_rate
    waveform = audio_frontend.resample(pcm.astype(np.float32) / 32768.0, native_rate, SAMPLE_RATE)
    return decode_audio(encode_audio(waveform))


ANSWER_VOICE = Voice()  # the model's own voice for spoken answers: one voice, as a TTS system's default


def speak_answer(text: str, key: str = "") -> np.ndarray:
    """The registered voice "espeak" (`audio_tokens.register_voice`): `text` in `ANSWER_VOICE`,
    whatever the record (`key`)."""
    return synthesize(text, ANSWER_VOICE)


# ---------------------------------------------------------------- encoding


encode_audio = records_lib.pcm16_bytes  # float PCM in [-1, 1] -> little-endian int16 bytes
decode_audio = records_lib.decode_pcm16


def encode_record(record: dict) -> bytes:
    """`shapes_world.encode_record` with each audio clip as int16 PCM bytes."""
    return sw.encode_record({**record, "audio": [encode_audio(a) for a in record["audio"]]})


def decode_record(data: bytes, *, decode_media: bool = True) -> dict:
    record = sw.decode_record(data, decode_media=decode_media)
    if decode_media:
        record["audio"] = [decode_audio(b) for b in record.get("audio", [])]
    return record


# ------------------------------------------------------------------ tasks

_TRANSCRIBE_PROMPTS = ("Transcribe the audio.", "What is said in this recording?",
                       "Write down what you hear.")
_VQA_TASKS = ("vqa_color", "vqa_shape", "vqa_count", "vqa_position")


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _spoken(rng: np.random.Generator, text: str) -> tuple[np.ndarray, dict]:
    voice = sample_voice(rng)
    return synthesize(text, voice), {"text": text, **dataclasses.asdict(voice)}


def _image_question(rng: np.random.Generator) -> dict:
    """A shapes-world VQA sample, its question text split from the `<image>` tag."""
    body = sw.TASK_BUILDERS[_pick(rng, _VQA_TASKS)](rng)
    body["question"] = body["messages"][0]["content"].removeprefix("<image>\n")
    return body


def _asr(rng: np.random.Generator) -> dict:
    scene = sw.sample_scene(rng)
    text = sw.caption_text(scene)
    clip, voice = _spoken(rng, text)
    return {"messages": _chat(f"{AUDIO_TOKEN}\n{_pick(rng, _TRANSCRIBE_PROMPTS)}", text),
            "audio": [clip], "answer": text, "attributes": {**scene, "voices": [voice]}}


def _spoken_vqa(rng: np.random.Generator) -> dict:
    body = _image_question(rng)
    clip, voice = _spoken(rng, body["question"])
    return {"messages": _chat(f"<image>\n{AUDIO_TOKEN}", body["answer"]), "images": body["images"],
            "audio": [clip], "answer": body["answer"], "attributes": {**body["attributes"], "voices": [voice]}}


def _spoken_scene_qa(rng: np.random.Generator) -> dict:
    body = _image_question(rng)
    description = f"Imagine a picture with {sw.caption_text(body['attributes'])}."
    clip, voice = _spoken(rng, body["question"])
    return {"messages": _chat(f"{description}\n{AUDIO_TOKEN}", body["answer"]), "audio": [clip],
            "answer": body["answer"], "attributes": {**body["attributes"], "voices": [voice]}}


def _spoken_caption_qa(rng: np.random.Generator) -> dict:
    body = _image_question(rng)
    clip, voice = _spoken(rng, sw.caption_text(body["attributes"]))
    return {"messages": _chat(f"{AUDIO_TOKEN}\n{body['question']}", body["answer"]), "audio": [clip],
            "answer": body["answer"], "attributes": {**body["attributes"], "voices": [voice]}}


TASK_BUILDERS: dict[str, Callable[[np.random.Generator], dict]] = {
    "asr": _asr, "spoken_vqa": _spoken_vqa, "spoken_scene_qa": _spoken_scene_qa,
    "spoken_caption_qa": _spoken_caption_qa,
}
TASKS = tuple(TASK_BUILDERS)
_SPEECH_STREAM = 4  # keeps speech samples' RNG apart from the image tasks' of the same index


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sw.SPLITS.index(split), index, _SPEECH_STREAM])


def make_record(seed: int, split: str, index: int, tasks: Sequence[str] = TASKS) -> dict:
    """Sample `index` of `split`; tasks are assigned round-robin over `tasks`."""
    task = tasks[index % len(tasks)]
    body = TASK_BUILDERS[task](sample_rng(seed, split, index))
    return {"id": f"{split}/{index}", "split": split, "index": index, "modality": "audio",
            "task": task, "messages": body["messages"], "images": body.get("images", []), "video": [],
            "audio": body["audio"], "sample_rate": SAMPLE_RATE, "answer": body["answer"],
            "attributes": body["attributes"]}


# ------------------------------------------------------------------ files


def speech_split_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f"shapes_speech-{split}.array_record")


def write_speech_split(out_dir: str, split: str, seed: int, num: int, progress: bool = True,
                       tasks: Sequence[str] = TASKS) -> str:
    """Writes `num` encoded records of `split` to one ArrayRecord file; returns its path."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    path = speech_split_path(out_dir, split)
    tmp = f"{path}.tmp{os.getpid()}"  # concurrent writers of one variant do not collide
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: random access
    try:
        for index in tqdm(range(num), desc=os.path.basename(path), disable=not progress):
            writer.write(encode_record(make_record(seed, split, index, tasks)))
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def open_speech_split(out_dir: str, split: str):
    """Random-access source of encoded records (bytes); decode with `decode_record`."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    return ArrayRecordDataSource(speech_split_path(out_dir, split))


def write_speech_world(out_dir: str, *, seed: int, num_train: int, num_eval: int,
                       tasks: Sequence[str] = TASKS, progress: bool = True) -> dict:
    """Writes the `train`/`eval` speech splits; a no-op when `out_dir` already holds the
    same version, seed, counts and tasks (its manifest.json). Returns the manifest."""
    from m2omni_jax.experiments.shapes_world import writer as wsw

    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"config.data.sources.shapes_world.speech.tasks={tuple(tasks)}: unknown {sorted(unknown)}; known tasks "
                         f"are {TASKS}")
    manifest = {"name": "shapes_speech", "version": sw.DATA_VERSION, "seed": seed, "tasks": list(tasks),
                "num_examples": {"train": num_train, "eval": num_eval},
                "encoding": "msgpack map, audio as int16 PCM: m2omni_jax.experiments.shapes_world.speech.decode_record"}
    paths = [speech_split_path(out_dir, split) for split in sw.SPLITS]
    if wsw._read_manifest(out_dir) == manifest and all(map(os.path.exists, paths)):
        return manifest
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, wsw.MANIFEST)
    if os.path.exists(manifest_path):  # an interrupted rewrite must not look complete
        os.remove(manifest_path)
    for split in sw.SPLITS:
        write_speech_split(out_dir, split, seed, manifest["num_examples"][split], progress, tasks)
    with open(f"{manifest_path}.tmp{os.getpid()}", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(f"{manifest_path}.tmp{os.getpid()}", manifest_path)
    return manifest


def compute_cmvn(out_dir: str, num_records: int, split: str = "train") -> dict:
    """CMVN statistics (`audio.compute_cmvn_stats`) over every clip of the first
    `num_records` records of a written split, features without CMVN."""
    source = open_speech_split(out_dir, split)
    feats = []
    for index in range(min(num_records, len(source))):
        record = decode_record(source[index])
        feats += [audio_frontend.audio_features(clip, record["sample_rate"]) for clip in record["audio"]]
    return audio_frontend.compute_cmvn_stats(feats)


# ---------------------------------------------------------------- metrics


def _normalize_transcript(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total word edits / total reference words) after lower-casing
    and dropping punctuation."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    refs = [_normalize_transcript(r) for r in references]
    if not all(refs):
        raise ValueError("word_error_rate: a reference is empty after normalisation")
    return float(jiwer.wer(refs, [_normalize_transcript(h) for h in hypotheses]))

"""Speech codes in the LLM's vocabulary: `<audio_k>` tokens, the vocabulary resize, and
waveform -> codes with a trained speech tokenizer (models/speech_tokenizer.py).

The N codes take the ids right after a text tokenizer's vocabulary (base .. base + N - 1),
so no text id moves and a SentencePiece or Hugging Face tokenizer works unchanged;
`AudioTokenizer` wraps one so that text holding `<audio_k>` encodes to those ids and
decodes back. A checkpoint trained without them gets N rows appended to its embedding and
LM head (`extend_llm_vocab`; the old rows are kept bit for bit).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from m2omni_jax.data import audio as audio_frontend, mirror, records as records_lib, sources

AUDIO_TOKEN = "<audio_{}>"
_AUDIO_TOKEN_RE = re.compile(r"<audio_(\d+)>")


@dataclasses.dataclass(frozen=True)
class AudioTokens:
    """Codes 0 .. num_codes-1 <-> ids base_vocab_size .. base_vocab_size + num_codes - 1."""
    base_vocab_size: int
    num_codes: int

    def __post_init__(self):
        if self.base_vocab_size < 1 or self.num_codes < 1:
            raise ValueError(f"AudioTokens needs base_vocab_size >= 1 and num_codes >= 1, got "
                             f"{self.base_vocab_size} and {self.num_codes}")

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.num_codes

    def names(self) -> list[str]:
        """`<audio_0>` … in id order: the special tokens these ids stand for."""
        return [AUDIO_TOKEN.format(k) for k in range(self.num_codes)]

    def is_audio(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.base_vocab_size) & (ids < self.vocab_size)

    def codes_to_ids(self, codes) -> np.ndarray:
        codes = np.asarray(codes, np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"speech codes must lie in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}]")
        return (codes + self.base_vocab_size).astype(np.int32)

    def ids_to_codes(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if not np.all(self.is_audio(ids)):
            raise ValueError(f"ids {ids[~self.is_audio(ids)][:5].tolist()} are not <audio_k> ids "
                             f"([{self.base_vocab_size}, {self.vocab_size}))")
        return (ids - self.base_vocab_size).astype(np.int32)


class AudioTokenizer:
    """A text tokenizer (`encode`, `decode`, `vocab_size`, ...) plus N `<audio_k>` tokens.

    `encode` turns each `<audio_k>` in the text into its id and the text between into the
    base tokenizer's ids; `decode` renders audio ids as `<audio_k>`. The base's other ids,
    special tokens and chat template are unchanged (`base`).
    """

    def __init__(self, base, num_codes: int):
        self.base = base
        self.audio = AudioTokens(int(base.vocab_size), int(num_codes))

    @property
    def vocab_size(self) -> int:
        return self.audio.vocab_size

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def bos_id(self) -> int:
        return self.base.bos_id

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    def special_id(self, name: str) -> int:
        match = _AUDIO_TOKEN_RE.fullmatch(name)
        return int(self.audio.codes_to_ids([int(match.group(1))])[0]) if match else self.base.special_id(name)

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in _AUDIO_TOKEN_RE.finditer(text):
            if match.start() > start:
                ids += self.base.encode(text[start:match.start()])
            ids += self.audio.codes_to_ids([int(match.group(1))]).tolist()
            start = match.end()
        return ids + (self.base.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: Sequence[int]) -> str:
        ids, pieces, run = [int(i) for i in ids], [], []
        for i in ids + [None]:
            if i is not None and not self.audio.is_audio(i):
                run.append(i)
                continue
            if run:
                pieces.append(self.base.decode(run))
                run = []
            if i is not None:
                pieces.append(AUDIO_TOKEN.format(i - self.audio.base_vocab_size))
        return "".join(pieces)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False
                            ) -> tuple[list[int], list[int]]:
        """The base tokenizer's chat template with contents encoded by `encode` (so `<audio_k>`
        in a turn are single ids): each turn's header, trained flag and end-of-turn ids come
        from the base template applied to that turn with empty content."""
        ids, mask = [self.bos_id], [0]
        for message in messages:
            frame, trained = self.base.apply_chat_template([{"role": message["role"], "content": ""}])
            header, end = frame[1:-1], frame[-1]  # [bos] header [] [end of turn]
            body = self.encode(message["content"]) + [end]
            ids += header + body
            mask += [0] * len(header) + [trained[-1]] * len(body)
        if add_generation_prompt:
            ids += self.base.apply_chat_template([], add_generation_prompt=True)[0][1:]
            mask = mask + [0] * (len(ids) - len(mask))
        return ids, mask


TTS_PROMPT = "Read this aloud."


TTS_MODALITY = "speech_gen"  # the modality tag of TTS tokens (modalities.py): own loss and weight
GEN_AUDIO_SPAN = ("<gen_audio>", "</gen_audio>")


SPOKEN_ANSWER_TASK = "spoken_answer"
SPOKEN_ANSWER_INSTRUCTION = "Answer in speech."  # the system turn of spoken-answer records


def gen_audio_text(codes) -> str:
    """`<gen_audio><audio_c0><audio_c1>…</gen_audio>`: speech codes as an assistant's reply."""
    spoken = "".join(AUDIO_TOKEN.format(int(c)) for c in np.asarray(codes).reshape(-1))
    open_, close = GEN_AUDIO_SPAN
    return f"{open_}{spoken}{close}"


def tts_record(text: str, codes, prompt: str = TTS_PROMPT) -> dict:
    """A text-to-speech record in the omni format: the user gives the text, the assistant answers
    `<gen_audio><audio_c0><audio_c1>…</gen_audio>` (`codes` of the spoken text)."""
    return {"messages": [{"role": "user", "content": f"{prompt}\n{text}"},
                         {"role": "assistant", "content": gen_audio_text(codes)}],
            "modality": TTS_MODALITY, "task": "tts", "answer": text}


def spoken_answer_record(record: dict, codes, answer_audio: np.ndarray,
                         instruction: str = SPOKEN_ANSWER_INSTRUCTION) -> dict:
    """`record` (any question: text, image, speech, ...) answered in speech: its last turn, the
    assistant's text, becomes `<gen_audio>` + `codes` (of `answer_audio`, that text spoken) +
    `</gen_audio>`; the question's own media stay. A system turn says `instruction` (added to
    the record's own system turn), so that the same question without it is answered in text.
    `answer` is the text that was spoken, `answer_task` the record's task, `reference_audio`
    the spoken answer (int16 PCM)."""
    messages = [dict(m) for m in record.get("messages", [])]
    if not messages or messages[-1].get("role") != "assistant" or not str(messages[-1].get("content", "")).strip():
        raise ValueError(f"record {record.get('id')!r}: no assistant reply to speak (its last turn must be the "
                         "assistant's text)")
    text = messages[-1]["content"]
    messages[-1]["content"] = gen_audio_text(codes)
    if instruction:
        if messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n{instruction}".strip()
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    return {**record, "messages": messages, "modality": TTS_MODALITY, "task": SPOKEN_ANSWER_TASK,
            "answer_task": record.get("task", ""), "answer": text,
            "reference_audio": records_lib.pcm16_bytes(answer_audio)}


# ----------------------------------------------------------------------------- voices

# A voice speaks an answer's text: voice(text, key) -> float32 PCM at audio.SAMPLE_RATE (`key`: the
# record's id, for voices that vary by record). Registered by name (the built-in data set's "espeak").
Voice = Callable[[str, str], np.ndarray]
_VOICES: dict[str, Voice] = {}


def register_voice(name: str, voice: Voice) -> None:
    _VOICES[name] = voice


def get_voice(name: str, field: str) -> Voice:
    if name not in _VOICES:
        raise ValueError(f"{field}={name!r} is not a registered voice (registered: {sorted(_VOICES)}; "
                         "audio_tokens.register_voice adds one)")
    return _VOICES[name]


def extend_llm_vocab(params: dict, llm_config, vocab_size: int):
    """(params, config) with the embedding and LM head grown to `vocab_size` rows (the old
    rows unchanged, each new one the mean of the old ones: `interop.hf.resize_vocab`);
    `params` is an LLM tree (`embedding`, `lm_head`) or an omni tree holding one at `llm`."""
    from m2omni_jax.interop import hf  # numpy-only there; imported here to keep data's imports light

    if "llm" in params:
        llm, llm_config = hf.resize_vocab(jax.device_get(params["llm"]), llm_config, vocab_size)
        return dict(params, llm=llm), llm_config
    return hf.resize_vocab(jax.device_get(params), llm_config, vocab_size)


def vocab_axis(key: tuple) -> int | None:
    """The vocabulary axis of an LLM parameter (its path as a tuple), None if it has none."""
    if key[-1:] == ("embedding",):
        return 0
    return 1 if key[-2:] == ("lm_head", "kernel") else None


def grow_vocab_on_load(directory: str, abstract_params: dict, loaded: dict, missing: list[str],
                       include: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """`checkpointing.load_params`'s (loaded, missing) with the LLM's embedding / LM head that
    the checkpoint holds with fewer vocabulary rows (a run before `<audio_k>` tokens were added)
    read at their saved size and grown to this model's: the old rows exactly, each new one the
    mean of the old (as `extend_llm_vocab`). Other missing leaves stay missing; `include`
    (path regexes, as `load_params`'s) limits which are grown."""
    from flax import traverse_util
    from m2omni_jax.training import checkpointing

    saved = traverse_util.flatten_dict(saved_param_shapes(directory))
    fresh = traverse_util.flatten_dict(abstract_params)
    grow = {}
    for key, leaf in fresh.items():
        axis = vocab_axis(key)
        name = "/".join(key)
        if axis is None or name not in missing or (include and not any(re.search(p, name) for p in include)):
            continue
        old = saved.get(key)
        if old is None or len(old) != len(leaf.shape) or old[axis] >= leaf.shape[axis] or any(
                o != n for d, (o, n) in enumerate(zip(old, leaf.shape)) if d != axis):
            continue
        grow[key] = (leaf, old, axis)
    if not grow:
        return loaded, missing
    small = {k: jax.ShapeDtypeStruct(old, leaf.dtype, sharding=_replicated(leaf.sharding))
             for k, (leaf, old, _) in grow.items()}
    old_values, _ = checkpointing.load_params(directory, traverse_util.unflatten_dict(small))
    old_flat = traverse_util.flatten_dict(old_values)
    out = traverse_util.flatten_dict(loaded)
    for key, (leaf, old, axis) in grow.items():
        w = np.asarray(jax.device_get(old_flat[key]))
        mean = np.repeat(w.mean(axis, keepdims=True), leaf.shape[axis] - old[axis], axis)
        out[key] = jax.device_put(np.concatenate([w, mean.astype(w.dtype)], axis), leaf.sharding)
    grown = {"/".join(k) for k in grow}
    return traverse_util.unflatten_dict(out), [m for m in missing if m not in grown]


def saved_param_shapes(directory: str) -> dict:
    """{param path: shape} of the latest committed checkpoint under `directory` (a run's
    workdir or its checkpoints folder), from orbax's metadata (nothing is read)."""
    import orbax.checkpoint as ocp
    from m2omni_jax.training import checkpointing

    root = checkpointing._as_path(directory)
    root = root / "checkpoints" if (root / "checkpoints").exists() else root
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and checkpointing._is_committed(p))
    if not steps:
        raise FileNotFoundError(f"init_from: no complete checkpoint in {root}")
    tree = ocp.PyTreeCheckpointer().metadata(root / str(steps[-1]) / "state").item_metadata.tree
    return jax.tree.map(lambda m: tuple(m.shape), tree.get("params", {}),
                        is_leaf=lambda m: hasattr(m, "shape"))


def _replicated(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


CODE_BUCKET_TOKENS = 50  # clips are padded to a multiple of this many tokens' frames (2 s at 25 tokens/s)


class SpeechCodes:
    """Waveforms -> speech codes with a trained tokenizer: fbank, CMVN, the SAN-M encoder, FSQ."""

    def __init__(self, config, params, cmvn: dict):
        from m2omni_jax.models.speech_tokenizer import SpeechTokenizer

        self.model, self.params, self.cmvn = SpeechTokenizer(config), params, cmvn
        self._encode = jax.jit(lambda p, f, n: self.model.apply(p, f, n, method=SpeechTokenizer.encode))
        self._logits = None

    @classmethod
    def restore(cls, checkpoint_dir: str, config, cmvn_path: str) -> "SpeechCodes":
        """From a `m2omni-train-speech-tokenizer` run's `<workdir>/tokenizer/checkpoints`."""
        from m2omni_jax.models.speech_tokenizer import SpeechTokenizer
        from m2omni_jax.training import checkpointing

        shapes = nn.unbox(jax.eval_shape(SpeechTokenizer(config).init, jax.random.key(0),
                                         np.zeros((1, config.frames_per_token, config.num_mel_bins), np.float32),
                                         np.ones((1,), np.int32))["params"])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
        params, missing = checkpointing.load_params(checkpoint_dir, abstract)
        if missing:
            raise ValueError(f"{checkpoint_dir}: the tokenizer parameters {missing[:5]} are not in the checkpoint")
        return cls(config, {"params": params}, audio_frontend.load_cmvn(cmvn_path))

    @classmethod
    def of_run(cls, workdir: str, model_fields) -> "SpeechCodes":
        """The tokenizer of an m2omni-train-speech-tokenizer run (`workdir`: its checkpoints and
        cmvn.json; `model_fields`: its `speech_tokenizer.tokenizer.model`)."""
        from m2omni_jax.models.speech_tokenizer import SpeechTokenizerConfig

        from m2omni_jax import workdir as workdir_lib

        workdir = workdir_lib.local_or_url(workdir)  # local or a bucket
        return cls.restore(os.fspath(workdir_lib.path(workdir, "tokenizer", "checkpoints")),
                           SpeechTokenizerConfig.from_config(model_fields),
                           os.fspath(workdir_lib.path(workdir, "cmvn.json")))

    def __call__(self, waveform: np.ndarray, sample_rate: int = audio_frontend.SAMPLE_RATE) -> np.ndarray:
        """One clip -> its codes (tokens,) int32, `config.tokens_per_second` of them a second."""
        fbank, lengths = self._features([waveform], sample_rate)
        codes, mask = jax.device_get(self._encode(self.params, fbank, lengths))
        return codes[0][mask[0]].astype(np.int32)

    def transcribe(self, waveforms: Sequence[np.ndarray], sample_rate: int = audio_frontend.SAMPLE_RATE,
                   batch_size: int = 8) -> list[str]:
        """The tokenizer's own ASR (its CTC head, greedy) of each clip: the TTS evaluation's."""
        from m2omni_jax.models.speech_tokenizer import greedy_ctc

        if self._logits is None:
            self._logits = jax.jit(lambda p, f, n: self.model.apply(p, f, n))
        texts = []
        for start in range(0, len(waveforms), batch_size):
            chunk = list(waveforms[start:start + batch_size])
            fbank, lengths = self._features(chunk + [chunk[0]] * (batch_size - len(chunk)), sample_rate)
            out = self._logits(self.params, fbank, lengths)
            texts += greedy_ctc(out["logits"], out["logit_mask"], self.model.config.alphabet)[:len(chunk)]
        return texts

    def _features(self, waveforms, sample_rate: int):
        feats = [audio_frontend.apply_cmvn(audio_frontend.fbank(audio_frontend.resample(w, sample_rate)), self.cmvn)
                 if len(w) >= audio_frontend.FRAME_LENGTH else np.zeros((0, audio_frontend.NUM_MEL_BINS), np.float32)
                 for w in waveforms]  # a clip shorter than one frame (a reply with no speech) transcribes as ""
        bucket = self.model.config.frames_per_token * CODE_BUCKET_TOKENS  # few shapes: few compiles
        longest = max(len(f) for f in feats)
        return audio_frontend.pad_features(feats, max(longest + (-longest % bucket), bucket))


# ----------------------------------------------------------------------------- TTS records


def transcripts_at(record: dict, key: str) -> list:
    """The values at a dotted path of a record, mapped over lists ("attributes.voices.text":
    one text per clip of the built-in speech)."""
    values = [record]
    for part in key.split("."):
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
        values = [value[part] for value in values]
    return [v for value in values for v in (value if isinstance(value, list) else [value])]


def tts_records_of(record: dict, transcript_key: str, codes_of, prompt: str = TTS_PROMPT) -> list[dict]:
    """One TTS record per clip of a speech record that has its transcript: the clip's codes
    (`codes_of(waveform, sample_rate)`) as the answer; the clip itself kept as
    `reference_audio` (int16 PCM bytes at `sample_rate`) for evaluation."""
    clips, texts = record.get("audio", []), transcripts_at(record, transcript_key)
    if len(texts) != len(clips):
        raise ValueError(f"record {record.get('id')!r}: {len(clips)} clips but {len(texts)} transcripts at "
                         f"{transcript_key!r}")
    rate = int(record.get("sample_rate", audio_frontend.SAMPLE_RATE))
    out = []
    for i, (clip, text) in enumerate(zip(clips, texts)):
        tts = tts_record(text, codes_of(clip, rate), prompt)
        out.append({**tts, "id": f"{record.get('id', '')}#{i}", "sample_rate": rate,
                    "reference_audio": records_lib.pcm16_bytes(clip)})
    return out


SPEAK_MODES = ("transcripts", "answers")
RECORDS_VERSION = 2  # in the cache directory's name: records written by an older version are not reused


def _audio_tower_on(config) -> bool:
    model = getattr(config, "model", None)
    return bool(getattr(getattr(model, "audio", None), "enabled", False))


class TTSSource(sources.Source):
    """Kind "tts": speech output records of modality "speech_gen", made from the records of
    another configured source (`from_source`, its audio parts or the named `parts`) and encoded
    by a trained speech tokenizer (`tokenizer_workdir`, an m2omni-train-speech-tokenizer run, with
    `tokenizer_model` its model fields). `speak` says what is spoken:
      "transcripts" (default): text -> speech, one record per clip, the clip's transcript at
        `transcript_key` as the text and the clip's codes as the `<gen_audio>` reply;
      "answers": spoken answers, the record's own question (speech, image + speech, text, ...)
        kept and its text answer spoken by the registered `voice` (`register_voice`) and
        replaced by that speech's codes, with a system turn saying `instruction` (default
        SPOKEN_ANSWER_INSTRUCTION; `spoken_answer_record`); a question that holds clips needs
        the audio tower (model.audio.enabled).
    Written once per split to `dir` (ArrayRecord); `num_<split>` caps a split's records."""

    def _dir(self) -> str:
        key = json.dumps({k: v for k, v in self.cfg.to_dict().items() if k not in ("weight", "dir")},
                         sort_keys=True, default=str)
        digest = hashlib.sha1(f"{key}|{self.config.data.seed}|{RECORDS_VERSION}".encode()).hexdigest()[:12]
        return self.cfg.get("dir", "") or os.path.join(self.config.data.dir, "tts", digest)

    def path(self, split: str) -> str:
        """The split's file in the local directory (data.mirror's copy when `dir` is a bucket)."""
        return os.path.join(mirror.local_path(self._dir()), f"tts-{split}.array_record")

    def parts(self, split: str) -> dict[str, sources.Part]:
        return {self.name: sources.Part(self.name, TTS_MODALITY, TTSRecords(self, split),
                                        float(self.cfg.get("weight", 1.0)))}

    def speech_parts(self, split: str) -> list:
        name = self.field("from_source")
        if name not in self.config.data.sources:
            raise ValueError(f"config.data.sources.{self.name}.from_source={name!r} is not a configured source "
                             f"({sorted(self.config.data.sources)})")
        # Only the clips are read, never fed to a model: the source's audio parts whether or not this
        # model has the audio tower (the built-in speech gives them only with it).
        from m2omni_jax.config_fields import replace
        from m2omni_jax.run_config import RunConfig

        config = self.config
        if hasattr(config, "model") and hasattr(config.model, "audio"):
            config = replace(RunConfig.of(config), **{"model.audio.enabled": True})
        parts = sources.make_sources(config)[name].parts(split)
        wanted = tuple(self.cfg.get("parts", ()) or ())
        chosen = [p for n, p in parts.items() if (n in wanted if wanted else p.modality == "audio")]
        if not chosen:
            raise ValueError(f"config.data.sources.{self.name}: source {name!r} has no audio parts "
                             f"{'named ' + str(wanted) if wanted else ''} in split {split!r} (parts: {sorted(parts)};"
                             " the built-in speech needs model.audio.enabled)")
        return chosen

    def prepare(self, progress: bool = True) -> dict[str, str]:
        for split in sources.SPLITS:
            self.write(split, progress)
        return {self.name: self._dir()}

    def write(self, split: str, progress: bool = False) -> str:
        """Encodes the split's clips (once) to `path(split)`."""
        with mirror.mirrored(self._dir()):
            return self._write(split, progress)

    def speak(self) -> str:
        mode = self.cfg.get("speak", "transcripts") or "transcripts"
        if mode not in SPEAK_MODES:
            raise ValueError(f"config.data.sources.{self.name}.speak={mode!r}: one of {SPEAK_MODES}")
        return mode

    def records_of(self, record: dict, codes_of) -> list[dict]:
        """The speech output records that one record of `from_source` gives."""
        if self.speak() == "transcripts":
            return tts_records_of(record, self.cfg.get("transcript_key", "transcripts"), codes_of,
                                  self.cfg.get("prompt", TTS_PROMPT))
        if record.get("audio") and not _audio_tower_on(self.config):
            raise ValueError(f"config.data.sources.{self.name}.speak='answers': record {record.get('id')!r} asks "
                             "its question in speech, but config.model.audio.enabled=False")
        voice = get_voice(self.field("voice"), f"config.data.sources.{self.name}.voice")
        text = str(record.get("messages", [{}])[-1].get("content", ""))
        answer_audio = voice(text, str(record.get("id", "")))
        return [spoken_answer_record(record, codes_of(answer_audio, audio_frontend.SAMPLE_RATE), answer_audio,
                                     self.cfg.get("instruction", SPOKEN_ANSWER_INSTRUCTION))]

    def _write(self, split: str, progress: bool) -> str:
        from array_record.python.array_record_module import ArrayRecordWriter
        from tqdm import tqdm

        path = self.path(split)
        if os.path.exists(path):
            return path
        limit = int(self.cfg.get(f"num_{split}", 0)) or None
        records = (r for r in sources.round_robin([p.records() for p in self.speech_parts(split)])
                   if not records_lib.is_bad(r))
        codes_of = SpeechCodes.of_run(self.field("tokenizer_workdir"), self.field("tokenizer_model"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        writer, count = ArrayRecordWriter(tmp, "group_size:1"), 0
        try:
            with tqdm(total=limit, desc=f"{self.name} {split} (speech codes)", disable=not progress) as bar:
                for record in records:
                    for tts in self.records_of(record, codes_of):
                        if limit is not None and count >= limit:
                            break
                        writer.write(records_lib.encode_record(tts))
                        count += 1
                        bar.update()
                    if limit is not None and count >= limit:
                        break
        finally:
            writer.close()
        os.replace(tmp, path)
        return path


class TTSRecords:
    """Opens a TTS source's records of a split (writing them on first use); picklable."""

    def __init__(self, source: TTSSource, split: str):
        self.source, self.split = source, split

    def __call__(self):
        import grain

        path = self.source.write(self.split)
        return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map(
            sources.SafeDecode(records_lib.decode_record))


sources.register_source("tts", TTSSource)

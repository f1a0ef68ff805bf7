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
from typing import Sequence

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


def tts_record(text: str, codes, prompt: str = TTS_PROMPT) -> dict:
    """A text-to-speech record in the omni format: the user gives the text, the assistant answers
    `<gen_audio><audio_c0><audio_c1>…</gen_audio>` (`codes` of the spoken text)."""
    spoken = "".join(AUDIO_TOKEN.format(int(c)) for c in np.asarray(codes).reshape(-1))
    open_, close = GEN_AUDIO_SPAN
    return {"messages": [{"role": "user", "content": f"{prompt}\n{text}"},
                         {"role": "assistant", "content": f"{open_}{spoken}{close}"}],
            "modality": TTS_MODALITY, "task": "tts", "answer": text}


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


class TTSSource(sources.Source):
    """Kind "tts": text -> `<gen_audio>` speech codes, made from the speech clips of another
    configured source (`from_source`, its audio parts or the named `parts`) whose records hold
    each clip's transcript at `transcript_key`; a trained speech tokenizer (`tokenizer_workdir`,
    an m2omni-train-speech-tokenizer run, with `tokenizer_model` its model fields) encodes the
    clips. Written once per split to `dir` (ArrayRecord), modality "speech_gen"."""

    def _dir(self) -> str:
        key = json.dumps({k: v for k, v in self.cfg.to_dict().items() if k not in ("weight", "dir")},
                         sort_keys=True, default=str)
        digest = hashlib.sha1(f"{key}|{self.config.data.seed}".encode()).hexdigest()[:12]
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
                    for tts in tts_records_of(record, self.cfg.get("transcript_key", "transcripts"), codes_of,
                                              self.cfg.get("prompt", TTS_PROMPT)):
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

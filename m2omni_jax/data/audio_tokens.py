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
import re
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from m2omni_jax.data import audio as audio_frontend

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


def tts_record(text: str, codes, prompt: str = TTS_PROMPT) -> dict:
    """A text-to-speech record in the omni format: the user gives the text, the assistant answers
    `<gen_audio><audio_c0><audio_c1>…</gen_audio>` (`codes` of the spoken text)."""
    spoken = "".join(AUDIO_TOKEN.format(int(c)) for c in np.asarray(codes).reshape(-1))
    return {"messages": [{"role": "user", "content": f"{prompt}\n{text}"},
                         {"role": "assistant", "content": f"<gen_audio>{spoken}</gen_audio>"}],
            "modality": "audio", "task": "tts", "answer": text}


def extend_llm_vocab(params: dict, llm_config, vocab_size: int):
    """(params, config) with the embedding and LM head grown to `vocab_size` rows (the old
    rows unchanged, each new one the mean of the old ones: `interop.hf.resize_vocab`);
    `params` is an LLM tree (`embedding`, `lm_head`) or an omni tree holding one at `llm`."""
    from m2omni_jax.interop import hf  # numpy-only there; imported here to keep data's imports light

    if "llm" in params:
        llm, llm_config = hf.resize_vocab(jax.device_get(params["llm"]), llm_config, vocab_size)
        return dict(params, llm=llm), llm_config
    return hf.resize_vocab(jax.device_get(params), llm_config, vocab_size)


class SpeechCodes:
    """Waveforms -> speech codes with a trained tokenizer: fbank, CMVN, the SAN-M encoder, FSQ."""

    def __init__(self, config, params, cmvn: dict):
        from m2omni_jax.models.speech_tokenizer import SpeechTokenizer

        self.model, self.params, self.cmvn = SpeechTokenizer(config), params, cmvn
        self._encode = jax.jit(lambda p, f, n: self.model.apply(p, f, n, method=SpeechTokenizer.encode))

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

    def __call__(self, waveform: np.ndarray, sample_rate: int = audio_frontend.SAMPLE_RATE) -> np.ndarray:
        """One clip -> its codes (tokens,) int32, `config.tokens_per_second` of them a second."""
        feats = audio_frontend.apply_cmvn(audio_frontend.fbank(audio_frontend.resample(waveform, sample_rate)),
                                          self.cmvn)
        frames = len(feats) + (-len(feats) % self.model.config.frames_per_token)
        fbank, lengths = audio_frontend.pad_features([feats], max(frames, self.model.config.frames_per_token))
        codes, mask = jax.device_get(self._encode(self.params, fbank, lengths))
        return codes[0][mask[0]].astype(np.int32)

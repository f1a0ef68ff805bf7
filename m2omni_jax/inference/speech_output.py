"""The `<gen_audio>` output head: the LLM's `<audio_k>` codes -> waveform, streamed.

    head = SpeechOutputHead(decoder, decoder_params, tokenizer.audio)  # or load_speech_head(config)
    generator = Generator(model, params, tokenizer, config, heads={"audio": head})
    for segment in generator.generate_stream("Read this aloud.\\na red square"):
        ...  # TextSegments, then HeadSegment("audio", waveform chunk, ..., final=False) ... final=True

While the span is open every code goes to a `speech_decoder.StreamDecoder` (chunk-causal flow
matching: a chunk of `chunk_tokens` codes is decoded once `lookahead_tokens` more have arrived)
and each mel chunk to the vocoder's stream (`vocoder.StreamingGriffinLim` by default, or the
HiFi-GAN of `config.speech_tokenizer.vocoder="hifigan"`: `vocoder.select`); the samples it releases come out as audio
segments while the LLM is still writing. The span's close flushes both. The noise x_0 is fixed
per head (`seed`), so the streamed mel chunks joined equal `mel(codes)`, the one-shot decoding,
up to float roundoff.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax import workdir as workdir_lib
from m2omni_jax.data.audio_tokens import AudioTokens
from m2omni_jax.models import speech_decoder as sd, vocoder


class SpeechOutputHead:
    """codes -> waveform (see the module docstring). `max_tokens` codes at most per span (the
    rest are dropped); ids inside the span that are not `<audio_k>` are skipped."""

    def __init__(self, decoder: sd.SpeechDecoder, params, audio: AudioTokens, *, max_tokens: int = 256,
                 num_steps: int = 10, guidance_scale: float | None = 1.0, griffin_lim_iters: int = 32, seed: int = 0,
                 mel_to_wave=None):
        self.decoder, self.params, self.audio = decoder, params, audio
        self.max_tokens, self.num_steps, self.guidance_scale = int(max_tokens), int(num_steps), guidance_scale
        # log-mel -> waveform: `__call__(mel)` and `stream()` (vocoder.select's interface).
        self.vocoder = mel_to_wave or vocoder.GriffinLimVocoder(
            dataclasses.replace(vocoder.MEL, griffin_lim_iters=int(griffin_lim_iters)))
        cfg = decoder.config
        self.noise = np.asarray(jax.random.normal(jax.random.key(seed), (1, self.max_tokens * cfg.token_mel_ratio,
                                                                         cfg.num_mels)), np.float32)
        self._sample = jax.jit(lambda p, t, n, s: sd.sample(decoder, p, t, n, num_steps=self.num_steps,
                                                            guidance_scale=s))

    def codes(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, np.int64)
        return self.audio.ids_to_codes(ids[self.audio.is_audio(ids)])[:self.max_tokens]

    def mel(self, codes) -> np.ndarray:
        """One-shot decoding of all the codes: log-mel (frames, mels)."""
        codes = np.asarray(codes, np.int32).reshape(1, -1)
        if not codes.size:
            return np.zeros((0, self.decoder.config.num_mels), np.float32)
        frames = codes.shape[1] * self.decoder.config.token_mel_ratio
        scale = None if self.guidance_scale is None else jnp.float32(self.guidance_scale)
        return np.asarray(self._sample(self.params, codes, self.noise[:, :frames], scale))[0]

    def __call__(self, token_ids: Sequence[int], text: str = "") -> np.ndarray:
        """The whole span at once: its waveform (one-shot mel, Griffin-Lim)."""
        del text
        mel = self.mel(self.codes(token_ids))
        return self.vocoder(mel) if len(mel) > 1 else np.zeros((0,), np.float32)

    def open(self) -> "SpeechStream":
        return SpeechStream(self)


class SpeechStream:
    """One open `<gen_audio>` span: `push(id)` -> waveform chunks now final; `close()` -> the rest."""

    def __init__(self, head: SpeechOutputHead):
        self.head, self.count = head, 0
        self.decoder = sd.StreamDecoder(head.decoder, head.params, head.noise, num_steps=head.num_steps,
                                        guidance_scale=head.guidance_scale)
        self.vocoder = head.vocoder.stream()
        self.mels: list[np.ndarray] = []  # the mel chunks decoded so far (B = 1 squeezed)

    def push(self, token_id: int) -> list[np.ndarray]:
        if not self.head.audio.is_audio(token_id) or self.count >= self.head.max_tokens:
            return []
        self.count += 1
        return self._vocode(self.decoder.push(self.head.audio.ids_to_codes([token_id]).reshape(1, 1)))

    def close(self) -> list[np.ndarray]:
        out = self._vocode(self.decoder.flush())
        tail = self.vocoder.flush() if self.mels else np.zeros((0,), np.float32)
        return out + [tail]

    def _vocode(self, mels) -> list[np.ndarray]:
        out = []
        for mel in mels:
            self.mels.append(np.asarray(mel[0]))
            wave = self.vocoder.push(mel[0])
            if len(wave):
                out.append(wave)
        return out


def restore_decoder(workdir: str, decoder_config: sd.SpeechDecoderConfig) -> dict:
    """The decoder parameters of an m2omni-train-speech-tokenizer run (`<workdir>/decoder`)."""
    from m2omni_jax.training import checkpointing

    model, ratio = sd.SpeechDecoder(decoder_config), decoder_config.token_mel_ratio
    tokens = np.zeros((1, max(decoder_config.chunk_tokens, 1)), np.int32)
    frames = tokens.shape[1] * ratio
    mel = np.zeros((1, frames, decoder_config.num_mels), np.float32)
    zeros = np.zeros((1,), np.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, np.ones(tokens.shape, bool), zeros, mel,
                                     np.zeros((1,), np.float32), mel, np.ones((1, frames), bool), zeros,
                                     np.ones((1,), bool))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    path = os.fspath(workdir_lib.path(workdir_lib.local_or_url(workdir), "decoder", "checkpoints"))
    params, missing = checkpointing.load_params(path, abstract)
    if missing:
        raise ValueError(f"{path}: the speech decoder parameters {missing[:5]} are not in the checkpoint")
    return {"params": params}


def load_speech_head(config, audio: AudioTokens, *, max_tokens: int = 256, seed: int = 0) -> SpeechOutputHead:
    """The head of `config.speech_tokenizer` (the m2omni-train-speech-tokenizer section: its
    `workdir`, `decoder.model`, `tokenizer.model` (codebook), `euler_steps`, `guidance_scale`,
    and the vocoder: `vocoder` ("griffin_lim" with `griffin_lim_iters`, or "hifigan" from
    `vocoder_workdir`)."""
    from m2omni_jax.models.speech_tokenizer import SpeechTokenizerConfig

    run = config.section("speech_tokenizer") if hasattr(config, "section") else config.speech_tokenizer
    workdir = run.get("workdir", "")
    if not workdir:
        raise ValueError("config.speech_tokenizer.workdir is not set: the m2omni-train-speech-tokenizer run "
                         "whose decoder speaks the <audio_k> codes")
    codebook = SpeechTokenizerConfig.from_config(run["tokenizer"]["model"]).codebook_size
    if codebook != audio.num_codes:
        raise ValueError(f"config.tokenizer.audio_codes={audio.num_codes} but the speech tokenizer has {codebook} codes")
    decoder_config = sd.SpeechDecoderConfig.from_config(dict(run["decoder"]["model"], codebook_size=codebook))
    params = restore_decoder(workdir, decoder_config)
    return SpeechOutputHead(sd.SpeechDecoder(decoder_config), params, audio, max_tokens=max_tokens,
                            num_steps=int(run.get("euler_steps", 10)), guidance_scale=float(run.get("guidance_scale", 1.0)),
                            seed=seed, mel_to_wave=vocoder.select(run, "config.speech_tokenizer"))


def configured(config, tokenizer) -> bool:
    """Whether a run speaks: `<audio_k>` tokens in its tokenizer and a speech decoder run named
    (`config.speech_tokenizer.workdir`)."""
    if getattr(tokenizer, "audio", None) is None:
        return False
    sections = getattr(config, "sections", None)
    run = sections.get("speech_tokenizer") if sections is not None else config.get("speech_tokenizer")
    return bool(run and run.get("workdir"))

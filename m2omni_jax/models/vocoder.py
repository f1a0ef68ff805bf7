"""The speech decoder's mel spectrogram and its no-training inversion (Griffin–Lim).

Mel: 16 kHz, 1024-point Hann STFT (64 ms window), hop 320 (20 ms, 50 frames/s: two frames per
25 Hz speech token, three per 60 ms LFR frame), 80 Slaney mel bins over 0–8 kHz, natural log
of the magnitude (not power) mel, floored at 1e-5, as HiFi-GAN and CosyVoice. It is the
flow-matching decoder's training target and output (`models/speech_decoder.py`); it differs
from the encoder's Kaldi fbank (`data/audio.py`: power, 10 ms hop), which is an input feature.

Inversion: non-negative least squares from mel to linear magnitude (`mel_to_magnitude`),
then librosa's Griffin–Lim phase recovery. `StreamingGriffinLim` inverts mel chunk by chunk: each chunk is
inverted with `context_frames` frames of the previous mel before it, and the last
`fade_samples` of every chunk are held back and cross-faded (raised cosine) with the next
chunk's version of them, so chunk edges (where Griffin–Lim lacks context and each chunk's
phase is its own) are overlap-added rather than cut.

Selection (`select`): a config section's `vocoder` is "griffin_lim" (the default, no training)
or "hifigan", the neural vocoder of `models/hifigan.py` trained by m2omni-train-vocoder,
loaded from `vocoder_workdir`. Either one is `__call__(log_mel) -> waveform` ((frames-1)·hop
samples) and `stream()` -> an object with `push(log_mel)` / `flush()`.
"""
from __future__ import annotations

import dataclasses
import functools

import librosa
import numpy as np

from m2omni_jax.config_fields import ConfigError, dataclass_from_config


@dataclasses.dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16_000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 320  # 20 ms: 50 frames/s
    num_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5
    griffin_lim_iters: int = 32

    def __post_init__(self):
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ValueError(f"mel needs 0 < hop_length {self.hop_length} <= win_length {self.win_length} "
                             f"<= n_fft {self.n_fft}")

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @classmethod
    def from_config(cls, cfg) -> "MelConfig":
        return dataclass_from_config(cls, cfg, "model.vocoder")

    def _filters(self) -> dict:
        return dict(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.num_mels, fmin=self.fmin, fmax=self.fmax)

    def _stft(self) -> dict:
        return dict(hop_length=self.hop_length, win_length=self.win_length, n_fft=self.n_fft, window="hann",
                    center=True)


MEL = MelConfig()


def num_frames(num_samples: int, config: MelConfig = MEL) -> int:
    """Frames `mel_spectrogram` gives (centred frames: one per hop, plus one)."""
    return 1 + num_samples // config.hop_length


def mel_spectrogram(wave: np.ndarray, config: MelConfig = MEL) -> np.ndarray:
    """Waveform (samples,) at config.sample_rate -> log-mel (frames, num_mels) float32."""
    magnitude = np.abs(librosa.stft(np.asarray(wave, np.float32), **config._stft()))
    mel = librosa.feature.melspectrogram(S=magnitude, power=1.0, **config._filters())
    return np.log(np.maximum(mel, config.log_floor)).T.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _mel_basis(config: MelConfig):
    """The mel filters B (num_mels, n_fft/2+1), their pseudo-inverse and BᵀB."""
    basis = librosa.filters.mel(**config._filters())
    return basis, np.linalg.pinv(basis), basis.T @ basis


def mel_to_magnitude(mel: np.ndarray, config: MelConfig = MEL, num_iters: int = 10) -> np.ndarray:
    """Magnitude mel (num_mels, frames) -> linear magnitude (n_fft/2+1, frames) >= 0.

    Non-negative least squares min ||B·S - mel|| by Lee–Seung multiplicative updates from the
    clipped pseudo-inverse: librosa's `mel_to_stft` solves the same problem with L-BFGS-B, but
    took ~9 s per 0.5 s chunk on an untrained decoder's output (~0.02 s here); 10 updates also
    halve the round-trip distance of the clipped pseudo-inverse (0.07 vs 0.12 on a tone).
    """
    basis, inverse, gram = _mel_basis(config)
    magnitude = np.maximum(inverse @ mel, 1e-8)
    numerator = basis.T @ mel
    for _ in range(num_iters):
        magnitude *= numerator / np.maximum(gram @ magnitude, 1e-12)
    return magnitude


def griffin_lim(log_mel: np.ndarray, config: MelConfig = MEL, *, num_iters: int | None = None,
                length: int | None = None, seed: int = 0) -> np.ndarray:
    """Log-mel (frames, num_mels) -> waveform float32 (default length (frames-1)·hop): the linear
    magnitude by `mel_to_magnitude`, its phase by librosa's Griffin–Lim (fast variant, momentum 0.99)."""
    magnitude = mel_to_magnitude(np.exp(np.asarray(log_mel, np.float64)).T, config)
    length = (len(log_mel) - 1) * config.hop_length if length is None else length
    wave = librosa.griffinlim(magnitude, n_iter=num_iters or config.griffin_lim_iters, length=length,
                              init="random", random_state=seed, **config._stft())
    return wave.astype(np.float32)


class StreamingGriffinLim:
    """Griffin–Lim over mel chunks as they come; `push` returns the samples now final.

    The samples joined are the utterance's (frame i centred at sample i·hop; (frames-1)·hop
    in all, as `griffin_lim`). A chunk shorter than the fade waits for the next one;
    `flush` returns the rest.
    """

    def __init__(self, config: MelConfig = MEL, *, context_frames: int = 4, fade_samples: int | None = None,
                 num_iters: int | None = None):
        self.config, self.num_iters = config, num_iters
        self.fade = config.n_fft // 2 if fade_samples is None else fade_samples
        # The held-back tail must lie inside the next inversion, past its first frame.
        self.context = max(context_frames, 1 + -(-self.fade // config.hop_length))
        self.ramp = np.sin(0.5 * np.pi * (np.arange(self.fade) + 0.5) / max(self.fade, 1)) ** 2
        self.history = np.zeros((0, config.num_mels), np.float32)  # the last `context` frames inverted
        self.pending = np.zeros((0, config.num_mels), np.float32)  # frames not inverted yet
        self.tail = np.zeros((0,), np.float32)  # held-back samples, to cross-fade with the next chunk
        self.frames_done = 0  # frames inverted so far
        self.emitted = 0  # samples returned so far

    def push(self, log_mel: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, np.asarray(log_mel, np.float32)])
        if (len(self.history) + len(self.pending) - 1) * self.config.hop_length <= self.fade + len(self.tail):
            return np.zeros((0,), np.float32)
        return self._invert(final=False)

    def flush(self) -> np.ndarray:
        return self._invert(final=True) if len(self.pending) else self.tail

    def _invert(self, final: bool) -> np.ndarray:
        hop = self.config.hop_length
        mel = np.concatenate([self.history, self.pending])
        wave = griffin_lim(mel, self.config, num_iters=self.num_iters)  # from sample first_frame·hop on
        start = self.emitted - (self.frames_done - len(self.history)) * hop
        keep = len(wave) if final else len(wave) - self.fade
        out = wave[start:keep].copy()
        held = len(self.tail)
        out[:held] = self.tail * (1.0 - self.ramp[:held]) + out[:held] * self.ramp[:held]
        self.tail = np.zeros((0,), np.float32) if final else wave[keep:]
        self.emitted += len(out)
        self.frames_done += len(self.pending)
        self.history, self.pending = mel[-self.context:], self.pending[:0]
        return out.astype(np.float32)


# -------------------------------------------------------------------------- selection

VOCODERS = ("griffin_lim", "hifigan")


class GriffinLimVocoder:
    """`griffin_lim` and `StreamingGriffinLim` behind the interface every selected vocoder has."""

    def __init__(self, config: MelConfig = MEL):
        self.config = config

    def __call__(self, log_mel: np.ndarray, *, length: int | None = None) -> np.ndarray:
        return griffin_lim(log_mel, self.config, length=length)

    def stream(self) -> StreamingGriffinLim:
        return StreamingGriffinLim(self.config, num_iters=self.config.griffin_lim_iters)


def select(section, path: str = "config.speech_tokenizer"):
    """The vocoder `section` (a mapping, e.g. config.speech_tokenizer) names: its `vocoder`,
    "griffin_lim" (default; `griffin_lim_iters`) or "hifigan" (the generator of the
    m2omni-train-vocoder run at `vocoder_workdir`); `path` names the section in errors."""
    name = section.get("vocoder", "griffin_lim") or "griffin_lim"
    if name not in VOCODERS:
        raise ConfigError(f"{path}.vocoder={name!r} is not one of {VOCODERS}")
    if name == "griffin_lim":
        iters = int(section.get("griffin_lim_iters", MEL.griffin_lim_iters))
        return GriffinLimVocoder(dataclasses.replace(MEL, griffin_lim_iters=iters))
    workdir = section.get("vocoder_workdir", "")
    if not workdir:
        raise ConfigError(f"{path}.vocoder_workdir is not set: {path}.vocoder='hifigan' loads the generator of "
                          "that m2omni-train-vocoder run")
    from m2omni_jax.models import hifigan

    return hifigan.load(workdir)


# ------------------------------------------------------------------------- evaluation


def mel_cepstrum(log_mel: np.ndarray, num_coefficients: int = 13) -> np.ndarray:
    """Log-mel (frames, mels) -> mel-cepstral coefficients c1 … c_n (frames, n): the cosine
    series log_mel[m] = c0/2 + Σ_k c_k·cos(πk(m + ½)/M) over the M bins (a DCT-II divided by
    M), the scale MCD's formula assumes; c0 (the frame's loudness) is dropped."""
    import scipy.fft

    log_mel = np.asarray(log_mel, np.float64)
    series = scipy.fft.dct(log_mel, type=2, axis=-1) / log_mel.shape[-1]
    return series[:, 1:num_coefficients + 1]


def mel_cepstral_distortion(reference: np.ndarray, generated: np.ndarray, config: MelConfig = MEL,
                            num_coefficients: int = 13, silence_db: float = 50.0) -> float:
    """MCD in dB between two waveforms: (10/ln 10)·√(2·Σ_d (c_d - c'_d)²) per frame, averaged
    along the dynamic-time-warping path of the cepstra (lengths may differ). Frames more than
    `silence_db` under the reference's loudest are left out of both (the silences)."""
    ref_mel, gen_mel = mel_spectrogram(reference, config), mel_spectrogram(generated, config)
    floor = ref_mel.max() - silence_db / (20.0 / np.log(10.0))  # log-magnitude: 20/ln 10 dB per nat
    ref_mel, gen_mel = ref_mel[ref_mel.max(axis=1) > floor], gen_mel[gen_mel.max(axis=1) > floor]
    if not len(ref_mel) or not len(gen_mel):
        raise ValueError("mel_cepstral_distortion: a waveform is silent")
    ref, gen = mel_cepstrum(ref_mel, num_coefficients), mel_cepstrum(gen_mel, num_coefficients)
    distance = np.sqrt(((ref[:, None, :] - gen[None, :, :]) ** 2).sum(-1))
    _, path = librosa.sequence.dtw(C=distance)
    return float(10.0 / np.log(10.0) * np.sqrt(2.0) * distance[path[:, 0], path[:, 1]].mean())


def evaluate_tts(generated, references, texts, transcribe, normalize=lambda t: t) -> dict:
    """TTS intelligibility and fidelity: `transcribe(waves) -> texts` (the model's own ASR) on
    the generated waveforms, word and character error rates against `texts`, and the mean
    mel-cepstral distortion of each generated waveform against its reference recording."""
    import jiwer

    if not len(generated) == len(references) == len(texts):
        raise ValueError(f"evaluate_tts: {len(generated)} generated, {len(references)} references, {len(texts)} texts")
    refs = [normalize(t) for t in texts]
    hyps = [normalize(h) for h in transcribe(generated)]
    mcd = [mel_cepstral_distortion(r, g) for r, g in zip(references, generated)]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)), "mcd_db": float(np.mean(mcd)),
            "examples": [{"text": r, "asr": h} for r, h in list(zip(refs, hyps))[:5]]}


def write_wav(path: str, wave: np.ndarray, sample_rate: int = MEL.sample_rate) -> None:
    """16-bit mono WAV (standard library `wave`), peak-normalised if it would clip."""
    import os
    import wave as wave_lib

    wave = np.asarray(wave, np.float32)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    pcm = np.clip(np.rint(wave / max(peak, 1.0) * 32767.0), -32768, 32767).astype("<i2")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with wave_lib.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())

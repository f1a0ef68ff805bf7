"""Audio front end of the Paraformer encoder, in numpy.

waveform (float32 in [-1, 1], any rate) -> `resample` to 16 kHz -> `fbank`
(Kaldi-compatible 80-bin log-mel, 25 ms Hamming window, 10 ms hop) -> `lfr`
(low frame rate: 7 frames stacked every 6, 560-d per 60 ms) -> `apply_cmvn`
(per-dimension mean/std measured on training data). `audio_features` runs
the whole chain; `pad_features` batches it for the encoder.

As in FunASR's `WavFrontend`, the waveform is scaled to the int16 range
before the fbank, so the log-mel values match Kaldi features of int16 audio.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import soxr
from etils import epath

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 80
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # frame length rounded up to a power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi's default log floor
INT16_SCALE = 32768.0
LFR_M, LFR_N = 7, 6
FEATURE_DIM = NUM_MEL_BINS * LFR_M  # 560


def resample(waveform: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float waveform -> float32 at `target_rate` (soxr, high quality)."""
    waveform = np.asarray(waveform, np.float32)
    if sample_rate == target_rate:
        return waveform
    return soxr.resample(waveform, sample_rate, target_rate, quality="HQ").astype(np.float32)


def num_fbank_frames(num_samples: int) -> int:
    """Frames Kaldi extracts with snip_edges=True: only whole windows."""
    if num_samples < FRAME_LENGTH:
        return 0
    return 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


def mel_banks(num_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE,
              fft_size: int = FFT_SIZE, low_freq: float = LOW_FREQ) -> np.ndarray:
    """Kaldi's triangular mel filters, (num_bins, fft_size // 2 + 1) over power-spectrum bins.

    Triangles are evenly spaced on the mel scale from `low_freq` to Nyquist;
    the Nyquist bin itself gets weight 0, as in Kaldi.
    """
    mel_low, mel_high = _mel(low_freq), _mel(sample_rate / 2)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)[:, None]
    center, right = left + delta, left + 2 * delta
    bin_mel = _mel(np.arange(fft_size // 2) * sample_rate / fft_size)[None, :]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    weights = np.where(bin_mel <= center, rising, falling)
    weights = np.where((bin_mel > left) & (bin_mel < right), weights, 0.0)
    return np.pad(weights, ((0, 0), (0, 1)))


_MEL_BANKS = mel_banks()
_HAMMING = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(FRAME_LENGTH) / (FRAME_LENGTH - 1))


def _frames(samples: np.ndarray) -> np.ndarray:
    count = num_fbank_frames(len(samples))
    index = np.arange(count)[:, None] * FRAME_SHIFT + np.arange(FRAME_LENGTH)[None, :]
    return samples[index]


def fbank(waveform: np.ndarray, *, dither: float = 0.0,
          rng: np.random.Generator | None = None) -> np.ndarray:
    """16 kHz float waveform in [-1, 1] -> (frames, 80) float32 Kaldi log-mel fbank.

    Per frame, as Kaldi's `compute-fbank-feats`: optional Gaussian dither (in
    int16 units; use 0 for eval), DC offset removal, pre-emphasis 0.97,
    Hamming window, 512-point power spectrum, mel filters, log(max(x, eps)).
    """
    frames = _frames(np.asarray(waveform, np.float64) * INT16_SCALE)
    if dither:
        rng = rng if rng is not None else np.random.default_rng()
        frames = frames + dither * rng.standard_normal(frames.shape)
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * _HAMMING
    power = np.abs(np.fft.rfft(frames, n=FFT_SIZE, axis=1)) ** 2
    return np.log(np.maximum(power @ _MEL_BANKS.T, LOG_FLOOR)).astype(np.float32)


def lfr(feats: np.ndarray, m: int = LFR_M, n: int = LFR_N) -> np.ndarray:
    """Low-frame-rate stacking: (T, D) -> (ceil(T/n), m·D).

    Output frame i concatenates input frames i·n - (m-1)//2 … i·n + m-1 - (m-1)//2,
    indices clamped to [0, T-1]: the left edge repeats the first frame and the
    last window repeats the last frame, as FunASR's `apply_lfr`.
    """
    num_frames, dim = feats.shape
    count = -(-num_frames // n)
    if count == 0:
        return np.zeros((0, m * dim), np.float32)
    index = np.arange(count)[:, None] * n + np.arange(m)[None, :] - (m - 1) // 2
    index = np.clip(index, 0, num_frames - 1)
    return feats[index].reshape(count, m * dim).astype(np.float32)


# ------------------------------------------------------------------- CMVN


def compute_cmvn_stats(feats: Sequence[np.ndarray], *, min_std: float = 1e-5) -> dict:
    """Per-dimension mean and std over every frame of `feats` (a list of (T, D))."""
    feats = [np.asarray(f, np.float64) for f in feats if len(f)]
    if not feats:
        raise ValueError("compute_cmvn_stats needs at least one non-empty feature matrix")
    count = sum(len(f) for f in feats)
    mean = sum(f.sum(axis=0) for f in feats) / count
    var = sum(((f - mean) ** 2).sum(axis=0) for f in feats) / count
    return {"mean": mean.astype(np.float32), "std": np.maximum(np.sqrt(var), min_std).astype(np.float32),
            "count": int(count)}


def apply_cmvn(feats: np.ndarray, stats: dict) -> np.ndarray:
    return ((feats - stats["mean"]) / stats["std"]).astype(np.float32)


def save_cmvn(path: str, stats: dict) -> None:
    """JSON file of the stats (kept next to the checkpoint; local or gs:// paths)."""
    epath.Path(path).write_text(json.dumps({"mean": np.asarray(stats["mean"]).tolist(),
                                            "std": np.asarray(stats["std"]).tolist(),
                                            "count": int(stats.get("count", 0))}))


def load_cmvn(path: str) -> dict:
    raw = json.loads(epath.Path(path).read_text())
    return {"mean": np.asarray(raw["mean"], np.float32), "std": np.asarray(raw["std"], np.float32),
            "count": int(raw.get("count", 0))}


# ---------------------------------------------------------------- pipeline


def audio_features(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, *, cmvn: dict | None = None,
                   dither: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Waveform -> (ceil(frames/6), 560) encoder input features."""
    feats = lfr(fbank(resample(waveform, sample_rate), dither=dither, rng=rng))
    return apply_cmvn(feats, cmvn) if cmvn is not None else feats


def pad_features(feats: Sequence[np.ndarray], max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Batches feature matrices: (B, max_frames, D) zero-padded (longer ones
    truncated) and int32 lengths (B,)."""
    dim = feats[0].shape[-1]
    batch = np.zeros((len(feats), max_frames, dim), np.float32)
    lengths = np.zeros((len(feats),), np.int32)
    for i, f in enumerate(feats):
        lengths[i] = min(len(f), max_frames)
        batch[i, :lengths[i]] = f[:lengths[i]]
    return batch, lengths

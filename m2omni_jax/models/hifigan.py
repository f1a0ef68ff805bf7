"""HiFi-GAN (Kong et al. 2020): a neural vocoder, log-mel (frames, 80) -> waveform (frames·hop).

Generator: a 7-tap conv to `initial_channels`, then per upsampling stage a leaky ReLU, a
transposed conv (stride = the stage's rate, channels halved) and a multi-receptive-field
fusion: the mean of residual blocks of different kernel sizes, each block a chain of dilated
convs x += conv_d(lrelu(x)) (the paper's V3 "type 2" block); a last 7-tap conv to one
channel and tanh. The rates multiply to the mel's hop (default 10·8·4 = 320, the 50
frames/s mel of `models/vocoder.py`): mel frame i makes samples [i·hop, (i+1)·hop).

Discriminators: multi-period (the waveform folded into (T/p, p) for each period p, 2-D
convs along time) and multi-scale (1-D grouped convs on the waveform and its 2× and 4×
average-pooled copies). Each returns its score map and the feature maps of every layer.

Losses (least-squares GAN): D: Σ mean((1 - D(y))²) + mean(D(ŷ)²); G: Σ mean((1 - D(ŷ))²)
+ feature_weight · Σ mean|D_l(y) - D_l(ŷ)| + mel_weight · mean|mel(y) - mel(ŷ)| with the
paper's weights 2 and 45; mel here is `log_mel`, a differentiable copy of
`vocoder.mel_spectrogram`. Every conv is weight-normalised (kernel = g·v/‖v‖ per output
channel, g initialised to ‖v‖); the paper's spectral norm on the first scale
discriminator is weight norm here too.

Sizes: `HifiGanConfig()` is V3's width (256 channels, type-2 blocks: 1.6 M generator
parameters at 3 stages for hop 320) with discriminators narrower than the paper's (4.6 M);
`.v1()` takes the paper's V1 widths (8.9 M generator parameters here).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models.layers import to_dtype

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
CONFIG_FILE = "hifigan.json"  # the model config m2omni-train-vocoder writes beside its checkpoints


@dataclasses.dataclass(frozen=True)
class HifiGanConfig:
    num_mels: int = 80
    upsample_rates: tuple = (10, 8, 4)  # multiply to the mel hop (320)
    upsample_kernels: tuple = (20, 16, 8)  # each rate + an even number: the output is exactly rate × input
    initial_channels: int = 256  # halved by every stage
    resblock_kernels: tuple = (3, 5, 7)
    resblock_dilations: tuple = ((1, 2), (2, 6), (3, 12))  # per kernel
    periods: tuple = (2, 3, 5, 7, 11)  # multi-period discriminator
    period_channels: tuple = (16, 64, 128, 256)  # its stride-3 layers (paper: 32, 128, 512, 1024)
    num_scales: int = 3  # multi-scale discriminator: the waveform, ×2 and ×4 pooled
    scale_channels: tuple = (32, 32, 64, 128, 256, 256, 256)  # paper: 128, 128, 256, 512, 1024 ×3
    scale_groups: tuple = (1, 4, 16, 16, 16, 16, 1)
    feature_weight: float = 2.0
    mel_weight: float = 45.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("upsample_rates", "upsample_kernels", "resblock_kernels", "periods", "period_channels",
                     "scale_channels", "scale_groups"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "resblock_dilations", tuple(tuple(int(d) for d in ds)
                                                             for ds in self.resblock_dilations))
        if len(self.upsample_rates) != len(self.upsample_kernels) or any(
                k < r or (k - r) % 2 for r, k in zip(self.upsample_rates, self.upsample_kernels)):
            raise ValueError(f"hifigan upsample_kernels {self.upsample_kernels} must pair with upsample_rates "
                             f"{self.upsample_rates}, each kernel the rate plus an even number")
        if self.initial_channels % 2 ** len(self.upsample_rates):
            raise ValueError(f"hifigan initial_channels {self.initial_channels} must halve "
                             f"{len(self.upsample_rates)} times")
        if len(self.resblock_kernels) != len(self.resblock_dilations):
            raise ValueError(f"hifigan resblock_dilations {self.resblock_dilations} need one tuple per kernel "
                             f"of resblock_kernels {self.resblock_kernels}")
        if len(self.scale_channels) != len(self.scale_groups) or any(
                c % g or p % g for c, p, g in zip(self.scale_channels, (1,) + self.scale_channels, self.scale_groups)):
            raise ValueError(f"hifigan scale_groups {self.scale_groups} must divide scale_channels "
                             f"{self.scale_channels} and each layer's input channels")

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)

    @classmethod
    def v1(cls, **overrides) -> "HifiGanConfig":
        """The paper's V1 widths (512 channels, kernels 3/7/11 × dilations 1/3/5), at 3 stages for hop 320."""
        defaults = dict(initial_channels=512, resblock_kernels=(3, 7, 11),
                        resblock_dilations=((1, 3, 5), (1, 3, 5), (1, 3, 5)), period_channels=(32, 128, 512, 1024),
                        scale_channels=(128, 128, 256, 512, 1024, 1024, 1024))
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_config(cls, cfg) -> "HifiGanConfig":
        return dataclass_from_config(cls, cfg, "hifigan.model")


def receptive_frames(config: HifiGanConfig) -> int:
    """Mel frames on either side of a frame that its samples can depend on (an upper bound):
    a streamed chunk with this much context on both sides equals the one-shot output."""
    radius, rate = 3.0, 1  # conv_pre's 7 taps
    for up, kernel in zip(config.upsample_rates, config.upsample_kernels):
        rate *= up
        radius += kernel / rate + sum(d * (k - 1) / 2 for k, ds in zip(config.resblock_kernels,
                                                                         config.resblock_dilations) for d in ds) / rate
    return math.ceil(radius + 3.0 / rate) + 1  # + conv_post's 7 taps, + the sample-to-frame rounding


# ------------------------------------------------------------------------------ layers


def _torch_default_init():
    """PyTorch's conv default (kaiming uniform, a=√5): U(±1/√fan_in)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)


class Conv(nn.Module):
    """Weight-normalised 1-D convolution on (B, L, C) with symmetric zero `padding`;
    `transpose`: a transposed conv of stride `stride` (the input dilated, the kernel read as
    a plain conv's). `axes`: the logical names of the in and out channels."""
    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    groups: int = 1
    transpose: bool = False
    axes: tuple = ("embed", "mlp")
    init_std: float | None = None  # normal(0, std) (HiFi-GAN's generator); None: PyTorch's default
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel_size, x.shape[-1] // self.groups, self.features)
        init = _torch_default_init() if self.init_std is None else nn.initializers.normal(self.init_std)
        direction = self.param("kernel", nn.with_logical_partitioning(init, ("conv",) + tuple(self.axes)), shape,
                               to_dtype(self.param_dtype))
        norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=(0, 1)))
        gain = self.param("scale", nn.with_logical_partitioning(lambda *_: norm, (self.axes[1],)), (self.features,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                          (self.features,), to_dtype(self.param_dtype))
        dtype = to_dtype(self.dtype)
        kernel = (direction * (gain / jnp.maximum(norm, 1e-12))).astype(dtype)
        if self.transpose:  # output length (L - 1)·s + k - 2p: L·s for k - s = 2p
            pad, lhs_dilation, stride = self.kernel_size - 1 - self.padding, self.stride, 1
        else:
            pad, lhs_dilation, stride = self.padding, 1, self.stride
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel, (stride,), [(pad, pad)], lhs_dilation=(lhs_dilation,),
                                         rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
                                         feature_group_count=self.groups)
        return y + bias.astype(dtype)


def leaky_relu(x, slope: float = 0.1):
    return jnp.where(x >= 0, x, slope * x)


# ---------------------------------------------------------------------------- generator


class ResBlock(nn.Module):
    """x += conv_d(lrelu(x)) for each dilation d (same channels, same length)."""
    config: HifiGanConfig
    kernel: int
    dilations: tuple

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for i, d in enumerate(self.dilations):
            x = x + Conv(x.shape[-1], self.kernel, dilation=d, padding=d * (self.kernel - 1) // 2,
                         init_std=0.01, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=f"conv_{i}")(leaky_relu(x))
        return x


class Generator(nn.Module):
    """log-mel (B, F, num_mels) -> waveform (B, F·hop) float32 in [-1, 1]."""
    config: HifiGanConfig

    @nn.compact
    def __call__(self, mel):
        cfg = self.config
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x = Conv(cfg.initial_channels, 7, padding=3, axes=("patch", "mlp"), name="conv_pre", **dtypes)(mel)
        x = nn.with_logical_constraint(x, ACTIVATION)
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels)):
            x = Conv(cfg.initial_channels // 2 ** (i + 1), kernel, stride=rate, padding=(kernel - rate) // 2,
                     transpose=True, init_std=0.01, name=f"upsample_{i}", **dtypes)(leaky_relu(x))
            x = sum(ResBlock(cfg, k, ds, name=f"mrf_{i}_{j}")(x)
                    for j, (k, ds) in enumerate(zip(cfg.resblock_kernels, cfg.resblock_dilations)))
            x = nn.with_logical_constraint(x / len(cfg.resblock_kernels), ACTIVATION)
        x = Conv(1, 7, padding=3, axes=("embed", "patch"), name="conv_post", **dtypes)(leaky_relu(x, 0.01))
        return jnp.tanh(x[..., 0].astype(jnp.float32))


# ------------------------------------------------------------------------ discriminators


class PeriodDiscriminator(nn.Module):
    """waveform (B, T) folded into (B, T/p, p): -> (scores (B, n), feature maps (B, rows, p, C))."""
    config: HifiGanConfig
    period: int

    @nn.compact
    def __call__(self, wave):
        cfg = self.config
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        batch, length = wave.shape
        pad = -length % self.period
        x = jnp.pad(wave, ((0, 0), (0, pad)), mode="reflect" if pad < length else "constant")
        # The paper's (k, 1) 2-D kernels never mix columns: 1-D convs down each of the p columns.
        x = x.reshape(batch, -1, self.period).transpose(0, 2, 1).reshape(batch * self.period, -1, 1)
        as_2d = lambda y: y.reshape(batch, self.period, *y.shape[1:]).transpose(0, 2, 1, 3)  # noqa: E731
        features = []
        layers = [(c, 3) for c in cfg.period_channels] + [(cfg.period_channels[-1], 1)]
        for i, (channels, stride) in enumerate(layers):
            axes = ("patch" if i == 0 else "embed", "mlp")
            x = leaky_relu(Conv(channels, 5, stride=stride, padding=2, axes=axes, name=f"conv_{i}",
                                **dtypes)(x))
            features.append(as_2d(x))
        x = as_2d(Conv(1, 3, padding=1, axes=("embed", "patch"), name="conv_post", **dtypes)(x))
        features.append(x)
        return x.reshape(batch, -1).astype(jnp.float32), features


SCALE_KERNELS = (15, 41, 41, 41, 41, 41, 5)
SCALE_STRIDES = (1, 2, 2, 4, 4, 1, 1)


class ScaleDiscriminator(nn.Module):
    """waveform (B, T, 1) -> (scores (B, n), feature maps): grouped strided 1-D convs."""
    config: HifiGanConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        features = []
        last = len(cfg.scale_channels) - 1
        for i, (channels, groups) in enumerate(zip(cfg.scale_channels, cfg.scale_groups)):
            layer = -1 if i == last else min(i, len(SCALE_KERNELS) - 2)  # the paper's, the last one 5-tap
            kernel, stride = SCALE_KERNELS[layer], SCALE_STRIDES[layer]
            axes = ("patch" if i == 0 else "embed", "mlp")
            x = leaky_relu(Conv(channels, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups,
                                axes=axes, name=f"conv_{i}", **dtypes)(x))
            features.append(x)
        x = Conv(1, 3, padding=1, axes=("embed", "patch"), name="conv_post", **dtypes)(x)
        features.append(x)
        return x.reshape(x.shape[0], -1).astype(jnp.float32), features


class Discriminator(nn.Module):
    """waveform (B, T) -> [(scores, feature maps)] of every period, then every scale."""
    config: HifiGanConfig

    @nn.compact
    def __call__(self, wave):
        cfg = self.config
        outputs = [PeriodDiscriminator(cfg, p, name=f"period_{p}")(wave) for p in cfg.periods]
        x = wave[..., None]
        for i in range(cfg.num_scales):
            if i:
                x = nn.avg_pool(x, (4,), strides=(2,), padding=((2, 2),), count_include_pad=True)
            outputs.append(ScaleDiscriminator(cfg, name=f"scale_{i}")(x))
        return outputs


class HifiGan(nn.Module):
    """Both networks, for initialisation: params {"generator": ..., "discriminator": ...}."""
    config: HifiGanConfig

    @nn.compact
    def __call__(self, mel, wave):
        return Generator(self.config, name="generator")(mel), Discriminator(self.config, name="discriminator")(wave)


# ------------------------------------------------------------------------------ losses


@functools.lru_cache(maxsize=8)
def _mel_constants(mel_config) -> tuple[np.ndarray, np.ndarray]:
    import librosa

    basis = librosa.filters.mel(sr=mel_config.sample_rate, n_fft=mel_config.n_fft, n_mels=mel_config.num_mels,
                                fmin=mel_config.fmin, fmax=mel_config.fmax)
    window = librosa.filters.get_window("hann", mel_config.win_length, fftbins=True)
    window = librosa.util.pad_center(window, size=mel_config.n_fft)
    return basis.astype(np.float32), window.astype(np.float32)


def log_mel(wave, mel_config):
    """`vocoder.mel_spectrogram` in JAX, differentiable and batched: (B, T) -> (B, 1 + T//hop, mels).
    `mel_config` is a `vocoder.MelConfig` (centred frames, zero padding, as librosa's stft)."""
    basis, window = _mel_constants(mel_config)
    n_fft, hop = mel_config.n_fft, mel_config.hop_length
    padded = jnp.pad(wave.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)))
    frames = 1 + wave.shape[-1] // hop
    index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spectrum = jnp.fft.rfft(padded[:, index] * window, axis=-1)
    magnitude = jnp.sqrt(jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2 + 1e-9)  # finite gradient at 0
    return jnp.log(jnp.maximum(magnitude @ basis.T, mel_config.log_floor))


def discriminator_loss(real_scores, fake_scores):
    return sum(jnp.mean((1.0 - r) ** 2) + jnp.mean(f ** 2) for r, f in zip(real_scores, fake_scores))


def adversarial_loss(fake_scores):
    return sum(jnp.mean((1.0 - f) ** 2) for f in fake_scores)


def feature_matching_loss(real_features, fake_features):
    return sum(jnp.mean(jnp.abs(r - f)) for rs, fs in zip(real_features, fake_features) for r, f in zip(rs, fs))


def _split(outputs, batch: int):
    """Discriminator outputs on [real; fake] -> (real scores, fake scores, real maps, fake maps)."""
    scores = [s for s, _ in outputs]
    features = [fs for _, fs in outputs]
    return ([s[:batch] for s in scores], [s[batch:] for s in scores],
            [[f[:batch] for f in fs] for fs in features], [[f[batch:] for f in fs] for fs in features])


def d_loss(discriminator: Discriminator, d_params, wave, fake):
    """The least-squares discriminator loss on real `wave` and generated `fake` (B, T)."""
    real_scores, fake_scores, _, _ = _split(discriminator.apply({"params": d_params},
                                                                 jnp.concatenate([wave, fake])), wave.shape[0])
    loss = discriminator_loss(real_scores, fake_scores)
    return loss, {"d_loss": loss}


def g_loss(discriminator: Discriminator, d_params, wave, fake, mel_config, adversarial_weight=1.0):
    """The generator's loss on its output `fake` (B, T): adversarial + feature_weight·feature
    matching + mel_weight·mel L1, the first two times `adversarial_weight` (0: mel only)."""
    cfg = discriminator.config
    outputs = discriminator.apply({"params": d_params}, jnp.concatenate([jax.lax.stop_gradient(wave), fake]))
    real_scores, fake_scores, real_maps, fake_maps = _split(outputs, wave.shape[0])
    adversarial = adversarial_loss(fake_scores)
    features = feature_matching_loss(jax.lax.stop_gradient(real_maps), fake_maps)
    mel = jnp.mean(jnp.abs(log_mel(wave, mel_config) - log_mel(fake, mel_config)))
    loss = adversarial_weight * (adversarial + cfg.feature_weight * features) + cfg.mel_weight * mel
    return loss, {"g_loss": loss, "g_adversarial": adversarial, "g_features": features, "mel_l1": mel}


# --------------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=None)
def _jitted_generator(config: HifiGanConfig):
    return jax.jit(lambda params, mel: Generator(config).apply({"params": params}, mel))


class HifiGanVocoder:
    """A trained generator as a vocoder: `__call__(log_mel)` as `vocoder.griffin_lim` (default
    length (frames-1)·hop), `stream()` as `vocoder.StreamingGriffinLim`. One compile per
    distinct number of frames."""

    def __init__(self, config: HifiGanConfig, params):
        self.config, self.params = config, params
        self._apply = _jitted_generator(config)

    def generate(self, log_mel) -> np.ndarray:
        """(frames, mels) -> (frames·hop,) float32."""
        log_mel = np.asarray(log_mel, np.float32)
        if not len(log_mel):
            return np.zeros((0,), np.float32)
        return np.asarray(self._apply(self.params, log_mel[None]))[0]

    def __call__(self, log_mel, *, length: int | None = None) -> np.ndarray:
        wave = self.generate(log_mel)
        length = max(len(log_mel) - 1, 0) * self.config.hop_length if length is None else length
        return np.pad(wave, (0, max(0, length - len(wave))))[:length]

    def stream(self, context_frames: int | None = None) -> "StreamingHifiGan":
        return StreamingHifiGan(self, context_frames)


class StreamingHifiGan:
    """The generator over mel chunks as they come; `push` returns the samples now final.

    A frame's samples are released once `context` frames after it have arrived, each chunk
    generated with `context` frames before it too; with `context` >= `receptive_frames` the
    samples joined equal the one-shot `HifiGanVocoder` output (up to float roundoff), and, as
    there, (frames-1)·hop samples in all."""

    def __init__(self, vocoder: HifiGanVocoder, context_frames: int | None = None):
        self.vocoder, self.hop = vocoder, vocoder.config.hop_length
        self.context = receptive_frames(vocoder.config) if context_frames is None else int(context_frames)
        self.mel = np.zeros((0, vocoder.config.num_mels), np.float32)  # the frames kept (context + pending)
        self.first = 0  # utterance index of self.mel[0]
        self.done = 0  # frames whose samples were released

    def push(self, log_mel) -> np.ndarray:
        self.mel = np.concatenate([self.mel, np.asarray(log_mel, np.float32)])
        return self._release(self.first + len(self.mel) - self.context)

    def flush(self) -> np.ndarray:
        total = self.first + len(self.mel)
        out = self._release(total)
        return out[:max(0, len(out) - self.hop)] if total else out  # the last frame's hop: (frames-1)·hop

    def _release(self, upto: int) -> np.ndarray:
        if upto <= self.done:
            return np.zeros((0,), np.float32)
        wave = self.vocoder.generate(self.mel)
        start = self.done - self.first
        out = wave[start * self.hop:(upto - self.first) * self.hop]
        self.done = upto
        keep = max(0, self.done - self.context - self.first)
        self.mel, self.first = self.mel[keep:], self.first + keep
        return out


def load(workdir: str) -> HifiGanVocoder:
    """The generator of an m2omni-train-vocoder run: `<workdir>/hifigan.json` (its model config)
    and the latest checkpoint's `params/generator`."""
    from m2omni_jax.training import checkpointing

    workdir = os.path.expanduser(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing: {workdir} is not an m2omni-train-vocoder run")
    with open(config_path) as f:
        config = HifiGanConfig(**json.load(f))
    mel = jnp.zeros((1, 4, config.num_mels))
    shapes = nn.unbox(jax.eval_shape(Generator(config).init, jax.random.key(0), mel)["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"generator": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)}
    path = os.path.join(workdir, "checkpoints")
    params, missing = checkpointing.load_params(path, abstract, include=("^generator/",))
    if missing:
        raise ValueError(f"{path}: the generator parameters {missing[:5]} are not in the checkpoint")
    return HifiGanVocoder(config, params["generator"])

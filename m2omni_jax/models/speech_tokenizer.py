"""Speech tokenizer: discrete speech tokens that carry content, in the spirit of CosyVoice's S3.

    fbank (B, F, 80) at 100 frames/s ─ stack `frames_per_token` frames (4: 25 tokens/s)
      ─ ×√width + sinusoidal positions ─ SAN-M blocks (models/audio.py) ─ LayerNorm
      ─ Dense to len(levels) ─ FSQ ─ codes (B, T) in [0, prod(levels))
      ─ Dense back to width ─ SAN-M blocks ─ LayerNorm ─ CTC head: `ctc_frames_per_token`
        character distributions per token ─ CTC loss against the transcript

The quantiser sits inside a speech-recognition encoder trained with the ASR objective
alone (as S3 tokens sit inside an ASR model), so the codes keep what the transcript needs.
FSQ (finite scalar quantisation, Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple"): each of the d = len(levels) dimensions is bounded by tanh to L_i values and
rounded, with straight-through gradients (the rounding's gradient is the identity); the
code is the mixed-radix number of the d digits, so the codebook is prod(levels) with no
codebook parameters, no commitment loss and no dead codes to revive.

The CTC head reads `ctc_frames_per_token` frames per token: at 25 tokens/s one CTC frame
per token is too few for fast speech's characters and the blanks between repeated letters.

Padding frames (at or past a clip's length) never influence valid ones: the SAN-M blocks
mask them, everything else is per frame or per token.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models import layers
from m2omni_jax.models.audio import ACTIVATION, AudioConfig, sanm_blocks, sinusoidal_positions
from m2omni_jax.models.layers import LayerNorm, kernel_init, to_dtype, zeros_init

BLANK_ID = 0  # CTC blank; characters are 1 + their index in `alphabet`
FBANK_FRAMES_PER_SECOND = 100  # data/audio.py's 10 ms hop


@dataclasses.dataclass(frozen=True)
class SpeechTokenizerConfig:
    levels: tuple = (8, 5, 5, 5)  # FSQ levels per dimension: codebook prod(levels) (CosyVoice: 4096 = 8^4)
    num_mel_bins: int = 80  # the fbank of data/audio.py
    frames_per_token: int = 4  # 10 ms frames per token: 4 -> 25 tokens/s, 2 -> 50
    width: int = 128
    num_heads: int = 4
    mlp_dim: int = 256
    fsmn_kernel: int = 11
    encoder_depth: int = 3  # SAN-M blocks before the quantiser (the input block included)
    decoder_depth: int = 1  # SAN-M blocks between the quantiser and the CTC head
    ctc_frames_per_token: int = 2
    alphabet: str = " abcdefghijklmnopqrstuvwxyz'"  # CTC labels; transcripts are normalised to it
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan: bool = True
    attention_implementation: str = layers.DEFAULT_ATTENTION

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"speech_tokenizer levels {self.levels} must be a non-empty list of ints >= 2")
        if min(self.frames_per_token, self.ctc_frames_per_token, self.encoder_depth, self.decoder_depth) < 1:
            raise ValueError("speech_tokenizer frames_per_token, ctc_frames_per_token and depths must be >= 1")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError(f"speech_tokenizer alphabet {self.alphabet!r} must be non-empty, without repeats")
        self.sanm(1)  # the SAN-M fields' own checks

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def num_labels(self) -> int:
        return len(self.alphabet) + 1  # + blank

    @property
    def tokens_per_second(self) -> float:
        return FBANK_FRAMES_PER_SECOND / self.frames_per_token

    def sanm(self, depth: int) -> AudioConfig:
        """The SAN-M blocks' config (models/audio.py)."""
        return AudioConfig(input_dim=self.num_mel_bins * self.frames_per_token, width=self.width, depth=depth,
                           num_heads=self.num_heads, mlp_dim=self.mlp_dim, fsmn_kernel=self.fsmn_kernel,
                           dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                           scan=self.scan, attention_implementation=self.attention_implementation)

    @classmethod
    def from_config(cls, cfg) -> "SpeechTokenizerConfig":
        return dataclass_from_config(cls, cfg, "speech_tokenizer.model")


# ----------------------------------------------------------------------------- FSQ


def round_ste(x):
    """Rounds in the forward pass; the identity's gradient in the backward pass."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fsq(z, levels: Sequence[int]):
    """z (..., d) -> (quantised values in [-1, 1] (..., d), codes (...,) int32).

    Dimension i is bounded to (-L_i/2, L_i/2) (shifted half a step for even L_i, so that
    rounding gives exactly L_i integers), rounded straight-through and divided by L_i // 2.
    """
    levels_arr = jnp.asarray(levels, jnp.float32)
    half_l = (levels_arr - 1) * (1 + 1e-3) / 2
    offset = jnp.where(jnp.asarray(levels) % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half_l)
    digits = round_ste(jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset)  # in [-(L//2), (L-1)//2]
    half_width = jnp.asarray([lv // 2 for lv in levels], jnp.float32)
    return digits / half_width, digits_to_codes(digits + half_width, levels)


def _basis(levels: Sequence[int]) -> np.ndarray:
    return np.cumprod([1] + list(levels[:-1])).astype(np.int32)


def digits_to_codes(digits, levels: Sequence[int]):
    """Non-negative digits (..., d) -> mixed-radix codes (...,)."""
    return jnp.sum(jnp.round(digits).astype(jnp.int32) * _basis(levels), axis=-1)


def codes_to_values(codes, levels: Sequence[int]):
    """codes (...,) -> the quantised values (..., d) in [-1, 1] `fsq` gives for them."""
    digits = (jnp.asarray(codes)[..., None] // _basis(levels)) % jnp.asarray(levels)
    half_width = jnp.asarray([lv // 2 for lv in levels], jnp.float32)
    return (digits.astype(jnp.float32) - half_width) / half_width


# ---------------------------------------------------------------------------- model


def stack_frames(fbank, lengths, frames_per_token: int):
    """(B, F, bins), lengths (B,) -> (B, ceil(F / k), k·bins) and token lengths ceil(len / k);
    frames at or past a clip's length are zeros (also inside its last, partial token)."""
    batch, frames, bins = fbank.shape
    pad = -frames % frames_per_token
    valid = jnp.arange(frames)[None, :, None] < jnp.asarray(lengths)[:, None, None]
    fbank = jnp.pad(jnp.where(valid, fbank, 0.0), ((0, 0), (0, pad), (0, 0)))
    stacked = fbank.reshape(batch, (frames + pad) // frames_per_token, frames_per_token * bins)
    return stacked, -(-jnp.asarray(lengths) // frames_per_token)


class Encoder(nn.Module):
    """Stacked fbank -> FSQ inputs (B, T, len(levels)): the SAN-M blocks below the quantiser."""
    config: SpeechTokenizerConfig

    @nn.compact
    def __call__(self, x, token_mask):
        cfg = self.config
        sanm = cfg.sanm(cfg.encoder_depth)
        x = x.astype(jnp.float32) * cfg.width ** 0.5 + sinusoidal_positions(x.shape[1], x.shape[2])
        x = sanm_blocks(sanm, nn.with_logical_constraint(x.astype(to_dtype(cfg.dtype)), ACTIVATION), token_mask)
        x = LayerNorm(sanm.layer_norm_epsilon, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                      name="final_norm")(x)
        return layers.Dense(len(cfg.levels), kernel_init=kernel_init(("embed", "norm")), bias_init=zeros_init(("norm",)),
                        dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), name="to_fsq")(x)


class CTCHead(nn.Module):
    """Quantised values (B, T, d) -> CTC logits (B, T·ctc_frames_per_token, num_labels)."""
    config: SpeechTokenizerConfig

    @nn.compact
    def __call__(self, values, token_mask):
        cfg = self.config
        sanm = cfg.sanm(cfg.decoder_depth)
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        x = layers.Dense(cfg.width, kernel_init=kernel_init(("norm", "embed")), bias_init=zeros_init(("embed",)),
                     name="from_fsq", **dtypes)(values)
        x = x + sinusoidal_positions(x.shape[1], cfg.width).astype(x.dtype)
        x = sanm_blocks(sanm, nn.with_logical_constraint(x, ACTIVATION), token_mask)
        x = LayerNorm(sanm.layer_norm_epsilon, name="final_norm", **dtypes)(x)
        up = cfg.ctc_frames_per_token
        logits = layers.Dense(up * cfg.num_labels, kernel_init=kernel_init(("embed", "vocab")),
                          bias_init=zeros_init(("vocab",)), name="ctc", **dtypes)(x)
        return logits.reshape(x.shape[0], x.shape[1] * up, cfg.num_labels).astype(jnp.float32)


class SpeechTokenizer(nn.Module):
    """`__call__` (training, init with it): fbank -> CTC logits, codes; `encode`: fbank -> codes."""
    config: SpeechTokenizerConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.head = CTCHead(self.config)

    def _quantise(self, fbank, lengths):
        stacked, token_lengths = stack_frames(fbank, lengths, self.config.frames_per_token)
        token_mask = jnp.arange(stacked.shape[1])[None, :] < token_lengths[:, None]
        values, codes = fsq(self.encoder(stacked, token_mask), self.config.levels)
        return values, codes, token_mask

    def __call__(self, fbank, lengths):
        """fbank (B, F, bins), lengths (B,) valid frames -> dict of logits (B, T·u, labels),
        logit_mask (B, T·u), codes (B, T), token_mask (B, T)."""
        values, codes, token_mask = self._quantise(fbank, lengths)
        logits = self.head(values, token_mask)
        logit_mask = jnp.repeat(token_mask, self.config.ctc_frames_per_token, axis=1)
        return {"logits": logits, "logit_mask": logit_mask, "codes": codes, "token_mask": token_mask}

    def encode(self, fbank, lengths):
        """-> (codes (B, T) int32, token_mask (B, T)); codes past a clip's tokens are 0."""
        _, codes, token_mask = self._quantise(fbank, lengths)
        return jnp.where(token_mask, codes, 0), token_mask

    def decode_codes(self, codes, token_mask):
        """The CTC logits of given codes (B, T): the tokenizer's ASR of a code sequence."""
        return self.head(codes_to_values(codes, self.config.levels), token_mask)


# ------------------------------------------------------------------------- training


def ctc_loss(model: SpeechTokenizer, params, batch):
    """CTC negative log-likelihood per transcript character, and metrics.

    batch: fbank (B, F, bins), fbank_lengths (B,), labels (B, L) int (0-padded),
    label_lengths (B,).
    """
    out = model.apply(params, batch["fbank"], batch["fbank_lengths"])
    labels = batch["labels"]
    label_pad = (jnp.arange(labels.shape[1])[None, :] >= batch["label_lengths"][:, None]).astype(jnp.float32)
    per_clip = optax.ctc_loss(out["logits"], 1.0 - out["logit_mask"].astype(jnp.float32), labels, label_pad,
                              blank_id=BLANK_ID)
    num_chars = jnp.maximum(jnp.sum(batch["label_lengths"]), 1)
    loss = jnp.sum(per_clip) / num_chars
    codebook = model.config.codebook_size
    used = jnp.zeros((codebook,), jnp.int32).at[out["codes"].reshape(-1)].add(out["token_mask"].reshape(-1))
    return loss, {"ctc_loss": loss, "codes_used": jnp.sum(used > 0) / codebook}


# ----------------------------------------------------------------------------- text


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def spell_number(n: int) -> str:
    """English words of 0 <= n < 1000 (42 -> "forty two"), as a voice reads them; larger
    numbers digit by digit."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else f" {_ONES[n % 10]}")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + ("" if n % 100 == 0 else f" {spell_number(n % 100)}")
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize_text(text: str, alphabet: str) -> str:
    """Lower-cased; numbers spelled out when `alphabet` has no digits (speech says "two", the
    text may write "2"); characters outside `alphabet` as spaces, runs of spaces as one."""
    text = text.lower()
    if not any(c.isdigit() for c in alphabet):
        text = re.sub(r"\d+", lambda m: f" {spell_number(int(m.group()))} ", text)
    kept = "".join(c if c in alphabet else " " for c in text)
    return " ".join(kept.split()) if " " in alphabet else kept.replace(" ", "")


def text_to_labels(text: str, alphabet: str) -> list[int]:
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    return [index[c] for c in normalize_text(text, alphabet)]


def greedy_ctc(logits, logit_mask, alphabet: str) -> list[str]:
    """Best path: argmax per frame, repeats merged, blanks dropped; one string per row."""
    best = np.asarray(jnp.argmax(logits, axis=-1))
    texts = []
    for row, mask in zip(best, np.asarray(logit_mask)):
        row = row[mask.astype(bool)]
        keep = (row != BLANK_ID) & np.concatenate([[True], row[1:] != row[:-1]])
        texts.append("".join(alphabet[i - 1] for i in row[keep]).strip())
    return texts

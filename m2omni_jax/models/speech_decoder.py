"""Flow-matching speech decoder: discrete speech tokens -> 80-bin log-mel, as CosyVoice.

Token side: embedding -> look-ahead conv (token i reads tokens i … i+k) -> chunk-causal
transformer -> Dense to the mel bins -> each token repeated `token_mel_ratio` times: `mu`,
one condition vector per mel frame (default 25 tokens/s -> 50 frames/s, the 16 kHz,
hop-320 mel of `models/vocoder.py`).

Velocity estimator: a transformer over the frames [speaker-prompt mel (P) | target (T·r)]
whose input per frame is concat(x_t, mu, cond); `cond` is the prompt mel on the prompt
frames and 0 elsewhere, `mu` is 0 on the prompt frames. The timestep embedding shifts and
scales every LayerNorm's output (adaLN, as DiT). RoPE positions in both transformers.

Rectified flow (CosyVoice's conditional flow matching), t from noise (0) to data (1):
    x_t = (1 - (1 - σ_min)·t)·x_0 + t·x_1,   x_0 ~ N(0, I),  x_1 the target log-mel,
    u   = x_1 - (1 - σ_min)·x_0              (dx_t/dt, what the estimator regresses);
training t is U(0, 1) warped by the schedule ("cosine": 1 - cos(πt/2), denser near the
noise), and `sample` integrates dx/dt = v with Euler on the same warped grid. Classifier-free
guidance: training zeroes mu and cond of an example with probability `cfg_dropout`;
sampling uses v_u + w·(v_c - v_u) (w = 1: conditional; CosyVoice's (1+λ)v_c - λv_u is
w = 1 + λ). The prompt: training uses a random prefix (whole tokens, up to
`max_prompt_fraction`) of the utterance as cond and masks its frames out of the loss.

Streaming. Attention is chunk-causal in both transformers: a token (frame) of chunk c
attends to the prompt and to chunks <= c, never later ones; the k-token look-ahead lives
only in the input conv. So chunk c's mel depends on tokens < (c+1)·C + k and on noise of
frames up to its own, in one-shot and in streamed decoding alike. `StreamDecoder` keeps,
for every Euler step and layer, the keys and values of the frames already decoded (and
the encoder's of the tokens), so a chunk costs only its own frames and one compile serves
every chunk. Chunks joined equal the one-shot `sample` up to float roundoff (tested at
atol 1e-4 on values of order 1); the overlap-add (cross-fade) at chunk boundaries is
needed only by the vocoder, where Griffin–Lim runs per chunk (`vocoder.StreamingGriffinLim`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models import layers
from m2omni_jax.models.layers import (LayerNorm, MergeHeads, SplitHeads, kernel_init, maybe_remat,
                                     to_dtype, zeros_init)
from m2omni_jax.models.rope import apply_rotary, rope_angles

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")
SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class SpeechDecoderConfig:
    codebook_size: int = 64  # speech token vocabulary
    num_mels: int = 80
    token_mel_ratio: int = 2  # mel frames per token: 25 tokens/s -> 50 frames/s (vocoder.MelConfig)
    width: int = 64
    num_heads: int = 4
    mlp_dim: int = 128
    encoder_depth: int = 1
    estimator_depth: int = 2
    lookahead_tokens: int = 3  # k: token i's features read tokens i … i+k
    chunk_tokens: int = 8  # attention chunk in tokens (the streaming unit); 0 = full attention
    cfg_dropout: float = 0.2  # training: probability of zeroing an example's condition
    prompt_prob: float = 0.5  # training: probability of a speaker-prompt prefix
    max_prompt_fraction: float = 0.3  # of the utterance's tokens
    sigma_min: float = 1e-6
    time_schedule: str = "cosine"  # "linear" | "cosine": training t and the Euler grid
    rope_theta: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan: bool = True
    attention_implementation: str = layers.DEFAULT_ATTENTION

    def __post_init__(self):
        layers.check_attention_implementation(self.attention_implementation,
                                              "model.speech_decoder.attention_implementation")
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(f"speech decoder width {self.width} must be num_heads {self.num_heads} "
                             "× an even head_dim (RoPE)")
        if min(self.encoder_depth, self.estimator_depth, self.token_mel_ratio) < 1:
            raise ValueError("speech decoder depths and token_mel_ratio must be >= 1")
        if self.lookahead_tokens < 0 or self.chunk_tokens < 0:
            raise ValueError("speech decoder lookahead_tokens and chunk_tokens must be >= 0")
        if self.time_schedule not in SCHEDULES:
            raise ValueError(f"speech decoder time_schedule {self.time_schedule!r} is not one of {SCHEDULES}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def chunk_frames(self) -> int:
        return self.chunk_tokens * self.token_mel_ratio

    @classmethod
    def cosyvoice(cls, **overrides) -> "SpeechDecoderConfig":
        """CosyVoice-2-sized: 6 encoder + 12 estimator blocks of 512, 6561 FSQ codes."""
        defaults = dict(codebook_size=6561, width=512, num_heads=8, mlp_dim=2048, encoder_depth=6,
                        estimator_depth=12, chunk_tokens=25, remat_policy="full")
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_config(cls, cfg) -> "SpeechDecoderConfig":
        """Builds from a ConfigDict / mapping, naming any field it does not know."""
        return dataclass_from_config(cls, cfg, "model.speech_decoder")


# ----------------------------------------------------------------------------- masks


def chunk_ids(length: int, start, chunk: int):
    """(B, length) chunk index of each position: -1 before `start` (B,) (the prompt), then
    (i - start) // chunk; everything after the prompt is chunk 0 when chunk == 0."""
    rel = jnp.arange(length)[None, :] - jnp.asarray(start)[:, None]
    return jnp.where(rel < 0, -1, rel // chunk if chunk else 0)


def chunk_causal_mask(ids, valid):
    """(B, L, L): query i may read key j iff j is valid and its chunk is not later than i's."""
    return valid[:, None, :] & (ids[:, None, :] <= ids[:, :, None])


def warp_time(u, schedule: str):
    """Uniform u in [0, 1] -> t; "cosine": 1 - cos(πu/2), denser near the noise (t = 0)."""
    return 1.0 - jnp.cos(0.5 * jnp.pi * u) if schedule == "cosine" else u


def time_grid(num_steps: int, schedule: str):
    """num_steps + 1 times from 0 (noise) to 1 (data)."""
    return warp_time(jnp.linspace(0.0, 1.0, num_steps + 1), schedule)


# ---------------------------------------------------------------------------- modules


def modulation(cfg: SpeechDecoderConfig, style, count: int, name: str):
    """`count` (B, 1, width) shifts/scales from style (B, mlp_dim), zero at init; zeros if style is None."""
    if style is None:
        return [0.0] * count
    out = layers.Dense(count * cfg.width, kernel_init=zeros_init(("mlp", "embed")), bias_init=zeros_init(("embed",)),
                   name=name, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))(nn.silu(style))
    return jnp.split(out[:, None, :], count, axis=-1)


class Block(nn.Module):
    """Pre-LN transformer block whose attention also reads cached keys/values `past`.

    x (B, L, width); angles (B, L, head_dim/2); mask (B, L, S + L) over [past | new];
    past (k, v) each (B, S, heads, head_dim), already rotated; style (B, mlp_dim) or None:
    the timestep embedding, which shifts and scales both norms' outputs (adaLN, as DiT).
    -> (x, (k, v) of the new L).
    """
    config: SpeechDecoderConfig

    @nn.compact
    def __call__(self, x, angles, mask, past, style):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        shift1, scale1, shift2, scale2 = modulation(cfg, style, 4, name="modulation")
        h = LayerNorm(name="attention_norm", **dtypes)(x) * (1 + scale1) + shift1
        q, k, v = (nn.with_logical_constraint(SplitHeads(cfg.num_heads, cfg.head_dim, name=n, **dtypes)(h),
                                              ACTIVATION_HEADS) for n in ("query", "key", "value"))
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        keys = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        attended = layers.dot_product_attention(q, keys, values, mask[:, None],
                                                implementation=cfg.attention_implementation)
        x = x + MergeHeads(cfg.width, name="out", **dtypes)(nn.with_logical_constraint(attended, ACTIVATION_HEADS))
        h = layers.Dense(cfg.mlp_dim, kernel_init=kernel_init(("embed", "mlp")), bias_init=zeros_init(("mlp",)),
                     name="fc1", **dtypes)(LayerNorm(name="mlp_norm", **dtypes)(x) * (1 + scale2) + shift2)
        h = nn.gelu(nn.with_logical_constraint(h, ACTIVATION_MLP))
        x = x + layers.Dense(cfg.width, kernel_init=kernel_init(("mlp", "embed")), bias_init=zeros_init(("embed",)),
                         name="fc2", **dtypes)(h)
        return nn.with_logical_constraint(x, ACTIVATION), (k, v)


class Stack(nn.Module):
    """`depth` Blocks (scanned unless config.scan is False); past (k, v) each (depth, B, S, H, D)."""
    config: SpeechDecoderConfig
    depth: int

    @nn.compact
    def __call__(self, x, positions, mask, past, style=None):
        cfg = self.config
        angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        block = maybe_remat(Block, cfg.remat_policy)
        if cfg.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            return stack(cfg, name="blocks")(x, angles, mask, past, style)
        new = []
        for i in range(self.depth):
            x, kv = block(cfg, name=f"block_{i}")(x, angles, mask, jax.tree.map(lambda a: a[i], past), style)
            new.append(kv)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new)


class TokenEncoder(nn.Module):
    """tokens, valid (B, L + k): L tokens and their k look-ahead -> (mu (B, L, num_mels), new kv)."""
    config: SpeechDecoderConfig

    @nn.compact
    def __call__(self, tokens, valid, positions, mask, past):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        x = nn.Embed(cfg.codebook_size, cfg.width, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), name="embed", **dtypes)(tokens)
        x = x * valid[..., None].astype(x.dtype)  # padding and prompt-prefix tokens read as zeros
        # Look-ahead: output i reads inputs i … i+k ("VALID" over L + k inputs gives L outputs).
        h = nn.Conv(cfg.mlp_dim, (cfg.lookahead_tokens + 1,), padding="VALID", name="lookahead",
                    kernel_init=kernel_init(("conv", "embed", "mlp"), in_axis=(0, 1), out_axis=2),
                    bias_init=zeros_init(("mlp",)), **dtypes)(x)
        x = x[:, :h.shape[1]] + layers.Dense(cfg.width, kernel_init=kernel_init(("mlp", "embed")),
                                         bias_init=zeros_init(("embed",)), name="lookahead_out",
                                         **dtypes)(nn.gelu(h))
        x, kv = Stack(cfg, cfg.encoder_depth, name="stack")(nn.with_logical_constraint(x, ACTIVATION),
                                                            positions, mask, past)
        x = LayerNorm(name="final_norm", **dtypes)(x)
        mu = layers.Dense(cfg.num_mels, kernel_init=kernel_init(("embed", "patch")), bias_init=zeros_init(("patch",)),
                      name="to_mel", **dtypes)(x)
        return mu, kv


def timestep_embedding(t, dim: int):
    """(B,) t in [0, 1] -> (B, dim) sinusoids of 1000·t (periods up to 10^4)."""
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
    angles = 1000.0 * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class VelocityEstimator(nn.Module):
    """x, mu, cond (B, L, num_mels), t (B,) -> (velocity (B, L, num_mels), new kv)."""
    config: SpeechDecoderConfig

    @nn.compact
    def __call__(self, x, mu, cond, t, positions, mask, past):
        cfg = self.config
        dtypes = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))
        dense = lambda n, axes, name: layers.Dense(n, kernel_init=kernel_init(axes), bias_init=zeros_init(axes[1:]),  # noqa: E731
                                               name=name, **dtypes)
        h = dense(cfg.width, ("patch", "embed"), "input")(jnp.concatenate([x, mu, cond], axis=-1))
        style = timestep_embedding(jnp.broadcast_to(t, x.shape[:1]).astype(jnp.float32), cfg.width)
        style = dense(cfg.mlp_dim, ("embed", "mlp"), "time_in")(style)  # each modulation applies silu
        h = nn.with_logical_constraint(h, ACTIVATION)
        h, kv = Stack(cfg, cfg.estimator_depth, name="stack")(h, positions, mask, past, style)
        shift, scale = modulation(cfg, style, 2, name="final_modulation")
        h = LayerNorm(name="final_norm", **dtypes)(h) * (1 + scale) + shift
        return dense(cfg.num_mels, ("embed", "patch"), "output")(h).astype(jnp.float32), kv


class SpeechDecoder(nn.Module):
    """The two towers; `__call__` is the training forward (init with it), `condition` and
    `velocity` the one-shot halves, `encode` and `estimate` the cached (streaming) ones."""
    config: SpeechDecoderConfig

    def setup(self):
        self.encoder = TokenEncoder(self.config)
        self.estimator = VelocityEstimator(self.config)

    def _empty_past(self, depth, batch):
        shape = (depth, batch, 0, self.config.num_heads, self.config.head_dim)
        return jnp.zeros(shape, to_dtype(self.config.dtype)), jnp.zeros(shape, to_dtype(self.config.dtype))

    def __call__(self, tokens, token_mask, token_start, x_t, t, cond, frame_mask, frame_start, keep):
        """Velocity (B, F, num_mels) of x_t; mu and cond are zeroed where `keep` (B,) is False."""
        keep = keep[:, None, None]
        mu = self.condition(tokens, token_mask, token_start, x_t.shape[1], frame_start)
        return self.velocity(x_t, mu * keep, cond * keep, t, frame_mask, frame_start)

    def condition(self, tokens, token_mask, token_start, num_frames, frame_start):
        """mu (B, num_frames, num_mels): tokens at or past `token_start` (B,) encoded,
        upsampled and placed at the last T·r frames; 0 before `frame_start` (B,)."""
        cfg = self.config
        batch, length = tokens.shape
        valid = token_mask & (jnp.arange(length)[None, :] >= token_start[:, None])
        mask = chunk_causal_mask(chunk_ids(length, token_start, cfg.chunk_tokens), valid)
        pad = ((0, 0), (0, cfg.lookahead_tokens))
        mu, _ = self.encoder(jnp.pad(tokens, pad), jnp.pad(valid, pad), jnp.arange(length)[None, :], mask,
                             self._empty_past(cfg.encoder_depth, batch))
        mu = jnp.repeat(mu, cfg.token_mel_ratio, axis=1)
        mu = jnp.pad(mu, ((0, 0), (num_frames - mu.shape[1], 0), (0, 0)))
        return jnp.where((jnp.arange(num_frames)[None, :] >= frame_start[:, None])[..., None], mu, 0)

    def velocity(self, x, mu, cond, t, frame_mask, frame_start):
        cfg = self.config
        length = x.shape[1]
        mask = chunk_causal_mask(chunk_ids(length, frame_start, cfg.chunk_frames), frame_mask)
        v, _ = self.estimator(x, mu, cond, t, jnp.arange(length)[None, :], mask,
                              self._empty_past(cfg.estimator_depth, x.shape[0]))
        return v

    def encode(self, tokens, valid, positions, mask, past):
        return self.encoder(tokens, valid, positions, mask, past)

    def estimate(self, x, mu, cond, t, positions, mask, past):
        return self.estimator(x, mu, cond, t, positions, mask, past)


# ------------------------------------------------------------------------- training


def flow_matching_target(x1, noise, t, sigma_min: float):
    """(x_t, u) of the rectified flow above; t (B,) broadcast over frames and bins."""
    t = t[:, None, None]
    return (1.0 - (1.0 - sigma_min) * t) * noise + t * x1, x1 - (1.0 - sigma_min) * noise


def flow_matching_loss(model: SpeechDecoder, params, batch, rng, *, t=None, noise=None):
    """Mean squared velocity error over the valid, non-prompt frames and all bins.

    batch: tokens (B, T) int, token_mask (B, T) bool, mel (B, >= T·r, num_mels) log-mel
    aligned to the tokens (frames past T·r are dropped). `t` (B,) and `noise` override the
    random draws. -> (loss, metrics).
    """
    cfg = model.config
    tokens, token_mask = batch["tokens"], batch["token_mask"].astype(bool)
    batch_size, length = tokens.shape
    num_frames = length * cfg.token_mel_ratio
    mel = batch["mel"][:, :num_frames].astype(jnp.float32)
    k_t, k_noise, k_keep, k_prompt, k_len = jax.random.split(rng, 5)
    if t is None:
        t = warp_time(jax.random.uniform(k_t, (batch_size,)), cfg.time_schedule)
    if noise is None:
        noise = jax.random.normal(k_noise, mel.shape)
    x_t, target = flow_matching_target(mel, noise, t, cfg.sigma_min)

    # A speaker-prompt prefix of whole tokens: its mel is the condition, its frames no loss.
    max_prompt = jnp.floor(cfg.max_prompt_fraction * token_mask.sum(1)).astype(jnp.int32)
    prompt_tokens = jnp.floor(jax.random.uniform(k_len, (batch_size,)) * (max_prompt + 1)).astype(jnp.int32)
    prompt_tokens = jnp.where(jax.random.bernoulli(k_prompt, cfg.prompt_prob, (batch_size,)), prompt_tokens, 0)
    prompt_frames = prompt_tokens * cfg.token_mel_ratio
    in_prompt = jnp.arange(num_frames)[None, :] < prompt_frames[:, None]
    cond = jnp.where(in_prompt[..., None], mel, 0.0)
    frame_mask = jnp.repeat(token_mask, cfg.token_mel_ratio, axis=1)
    keep = ~jax.random.bernoulli(k_keep, cfg.cfg_dropout, (batch_size,))

    v = model.apply(params, tokens, token_mask, prompt_tokens, x_t, t, cond, frame_mask, prompt_frames, keep)
    weight = (frame_mask & ~in_prompt).astype(jnp.float32)[..., None]
    loss = jnp.sum(weight * (v - target) ** 2) / jnp.maximum(jnp.sum(weight) * cfg.num_mels, 1.0)
    return loss, {"flow_loss": loss, "prompt_frames": jnp.mean(prompt_frames.astype(jnp.float32))}


# ------------------------------------------------------------------------- sampling


def euler(velocity, x, num_steps: int, schedule: str = "linear", aux=None):
    """Integrates dx/dt = v from t=0 to 1 on `time_grid`; velocity(x, t, step, aux) -> (v, aux).

    A fori_loop: one compile for any number of calls; `aux` carries caches. -> (x, aux)."""
    times = time_grid(num_steps, schedule)

    def step(i, state):
        x, aux = state
        v, aux = velocity(x, times[i], i, aux)
        return (x + (times[i + 1] - times[i]) * v).astype(x.dtype), aux

    return jax.lax.fori_loop(0, num_steps, step, (x, aux))


def _guided(v, guidance_scale):
    """v of the [conditional; unconditional] batch -> v_u + w·(v_c - v_u)."""
    cond, uncond = jnp.split(v, 2)
    return uncond + guidance_scale * (cond - uncond)


def _with_unconditional(*arrays):
    return [jnp.concatenate([a, jnp.zeros_like(a)]) for a in arrays]


def sample(model: SpeechDecoder, params, tokens, noise, *, token_mask=None, prompt_mel=None,
           num_steps: int = 10, guidance_scale=1.0):
    """One-shot decoding: tokens (B, T) -> log-mel (B, T·r, num_mels).

    noise (B, P + T·r, num_mels) is x_0 over [prompt | target] frames; prompt_mel
    (B, P, num_mels) or None. guidance_scale: a float or traced scalar (no recompile per
    value), or None for the conditional velocity alone (half the work, same as 1.0).
    """
    cfg = model.config
    batch, length = tokens.shape
    prompt_len = 0 if prompt_mel is None else prompt_mel.shape[1]
    num_frames = prompt_len + length * cfg.token_mel_ratio
    token_mask = jnp.ones(tokens.shape, bool) if token_mask is None else token_mask.astype(bool)
    frame_mask = jnp.concatenate([jnp.ones((batch, prompt_len), bool),
                                  jnp.repeat(token_mask, cfg.token_mel_ratio, axis=1)], axis=1)
    frame_start = jnp.full((batch,), prompt_len, jnp.int32)
    mu = model.apply(params, tokens, token_mask, jnp.zeros((batch,), jnp.int32), num_frames, frame_start,
                     method=SpeechDecoder.condition)
    cond = jnp.zeros_like(mu) if prompt_mel is None else jnp.pad(
        prompt_mel.astype(mu.dtype), ((0, 0), (0, num_frames - prompt_len), (0, 0)))
    copies = 1 if guidance_scale is None else 2
    if copies == 2:
        mu, cond = _with_unconditional(mu, cond)
    frame_mask, frame_start = jnp.tile(frame_mask, (copies, 1)), jnp.tile(frame_start, copies)

    def velocity(x, t, step, aux):
        v = model.apply(params, jnp.tile(x, (copies, 1, 1)), mu, cond, jnp.full((copies * batch,), t),
                        frame_mask, frame_start, method=SpeechDecoder.velocity)
        return (v if copies == 1 else _guided(v, guidance_scale)), aux

    x, _ = euler(velocity, noise[:, :num_frames].astype(jnp.float32), num_steps, cfg.time_schedule)
    return x[:, prompt_len:]


# ------------------------------------------------------------------------ streaming


def init_stream_state(config: SpeechDecoderConfig, batch: int, max_tokens: int, prompt_frames: int,
                      num_steps: int, guided: bool = True):
    """Empty caches: encoder k/v (depth, B, max_tokens, H, D) and estimator k/v
    (steps, depth, copies·B, P + max_tokens·r, H, D), copies = 2 with guidance."""
    dtype = to_dtype(config.dtype)
    heads = (config.num_heads, config.head_dim)
    enc = (config.encoder_depth, batch, max_tokens) + heads
    est = (num_steps, config.estimator_depth, (2 if guided else 1) * batch,
           prompt_frames + max_tokens * config.token_mel_ratio) + heads
    return {"enc_k": jnp.zeros(enc, dtype), "enc_v": jnp.zeros(enc, dtype), "token_offset": jnp.zeros((), jnp.int32),
            "est_k": jnp.zeros(est, dtype), "est_v": jnp.zeros(est, dtype), "frame_offset": jnp.zeros((), jnp.int32)}


def _past_mask(capacity, offset, new_valid):
    """(B, L, capacity + L): cached keys before `offset`, then the valid new keys."""
    batch, length = new_valid.shape
    past = jnp.broadcast_to(jnp.arange(capacity)[None, None, :] < offset, (batch, length, capacity))
    return jnp.concatenate([past, jnp.broadcast_to(new_valid[:, None, :], (batch, length, length))], axis=-1)


def encode_chunk(model: SpeechDecoder, params, state, window, window_valid):
    """The next chunk_tokens tokens (window (B, C + k) with their look-ahead) -> (state, mu (B, C·r, mels))."""
    cfg = model.config
    offset, length = state["token_offset"], cfg.chunk_tokens
    mask = _past_mask(state["enc_k"].shape[2], offset, window_valid[:, :length])
    positions = offset + jnp.arange(length)[None, :]
    mu, (k, v) = model.apply(params, window, window_valid, positions, mask, (state["enc_k"], state["enc_v"]),
                             method=SpeechDecoder.encode)
    at = (0, 0, offset, 0, 0)
    state = dict(state, enc_k=jax.lax.dynamic_update_slice(state["enc_k"], k.astype(state["enc_k"].dtype), at),
                 enc_v=jax.lax.dynamic_update_slice(state["enc_v"], v.astype(state["enc_v"].dtype), at),
                 token_offset=offset + length)
    return state, jnp.repeat(mu, cfg.token_mel_ratio, axis=1)


def denoise_frames(model: SpeechDecoder, params, state, mu, cond, noise, frame_valid, guidance_scale,
                   num_steps: int):
    """Runs the Euler loop over the next L frames only, reading and filling the per-step
    caches. mu, cond, noise (B, L, mels), frame_valid (B, L). -> (state, x (B, L, mels))."""
    cfg = model.config
    guided = state["est_k"].shape[2] == 2 * noise.shape[0]
    copies = 2 if guided else 1
    offset, length = state["frame_offset"], noise.shape[1]
    if guided:
        mu, cond = _with_unconditional(mu, cond)
    mask = jnp.tile(_past_mask(state["est_k"].shape[3], offset, frame_valid), (copies, 1, 1))
    positions = offset + jnp.arange(length)[None, :]

    def velocity(x, t, step, caches):
        cache_k, cache_v = caches
        v, (k, val) = model.apply(params, jnp.tile(x, (copies, 1, 1)), mu, cond, jnp.full((copies * x.shape[0],), t),
                                  positions, mask, (cache_k[step], cache_v[step]), method=SpeechDecoder.estimate)
        at = (step, 0, 0, offset, 0, 0)
        caches = (jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at),
                  jax.lax.dynamic_update_slice(cache_v, val[None].astype(cache_v.dtype), at))
        return (_guided(v, guidance_scale) if guided else v), caches

    x, (cache_k, cache_v) = euler(velocity, noise.astype(jnp.float32), num_steps, cfg.time_schedule,
                                  (state["est_k"], state["est_v"]))
    return dict(state, est_k=cache_k, est_v=cache_v, frame_offset=offset + length), x


@functools.lru_cache(maxsize=None)
def _stream_functions(model: SpeechDecoder, num_steps: int):
    """The jitted chunk and prompt steps, shared by every StreamDecoder of this model (one compile)."""
    cfg = model.config

    def chunk(params, state, window, window_valid, noise, scale):
        state, mu = encode_chunk(model, params, state, window, window_valid)
        valid = jnp.repeat(window_valid[:, :cfg.chunk_tokens], cfg.token_mel_ratio, axis=1)
        return denoise_frames(model, params, state, mu, jnp.zeros_like(mu), noise, valid, scale, num_steps)

    def prompt(params, state, prompt_mel, noise, scale):
        valid = jnp.ones(prompt_mel.shape[:2], bool)
        return denoise_frames(model, params, state, jnp.zeros_like(prompt_mel), prompt_mel, noise, valid,
                              scale, num_steps)

    return jax.jit(chunk, donate_argnums=1), jax.jit(prompt, donate_argnums=1)


class StreamDecoder:
    """Decodes tokens to mel chunk by chunk while more arrive (B rows in lockstep).

    A chunk of `chunk_tokens` tokens is decoded as soon as `lookahead_tokens` more have
    arrived; `flush` decodes the rest. `noise` (B, P + N·r, mels) is the x_0 a one-shot
    `sample` of N tokens would take (N at most (noise frames - P) / r); the chunks joined
    equal that `sample` up to float roundoff. Each chunk is one call of one jitted function.
    """

    def __init__(self, model: SpeechDecoder, params, noise, *, prompt_mel=None, num_steps: int = 10,
                 guidance_scale=1.0):
        cfg = self.config = model.config
        if cfg.chunk_tokens < 1:
            raise ValueError("streaming needs config.chunk_tokens >= 1 (chunk-causal attention)")
        self.params, self.num_steps = params, num_steps
        self.guidance_scale = jnp.float32(1.0 if guidance_scale is None else guidance_scale)
        self.batch, total_frames, _ = noise.shape
        prompt_len = 0 if prompt_mel is None else prompt_mel.shape[1]
        max_tokens = -(-(total_frames - prompt_len) // cfg.token_mel_ratio)
        max_tokens = -(-max_tokens // cfg.chunk_tokens) * cfg.chunk_tokens  # whole chunks fit the caches
        self.noise = np.pad(np.asarray(noise, np.float32),
                            ((0, 0), (0, prompt_len + max_tokens * cfg.token_mel_ratio - total_frames), (0, 0)))
        self.max_tokens, self.prompt_len = max_tokens, prompt_len
        self.pending = np.zeros((self.batch, 0), np.int32)
        self.decoded_tokens = 0

        self._chunk, prompt = _stream_functions(model, num_steps)
        self.state = init_stream_state(cfg, self.batch, max_tokens, prompt_len, num_steps, guidance_scale is not None)
        if prompt_len:  # the prompt frames are chunk -1: decoded (and cached) before any token
            self.state, _ = prompt(params, self.state, jnp.asarray(prompt_mel, jnp.float32),
                                   self.noise[:, :prompt_len], self.guidance_scale)

    def push(self, tokens) -> list[np.ndarray]:
        """Adds tokens (B, n) and returns the mel chunks (B, C·r, mels) they complete."""
        self.pending = np.concatenate([self.pending, np.asarray(tokens, np.int32).reshape(self.batch, -1)], axis=1)
        chunks = []
        while self.pending.shape[1] >= self.config.chunk_tokens + self.config.lookahead_tokens:
            chunks.append(self._decode(self.pending.shape[1]))
        return chunks

    def flush(self) -> list[np.ndarray]:
        """Decodes the tokens left (no more will come); the last chunk is cut to its frames."""
        chunks = []
        while self.pending.shape[1]:
            count = min(self.pending.shape[1], self.config.chunk_tokens)
            chunks.append(self._decode(self.pending.shape[1])[:, :count * self.config.token_mel_ratio])
        return chunks

    def _decode(self, available: int) -> np.ndarray:
        cfg = self.config
        if self.decoded_tokens + cfg.chunk_tokens > self.max_tokens:
            raise ValueError(f"more than {self.max_tokens} tokens: the noise given covers no more")
        width = cfg.chunk_tokens + cfg.lookahead_tokens
        window = np.zeros((self.batch, width), np.int32)
        take = min(available, width)
        window[:, :take] = self.pending[:, :take]
        valid = np.broadcast_to(np.arange(width) < take, window.shape)
        start = self.prompt_len + self.decoded_tokens * cfg.token_mel_ratio
        noise = self.noise[:, start:start + cfg.chunk_frames]
        self.state, mel = self._chunk(self.params, self.state, window, valid, noise, self.guidance_scale)
        self.pending = self.pending[:, cfg.chunk_tokens:]
        self.decoded_tokens += cfg.chunk_tokens
        return np.asarray(mel)


def stream(model: SpeechDecoder, params, token_chunks: Iterable, noise, **kwargs) -> Iterator[np.ndarray]:
    """Yields mel chunks while `token_chunks` (an iterable of (B, n) token arrays, e.g. from
    the LLM's sampler) still produces; kwargs as `StreamDecoder`."""
    decoder = StreamDecoder(model, params, noise, **kwargs)
    for tokens in token_chunks:
        yield from decoder.push(tokens)
    yield from decoder.flush()

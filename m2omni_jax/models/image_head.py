"""Flow-matching image head: a small DiT that renders an image from condition vectors.

[ours, after Ming-Lite-Uni; DESIGN.md §1 "Image generation"] The LLM's final hidden states at
the N `<gen_imagePatch>` query tokens, cond (B, N, cond_width) with cond_mask (B, N), condition
a diffusion transformer (DiT, Peebles & Xie 2023) trained by rectified-flow matching (Liu et
al. 2022) on pixels or latents (B, H, W, C) in [-1, 1].

Convention: t = 0 is noise, t = 1 is data. x_t = (1 − t)·x0 + t·x1 with x0 ~ N(0, I) and x1
the image; the model predicts the velocity dx_t/dt = x1 − x0, and `sample` integrates
dx/dt = v(x, t) from t = 0 (noise) to t = 1 (image).

The DiT: patchify → linear patch embedding + 2-D position embedding (fixed sin-cos or learned);
the timestep's sinusoidal features through an MLP plus the mean of the projected condition
tokens give one vector c per image, which modulates every block by adaLN-Zero (shift, scale and
gate of the self-attention and MLP branches, zero at init so each block starts as the
identity); between those two branches a cross-attention to the condition tokens (as in
PixArt-α); a final adaLN + linear back to patch pixels (also zero at init).

No condition: a learned null token is always the first key of the cross-attention (and part of
the mean), so an all-False cond_mask row means "unconditional". Condition dropout in training
(for classifier-free guidance) sets a row's mask to all False.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models import layers
from m2omni_jax.models.layers import LayerNorm, MergeHeads, SplitHeads, kernel_init, maybe_remat, to_dtype, zeros_init

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
ACTIVATION_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACTIVATION_VECTOR = ("activation_batch", "activation_embed")
POSITION_EMBEDDINGS = ("sincos", "learned")
TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")
TIME_FEATURES = 256  # sinusoidal timestep features fed to the timestep MLP (DiT's 256)


@dataclasses.dataclass(frozen=True)
class ImageHeadConfig:
    image_size: int = 32  # square images of image_size² pixels
    patch_size: int = 4
    channels: int = 3  # 3 for RGB pixels; a latent's channel count otherwise
    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    cond_width: int = 64  # the condition vectors' width: the LLM's width when it conditions
    position_embedding: str = "sincos"  # or "learned"
    cond_dropout: float = 0.1  # probability of training a row unconditionally (for CFG)
    time_sampling: str = "uniform"  # training t ~ U(0, 1), or "logit_normal": sigmoid(N(time_mean, time_std²)) (SD3)
    time_mean: float = 0.0  # logit-normal location: < 0 trains noisier times (where the layout is decided)
    time_std: float = 1.0  # logit-normal scale
    # Each training image is scored at this many independent (noise, t) draws: the head's work
    # per image × noise_draws, the condition (the LLM) computed once (MAR's "diffusion batch
    # multiplier", Li et al. 2024); a cheap way to give the small decoder more signal per step.
    noise_draws: int = 1
    # The head models (x − data_shift) / data_scale of images x in [-1, 1] (as latent models are
    # scaled to unit variance): a mostly flat image has little variance, so against N(0, I) noise
    # its content only shows late in the path; scaled up, it is decided earlier.
    data_shift: float = 0.0
    data_scale: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan: bool = True
    attention_implementation: str = layers.DEFAULT_ATTENTION

    def __post_init__(self):
        field = "config.model.image_head"
        if self.image_size % self.patch_size:
            raise ValueError(f"{field}.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.width % self.num_heads or self.width % 4:
            raise ValueError(f"{field}.width={self.width} must split into num_heads={self.num_heads} "
                             "and be a multiple of 4 (2-D sin-cos positions)")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"{field}.position_embedding={self.position_embedding!r}; "
                             f"use one of {POSITION_EMBEDDINGS}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"{field}.time_sampling={self.time_sampling!r}; use one of {TIME_SAMPLINGS}")
        if self.noise_draws < 1:
            raise ValueError(f"{field}.noise_draws={self.noise_draws} must be at least 1")
        if self.data_scale <= 0 or self.time_std <= 0:
            raise ValueError(f"{field}.data_scale={self.data_scale} and time_std={self.time_std} must be positive")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"{field}.cond_dropout={self.cond_dropout} is not a probability")
        layers.remat_policy(self.remat_policy)
        layers.check_attention_implementation(self.attention_implementation, f"{field}.attention_implementation")

    @classmethod
    def from_config(cls, cfg) -> "ImageHeadConfig":
        """Builds from a ConfigDict / mapping, naming any field it does not know."""
        return dataclass_from_config(cls, cfg, "model.image_head")

    @classmethod
    def tiny(cls, **overrides) -> "ImageHeadConfig":
        return cls(**{**dict(image_size=8, patch_size=2, width=32, depth=2, num_heads=2, cond_width=16), **overrides})

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def normalize(self, images):
        """Images in [-1, 1] -> what the head models (its data space)."""
        return (images - self.data_shift) / self.data_scale

    def denormalize(self, x):
        """The head's data space -> images (in [-1, 1] when well drawn)."""
        return x * self.data_scale + self.data_shift

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.channels

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


ROUTES = ("query", "caption")
PREDICTIONS = ("velocity", "data", "preconditioned")


@dataclasses.dataclass(frozen=True)
class ImageOutputConfig(ImageHeadConfig):
    """config.model.image_head: the DiT's fields, whether the omni model has it, and how the LLM
    conditions it (models/omni.py). The condition tokens of a drawing are the tokens inside its
    `<gen_image> … </gen_image>` span: N `<gen_imagePatch>` queries ("query") or the
    description the LLM writes ("caption", the paper's)."""
    enabled: bool = False  # off: no head, no image batch keys (configs without it unchanged)
    route: str = "query"  # ROUTES
    num_queries: int = 8  # "query": <gen_imagePatch> tokens per drawing
    max_cond_tokens: int = 32  # "caption": description tokens the decoder attends to (the rest dropped)
    images_per_row: int = 2  # drawing slots per packed row (static); a fuller row is not packed
    loss_weight: float = 1.0  # × the flow-matching loss (and × train.loss_weights["image_out"])
    sample_steps: int = 20  # sampling (m2omni-eval, the generator): integration steps
    sampler: str = "euler"  # SAMPLERS
    guidance_scale: float = 1.0  # classifier-free guidance scale s (1: plain conditional)
    # What the DiT outputs: the velocity x1 − x0 (rectified flow), or "data": the clean image x1,
    # trained by its squared error, the velocity (x1 − x_t)/(1 − t) when sampling. Data
    # prediction need not reproduce the noise pixel by pixel: an under-trained velocity model
    # leaves speckles of it in its samples. "preconditioned" (EDM's, for rectified flow): the
    # velocity is c_skip(t)·x_t + c_out(t)·output, the linear part (the noise's copy) analytic and
    # the output a unit-variance residual, for data of unit variance (data_shift / data_scale).
    prediction: str = "velocity"

    def __post_init__(self):
        super().__post_init__()
        field = "config.model.image_head"
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"{field}.prediction={self.prediction!r}; use one of {PREDICTIONS}")
        if self.route not in ROUTES:
            raise ValueError(f"{field}.route={self.route!r}; use one of {ROUTES}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{field}.sampler={self.sampler!r}; use one of {SAMPLERS}")
        for name in ("num_queries", "max_cond_tokens", "images_per_row", "sample_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{field}.{name}={getattr(self, name)} must be positive")

    @classmethod
    def from_config(cls, cfg) -> "ImageOutputConfig":
        return dataclass_from_config(cls, cfg, "model.image_head")

    @property
    def cond_tokens(self) -> int:
        """Condition tokens per drawing the decoder attends to (static)."""
        return self.num_queries if self.route == "query" else self.max_cond_tokens


# --------------------------------------------------------------------------- the DiT

def patchify(images, patch_size: int):
    """(B, H, W, C) -> (B, (H/p)·(W/p), p·p·C), patches in row-major order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size: int, grid: int):
    """Inverse of `patchify` for a square grid of grid² patches."""
    b, _, d = patches.shape
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, grid, grid, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, c)


def sincos_2d_positions(grid: int, width: int) -> np.ndarray:
    """(grid², width) fixed embedding: [sin, cos] of the row, then [sin, cos] of the column (MAE)."""
    quarter = width // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (rows, cols) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def timestep_features(t, dim: int = TIME_FEATURES, max_period: float = 10000.0):
    """(B,) t in [0, 1] -> (B, dim) [cos | sin] features of 1000·t (DiT's scale for its timesteps)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = (1000.0 * t.astype(jnp.float32))[:, None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _dense(cfg: ImageHeadConfig, features: int, axes: tuple, name: str, zero: bool = False) -> nn.Dense:
    init = zeros_init(axes) if zero else kernel_init(axes)
    return layers.Dense(features, kernel_init=init, bias_init=zeros_init(axes[-1:]), name=name,
                    dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype))


def _plain_norm(cfg: ImageHeadConfig):
    """LayerNorm without its own scale and bias: adaLN supplies them."""
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=to_dtype(cfg.dtype))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention of x's queries over context's keys; `zero_init`: output kernel at 0."""
    config: ImageHeadConfig
    zero_init: bool = False

    @nn.compact
    def __call__(self, x, context, mask):
        cfg = self.config
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q, k, v = (SplitHeads(cfg.num_heads, cfg.head_dim, use_bias=True, name=name, **dtypes)(src)
                   for name, src in (("query", x), ("key", context), ("value", context)))
        q, k, v = (nn.with_logical_constraint(a, ACTIVATION_HEADS) for a in (q, k, v))
        out = layers.dot_product_attention(q, k, v, mask, implementation=cfg.attention_implementation)
        out = nn.with_logical_constraint(out, ACTIVATION_HEADS)
        return MergeHeads(cfg.width, use_bias=True, zero_init=self.zero_init, name="out", **dtypes)(out)


class MLP(nn.Module):
    config: ImageHeadConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "fc1")(x)
        h = nn.gelu(nn.with_logical_constraint(h, ACTIVATION_MLP), approximate=True)
        return _dense(cfg, cfg.width, ("mlp", "embed"), "fc2")(h)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the condition, adaLN-Zero MLP; (carry, None) for nn.scan."""
    config: ImageHeadConfig

    @nn.compact
    def __call__(self, x, c, cond, cross_mask):
        cfg = self.config
        mods = _dense(cfg, 6 * cfg.width, ("embed", "mlp"), "modulation", zero=True)(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)
        h = _modulate(_plain_norm(cfg)(x), shift_a, scale_a)
        x = x + gate_a[:, None] * Attention(cfg, name="self_attention")(h, h, None)
        h = LayerNorm(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), name="cross_attention_norm")(x)
        x = x + Attention(cfg, zero_init=True, name="cross_attention")(h, cond, cross_mask)
        h = _modulate(_plain_norm(cfg)(x), shift_m, scale_m)
        x = x + gate_m[:, None] * MLP(cfg, name="mlp")(h)
        return nn.with_logical_constraint(x, ACTIVATION), None


class ImageHead(nn.Module):
    config: ImageHeadConfig

    @nn.compact
    def __call__(self, x_t, t, cond, cond_mask):
        """x_t (B, H, W, C) at times t (B,), cond (B, N, cond_width), cond_mask (B, N) bool
        -> velocity (B, H, W, C) float32. An all-False cond_mask row is unconditional."""
        cfg = self.config
        dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        x = _dense(cfg, cfg.width, ("patch", "embed"), "patch_embed")(patchify(x_t.astype(dtype), cfg.patch_size))
        if cfg.position_embedding == "learned":
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
            positions = self.param("position_embed", init, (cfg.num_patches, cfg.width), param_dtype)
        else:
            positions = sincos_2d_positions(cfg.grid, cfg.width)
        x = nn.with_logical_constraint(x + jnp.asarray(positions, dtype), ACTIVATION)

        # Condition tokens in the DiT's width, the learned null token first and always visible.
        cond = LayerNorm(dtype=dtype, param_dtype=param_dtype, name="cond_norm")(cond.astype(dtype))
        cond = _dense(cfg, cfg.width, ("mlp", "embed"), "cond_proj")(cond)
        null = self.param("null_cond", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                          (cfg.width,), param_dtype)
        batch = cond.shape[0]
        cond = jnp.concatenate([jnp.broadcast_to(null.astype(dtype), (batch, 1, cfg.width)), cond], axis=1)
        cond = nn.with_logical_constraint(cond, ACTIVATION)
        mask = jnp.concatenate([jnp.ones((batch, 1), bool), cond_mask.astype(bool)], axis=1)
        pooled = jnp.sum(cond * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True).astype(dtype)

        h = _dense(cfg, cfg.width, (None, "mlp"), "time_fc1")(timestep_features(t).astype(dtype))
        c = _dense(cfg, cfg.width, ("mlp", "embed"), "time_fc2")(nn.silu(h)) + pooled
        c = nn.with_logical_constraint(c, ACTIVATION_VECTOR)

        cross_mask = mask[:, None, None, :]
        block = maybe_remat(DiTBlock, cfg.remat_policy)
        if cfg.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, name="blocks")(x, c, cond, cross_mask)
        else:
            for i in range(cfg.depth):
                x, _ = block(cfg, name=f"block_{i}")(x, c, cond, cross_mask)

        mods = _dense(cfg, 2 * cfg.width, ("embed", "mlp"), "final_modulation", zero=True)(nn.silu(c))
        shift, scale = jnp.split(mods, 2, axis=-1)
        x = _modulate(_plain_norm(cfg)(x), shift, scale)
        patches = _dense(cfg, cfg.patch_dim, ("embed", "patch"), "final_proj", zero=True)(x)
        return unpatchify(patches, cfg.patch_size, cfg.grid).astype(jnp.float32)


# --------------------------------------------------------------------------- training

def sample_time(rng, batch: int, method: str = "uniform", mean: float = 0.0, std: float = 1.0):
    """(batch,) training times: U(0, 1), or "logit_normal": sigmoid(N(mean, std²)), denser mid-way (SD3)."""
    if method == "uniform":
        return jax.random.uniform(rng, (batch,))
    if method == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    raise ValueError(f"time sampling {method!r}; use one of {TIME_SAMPLINGS}")


def drop_condition(rng, cond_mask, probability: float):
    """cond_mask (B, N) with each row set to all False (unconditional) with `probability`."""
    keep = jax.random.bernoulli(rng, 1.0 - probability, cond_mask.shape[:1])
    return cond_mask.astype(bool) & keep[:, None]


def interpolate(noise, data, t):
    """x_t = (1 − t)·noise + t·data, t (B,) broadcast over the image dims."""
    t = t.reshape((-1,) + (1,) * (data.ndim - 1))
    return (1 - t) * noise + t * data


def preconditioning(t, x_ndim: int):
    """(c_skip, c_out) at times t (B,), shaped to broadcast over (B, ...) of x_ndim dims.

    For x1 of zero mean and unit variance and x0 ~ N(0, I): the linear least-squares estimate of
    the velocity v = x1 − x0 from x_t is c_skip·x_t with c_skip = (2t − 1) / ((1 − t)² + t²), and
    what it leaves has standard deviation c_out = 1 / √((1 − t)² + t²) (Karras et al. 2022, §5,
    on this path)."""
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x_ndim - 1))
    norm = jnp.square(1 - t) + jnp.square(t)
    return (2 * t - 1) / norm, jax.lax.rsqrt(norm)


def output_velocity(out, x_t, t, prediction: str = "velocity"):
    """dx/dt at (x_t, t) (t (B,)) from the head's output under `prediction` (PREDICTIONS)."""
    if prediction == "velocity":
        return out
    if prediction == "preconditioned":
        c_skip, c_out = preconditioning(t, x_t.ndim)
        return c_skip * x_t + c_out * out
    if prediction == "data":
        return (out - x_t) / jnp.maximum(1.0 - t, 1e-3).reshape((-1,) + (1,) * (x_t.ndim - 1))
    raise ValueError(f"prediction {prediction!r}; use one of {PREDICTIONS}")


def flow_matching_loss(apply_fn, params, images, cond, cond_mask, rng, *, cond_dropout: float = 0.0,
                       time_sampling: str = "uniform", time_mean: float = 0.0, time_std: float = 1.0,
                       sample_mask=None, target: str = "velocity", noise_draws: int = 1):
    """Mean squared error of the predicted velocity against x1 − x0 (rectified flow).

    apply_fn(params, x_t, t, cond, cond_mask) -> velocity, e.g. `ImageHead(cfg).apply` with
    params = {"params": ...}. images (B, H, W, C) in [-1, 1] are x1; x0 ~ N(0, I) and t are drawn
    from `rng`; each row's condition is dropped with probability `cond_dropout`.
    `sample_mask` (B,): average over these rows only (rows of a batch without an image target).
    `target="data"`: apply_fn predicts the clean image x1, scored against it;
    "preconditioned": the residual (v − c_skip·x_t) / c_out (see `preconditioning`).
    `noise_draws` k: each row scored at k independent (noise, t, dropout) draws, the mean over all.
    """
    if noise_draws > 1:
        images, cond, cond_mask = (jnp.repeat(a, noise_draws, axis=0) for a in (images, cond, cond_mask))
        sample_mask = None if sample_mask is None else jnp.repeat(sample_mask, noise_draws, axis=0)
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    data = images.astype(jnp.float32)
    noise = jax.random.normal(noise_rng, data.shape, jnp.float32)
    t = sample_time(t_rng, data.shape[0], time_sampling, time_mean, time_std)
    cond_mask = drop_condition(drop_rng, cond_mask, cond_dropout)
    x_t = interpolate(noise, data, t)
    velocity = apply_fn(params, x_t, t, cond, cond_mask)
    wanted = data if target == "data" else data - noise
    if target == "preconditioned":
        c_skip, c_out = preconditioning(t, data.ndim)
        wanted = (wanted - c_skip * x_t) / c_out
    per_row = jnp.mean(jnp.square(velocity.astype(jnp.float32) - wanted), axis=tuple(range(1, data.ndim)))
    if sample_mask is None:
        return jnp.mean(per_row)
    weights = sample_mask.astype(jnp.float32)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# --------------------------------------------------------------------------- sampling

def integrate(velocity_fn, x0, num_steps: int, method: str = "euler"):
    """Integrates dx/dt = velocity_fn(x, t) (t a scalar) from t = 0 to 1 in `num_steps` equal steps.

    "euler": num_steps evaluations; "heun" (2nd order, trapezoidal corrector): 2·num_steps.
    One lax.fori_loop: the step count is static, the steps compile once.
    """
    if method not in SAMPLERS:
        raise ValueError(f"sampler {method!r}; use one of {SAMPLERS}")
    dt = 1.0 / num_steps

    def step(i, x):
        t = i.astype(jnp.float32) * dt
        v = velocity_fn(x, t)
        if method == "euler":
            return x + dt * v
        return x + 0.5 * dt * (v + velocity_fn(x + dt * v, t + dt))
    return jax.lax.fori_loop(0, num_steps, step, x0)


def sample(apply_fn, params, cond, cond_mask, rng, *, image_shape: tuple[int, ...], num_steps: int,
           method: str = "euler", guidance_scale: float = 1.0):
    """Images (B, *image_shape) from noise x0 = jax.random.normal(rng, (B, *image_shape)), unclipped.

    Classifier-free guidance: v = v_uncond + s·(v_cond − v_uncond), the unconditional velocity
    from an all-False mask. s = 1 (plain conditional) and s = 0 (unconditional) take one forward
    pass per evaluation; any other s one pass over the doubled batch. `guidance_scale`,
    `image_shape`, `num_steps` and `method` are static (Python values) under jit.
    """
    batch = cond.shape[0]
    cond_mask = cond_mask.astype(bool)
    no_cond = jnp.zeros_like(cond_mask)

    def velocity(x, t):
        t = jnp.full((batch,), t, jnp.float32)
        if guidance_scale == 1.0:
            return apply_fn(params, x, t, cond, cond_mask)
        if guidance_scale == 0.0:
            return apply_fn(params, x, t, cond, no_cond)
        both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, cond]),
                        jnp.concatenate([cond_mask, no_cond]))
        v_cond, v_uncond = jnp.split(both, 2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    x0 = jax.random.normal(rng, (batch, *image_shape), jnp.float32)
    return integrate(velocity, x0, num_steps, method)

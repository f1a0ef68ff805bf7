"""The omni model: vision tower + connector scattered into the LLM's embedding sequence.

    tokens ──embed──────────────────────────────┐
    vision_patches ─ NaViT ─ PatchMerger ─ proj ─┤ replace the placeholder
                                                ┘ embeddings ─ LLM ─ logits

Every row of a batch carries its own fixed-size patch pack (see
`data/omni_pipeline.py`); placeholder j of a row (an `<imagePatch>` or
`<videoPatch>` token, in order) takes that row's valid merged feature j, so
images and videos of any size share one compiled program.

Audio hook: the audio tower (`models/audio.py`, SAN-M) joins the same way,
one more `scatter_features` call with its own placeholder id
(`<audioPatch>`) and its (B, num_audio_tokens, width) output. It is not
wired in here yet, because the batch format for audio is not fixed; until
then `OmniConfig` has no audio field, and placeholders without features keep
their token embedding.

Parameters live under `llm/`, `vision/` and `connector/`, so a tower is
frozen by an `opt.frozen` path regex such as `^vision/`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2omni_jax.models.connectors import make_connector
from m2omni_jax.models.layers import kernel_init, zeros_init
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.vision import VisionConfig, VisionEncoder, training_flops_per_pack

MEDIA_KEYS = ("vision_patches", "vision_segment_ids", "vision_hw")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    # Only M2-omni's per-token "linear" connector keeps the packed token count;
    # MM1's pooling connectors need one image's grid (models/connectors.py).
    kind: str = "linear"
    mlp: bool = False  # Linear–GELU–Linear instead of one Linear
    # Multiplies the L2-normalised tokens [ours]. 1 is the paper's (a pretrained
    # Llama's token embeddings have norms near 1); an LLM trained from scratch
    # with N(0, 1) embeddings has norms near √width, and unit-norm image
    # tokens would then be drowned in the residual stream after one layer.
    output_scale: float = 1.0
    # > 0 [ours]: add Fourier features of each token's fractional (row, col) in its image,
    # projected, before the connector (what the interpolated absolute position embeddings
    # of CLIP/SigLIP ViTs give). The NaViT's 2-D RoPE is relative only, and M-RoPE's
    # height/width ids rotate too slowly in a tiny model to tell "top left" from "center".
    position_frequencies: int = 0

    def __post_init__(self):
        if self.kind != "linear":
            raise ValueError(f"model.connector.kind={self.kind!r}: the packed omni model supports "
                             "'linear' only; pooling connectors take one image's token grid")


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    llm: LLMConfig
    vision: VisionConfig
    connector: ConnectorConfig
    placeholder_ids: tuple[int, ...]  # token ids replaced by vision features, e.g. <imagePatch>, <videoPatch>

    @classmethod
    def from_config(cls, model_cfg, placeholder_ids) -> "OmniConfig":
        """From `config.model` (llm, vision, connector sections), naming unknown fields."""
        return cls(llm=LLMConfig.from_config(model_cfg.llm),
                   vision=_dataclass_from(VisionConfig, model_cfg.vision, "model.vision"),
                   connector=_dataclass_from(ConnectorConfig, model_cfg.connector, "model.connector"),
                   placeholder_ids=tuple(int(i) for i in placeholder_ids))


def _dataclass_from(cls, cfg, name: str):
    values = dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**values)


def grid_fractions(vision_hw, merged_segment_ids, merge_size: int = 2):
    """(B, M, 2) centre of each merged token as a fraction of its image's (rows, cols).

    vision_hw (B, 2, N) patch (row, col); merged_segment_ids (B, M), M = N / merge².
    An image's extent is the largest merged row/col of its segment (static shapes:
    segment_max over M segments).
    """
    merged = jnp.moveaxis(vision_hw[:, :, ::merge_size ** 2] // merge_size, 1, 2)  # (B, M, 2)
    extent = jax.vmap(lambda hw, seg: jax.ops.segment_max(hw, seg, num_segments=seg.shape[0] + 1)[seg])(
        merged, merged_segment_ids)
    return (merged + 0.5) / (extent + 1)


def fourier_features(fractions, num_frequencies: int):
    """(..., 2) fractions in [0, 1] -> (..., 4·num_frequencies) sin/cos of π·2^k·fraction."""
    angles = fractions[..., None] * (jnp.pi * 2.0 ** jnp.arange(num_frequencies))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(*fractions.shape[:-1], -1)


def scatter_features(embeddings, is_placeholder, features, feature_valid):
    """Placeholder j of each row takes that row's j-th valid feature; other tokens keep theirs.

    embeddings (B, L, D); is_placeholder (B, L) bool; features (B, M, D);
    feature_valid (B, M) bool. Static shapes: a cumsum ranks the
    placeholders, a stable sort lists the valid features in order, a gather
    fetches them. Placeholders beyond the valid features keep their embedding.
    """
    num_features = features.shape[1]
    valid_in_order = jnp.argsort(~feature_valid, axis=1, stable=True)  # valid indices first
    rank = jnp.cumsum(is_placeholder.astype(jnp.int32), axis=1) - 1
    source = jnp.take_along_axis(valid_in_order, jnp.clip(rank, 0, num_features - 1), axis=1)
    gathered = jnp.take_along_axis(features, source[..., None], axis=1).astype(embeddings.dtype)
    has_feature = is_placeholder & (rank < jnp.sum(feature_valid, axis=1, keepdims=True))
    return jnp.where(has_feature[..., None], gathered, embeddings)


class OmniModel(nn.Module):
    """LLM + vision tower + connector; same call signature as `LLM` plus the media keys."""
    config: OmniConfig

    def setup(self):
        cfg = self.config
        self.llm = LLM(cfg.llm)
        self.vision = VisionEncoder(cfg.vision)
        self.connector = make_connector(cfg.connector.kind, cfg.llm.width, mlp=cfg.connector.mlp,
                                        dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype)
        if cfg.connector.position_frequencies:
            self.position_embedding = nn.Dense(cfg.vision.out_width, kernel_init=kernel_init((None, "embed")),
                                               bias_init=zeros_init(("embed",)))

    def embed(self, tokens, vision_patches=None, vision_segment_ids=None, vision_hw=None):
        """Token embeddings with the vision features in the placeholder slots."""
        x = self.llm.embed_tokens(tokens)
        if vision_patches is None:  # decode steps and text-only calls
            return x
        features, merged_segment_ids = self.vision(vision_patches, vision_segment_ids, vision_hw)
        if self.config.connector.position_frequencies:
            fractions = grid_fractions(vision_hw, merged_segment_ids, self.config.vision.spatial_merge_size)
            features = features + self.position_embedding(fourier_features(
                fractions, self.config.connector.position_frequencies)).astype(features.dtype)
        features = self.connector(features) * self.config.connector.output_scale
        is_placeholder = jnp.isin(tokens, jnp.asarray(self.config.placeholder_ids, tokens.dtype))
        return scatter_features(x, is_placeholder, features, merged_segment_ids > 0)

    def __call__(self, tokens, positions=None, segment_ids=None, vision_patches=None,
                 vision_segment_ids=None, vision_hw=None, *, decode: bool = False,
                 return_hidden: bool = False):
        """tokens (B,L); positions (3,B,L) M-RoPE ids; segment_ids (B,L); vision_patches
        (B,N,patch_dim), vision_segment_ids (B,N) (one id per image/frame, 0 = padding),
        vision_hw (B,2,N). Returns logits (B,L,vocab) (and the final hidden states)."""
        x = self.embed(tokens, vision_patches, vision_segment_ids, vision_hw)
        return self.llm(positions=positions, segment_ids=segment_ids, inputs_embeds=x,
                        decode=decode, return_hidden=return_hidden)


def vision_training_flops_per_pack(config: OmniConfig, pack_size: int) -> float:
    """Model FLOPs (forward + backward) of one row's patch pack through the vision
    tower, the position features and the connector (see vision.training_flops_per_pack)."""
    merged = pack_size // config.vision.spatial_merge_size ** 2
    per_merged = config.vision.out_width * config.llm.width + (config.llm.width ** 2 if config.connector.mlp else 0)
    per_merged += 4 * config.connector.position_frequencies * config.vision.out_width
    return training_flops_per_pack(config.vision, pack_size) + 6.0 * per_merged * merged


def init_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
    """A zeroed KV cache for `max_len` positions of `model` (an `LLM` or an `OmniModel`)."""
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(variables["cache"]))

"""The omni model: vision and audio towers scattered into the LLM's embedding sequence.

    tokens ──embed───────────────────────────────────────┐
    vision_patches ─ NaViT ─ PatchMerger ─ proj ──────────┤ replace the placeholder
    audio_features ─ SAN-M ─ 3-frame concat ─ proj ─ L2 ──┤ embeddings ─ LLM ─ logits
                                                         ┘

Every row of a batch carries its own fixed-size patch pack (see
`data/omni_pipeline.py`); placeholder j of a row (an `<imagePatch>` or
`<videoPatch>` token, in order) takes that row's valid merged feature j, so
images and videos of any size share one compiled program.

Audio goes the same way, with a second `scatter_features` call and its own
placeholder id (`<audioPatch>`): a row holds `clips_per_row` clip slots of
fixed size, audio_features (B, C, F, 560) LFR+CMVN frames and audio_lengths
(B, C) (0 = empty slot). The SAN-M tower (`models/audio.py`) turns each clip
into exactly `num_audio_tokens` tokens (those past the audio are the LLM's
`<end_of_audio>` embedding), so a clip's N `<audioPatch>` placeholders take
its N tokens, clip after clip in row order. The audio tower exists only when
`OmniConfig.audio` is set (`config.model.audio.enabled`).

Parameters live under `llm/`, `vision/`, `connector/` and `audio/`, so a tower
is frozen by an `opt.frozen` path regex such as `^vision/` or `^audio/`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models.audio import AudioConfig, AudioEncoder
from m2omni_jax.models.connectors import make_connector
from m2omni_jax.models.layers import kernel_init, zeros_init
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.vision import VisionConfig, VisionEncoder, training_flops_per_pack

VISION_KEYS = ("vision_patches", "vision_segment_ids", "vision_hw")
AUDIO_KEYS = ("audio_features", "audio_lengths")
MEDIA_KEYS = VISION_KEYS + AUDIO_KEYS  # the model's media inputs; a batch has the audio keys when audio is on
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


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
    audio: AudioConfig | None = None  # None: no audio tower; <audioPatch> keeps its token embedding
    # Multiplies the L2-normalised audio tokens, as ConnectorConfig.output_scale does image tokens.
    audio_output_scale: float = 1.0
    audio_placeholder_id: int = -1  # <audioPatch>
    end_of_audio_id: int = -1  # <end_of_audio>: its LLM embedding fills the tokens past a clip

    def __post_init__(self):
        if self.audio is not None and self.audio.out_width != self.llm.width:
            raise ValueError(f"config.model.audio.out_width={self.audio.out_width} must equal "
                             f"config.model.llm.width={self.llm.width} (leave it out to take the LLM width)")

    @classmethod
    def from_config(cls, model_cfg, placeholder_ids, *, audio_placeholder_id: int = -1,
                    end_of_audio_id: int = -1) -> "OmniConfig":
        """From `config.model` (llm, vision, connector, audio sections), naming unknown fields."""
        llm = LLMConfig.from_config(model_cfg.llm)
        audio, audio_output_scale = audio_from_config(model_cfg.get("audio"), llm.width)
        return cls(llm=llm,
                   vision=dataclass_from_config(VisionConfig, model_cfg.vision, "model.vision"),
                   connector=dataclass_from_config(ConnectorConfig, model_cfg.connector, "model.connector"),
                   placeholder_ids=tuple(int(i) for i in placeholder_ids), audio=audio,
                   audio_output_scale=audio_output_scale, audio_placeholder_id=int(audio_placeholder_id),
                   end_of_audio_id=int(end_of_audio_id))


def audio_from_config(audio_cfg, llm_width: int) -> tuple[AudioConfig | None, float]:
    """(the tower's AudioConfig, or None unless `enabled`; output scale) from `config.model.audio`.

    The section holds `enabled`, `output_scale` and AudioConfig's fields; `out_width`
    defaults to the LLM width. Fields are checked even when the tower is off.
    """
    if audio_cfg is None:
        return None, 1.0
    values = dict(audio_cfg)
    enabled, scale = bool(values.pop("enabled", False)), float(values.pop("output_scale", 1.0))
    values.setdefault("out_width", llm_width)
    audio = AudioConfig.from_config(values)
    return (audio if enabled else None), scale


def audio_enabled(config) -> bool:
    """Whether an experiment config has the audio tower (omni model, `model.audio.enabled`)."""
    return config.model.get("kind", "llm") == "omni" and bool(config.model.get("audio", {}).get("enabled", False))


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
        if cfg.audio is not None:
            if min(cfg.audio_placeholder_id, cfg.end_of_audio_id) < 0:
                raise ValueError("OmniConfig.audio needs audio_placeholder_id and end_of_audio_id "
                                 "(the tokenizer's <audioPatch> and <end_of_audio>)")
            self.audio = AudioEncoder(cfg.audio)

    def embed(self, tokens, vision_patches=None, vision_segment_ids=None, vision_hw=None,
              audio_features=None, audio_lengths=None):
        """Token embeddings with the vision and audio features in their placeholder slots."""
        x = self.llm.embed_tokens(tokens)
        if vision_patches is not None:  # absent in decode steps and text-only calls
            x = self.scatter_vision(x, tokens, vision_patches, vision_segment_ids, vision_hw)
        if audio_features is not None:
            x = self.scatter_audio(x, tokens, audio_features, audio_lengths)
        return x

    def scatter_vision(self, x, tokens, vision_patches, vision_segment_ids, vision_hw):
        features, merged_segment_ids = self.vision(vision_patches, vision_segment_ids, vision_hw)
        if self.config.connector.position_frequencies:
            fractions = grid_fractions(vision_hw, merged_segment_ids, self.config.vision.spatial_merge_size)
            features = features + self.position_embedding(fourier_features(
                fractions, self.config.connector.position_frequencies)).astype(features.dtype)
        features = self.connector(features) * self.config.connector.output_scale
        is_placeholder = jnp.isin(tokens, jnp.asarray(self.config.placeholder_ids, tokens.dtype))
        return scatter_features(x, is_placeholder, features, merged_segment_ids > 0)

    def scatter_audio(self, x, tokens, audio_features, audio_lengths):
        if self.config.audio is None:
            raise ValueError("audio_features given, but the model has no audio tower "
                             "(config.model.audio.enabled=False)")
        features, present = self.audio_tokens(audio_features, audio_lengths)
        return scatter_features(x, tokens == self.config.audio_placeholder_id, features, present)

    def audio_tokens(self, audio_features, audio_lengths):
        """(B, C, F, 560) clips, (B, C) lengths -> tokens (B, C·N, width) and (B, C·N) bool:
        the token belongs to a present clip (length > 0), N = num_audio_tokens."""
        cfg = self.config
        batch, clips = audio_lengths.shape
        scale = cfg.audio_output_scale
        # The encoder fills a clip's tokens past its audio with this; dividing by the scale
        # here leaves the LLM's own <end_of_audio> embedding after the multiplication below.
        end_of_audio = self.llm.embedding[cfg.end_of_audio_id] / scale
        tokens, _ = self.audio(audio_features.reshape((batch * clips,) + audio_features.shape[2:]),
                               audio_lengths.reshape(batch * clips), end_of_audio)
        tokens = nn.with_logical_constraint(tokens.reshape(batch, clips * cfg.audio.num_audio_tokens, -1) * scale,
                                            ACTIVATION)
        return tokens, jnp.repeat(audio_lengths > 0, cfg.audio.num_audio_tokens, axis=1)

    def __call__(self, tokens, positions=None, segment_ids=None, vision_patches=None,
                 vision_segment_ids=None, vision_hw=None, audio_features=None, audio_lengths=None, *,
                 decode: bool = False, return_hidden: bool = False):
        """tokens (B,L); positions (3,B,L) M-RoPE ids; segment_ids (B,L); vision_patches
        (B,N,patch_dim), vision_segment_ids (B,N) (one id per image/frame, 0 = padding),
        vision_hw (B,2,N); audio_features (B,C,F,560), audio_lengths (B,C) (0 = no clip).
        Returns logits (B,L,vocab) (and the final hidden states)."""
        x = self.embed(tokens, vision_patches, vision_segment_ids, vision_hw, audio_features, audio_lengths)
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

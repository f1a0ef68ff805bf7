"""The omni model: vision and audio towers scattered into the LLM's embedding sequence.

    tokens ──embed───────────────────────────────────────┐
    vision_patches ─ NaViT ─ PatchMerger ─ proj ──────────┤ replace the placeholder
    audio_features ─ SAN-M ─ 3-frame concat ─ proj ─ L2 ──┤ embeddings ─ LLM ─ logits
                                                         ┘

Every row of a batch carries its own fixed-size patch pack (see
`data/omni_pipeline.py`); placeholder j of a row (an `<imagePatch>` or
`<videoPatch>` token, in order) takes that row's valid vision token j, so
images and videos of any size share one compiled program.

The connector (`ConnectorConfig.kind`, `models/connectors.py`) decides what
those tokens are. "linear" (M2-omni): one L2-normalised token per merged
token, in pack order. The MM1 pooling kinds ("avg_pool", "attn_pool",
"c_abstractor"): k = `num_tokens` per segment (an image, or one temporal
frame-pair of a video). `segment_grids` scatters the row's merged tokens
into S = `max_segments_per_row` grids of Hmax×Wmax = `max_grid_side`² cells
(segment rank in the row, merged (row, col) from vision_hw), the connector
runs on each grid with the segment's actual (H, W) (pooling bins of H×W,
padding cells masked), and segment s's k tokens take placeholders s·k ..
s·k + k - 1 of the row. So an image's tokens do not depend on the padding or
on the other images of its pack, and the shapes stay static.
`output_scale` multiplies the connector's tokens in every kind.

An experiment can add inputs of its own without core fields: a `ConnectorExtras`
module (`OmniModel.connector_extras`, chosen by name with `model.connector.extras`
from the plug-ins registered with `register_connector_extras`) sees the merged
tokens and the LLM's token embedding table, and returns features concatenated to
the connector's input and / or added to its output tokens.

Audio goes the same way, with a second `scatter_features` call and its own
placeholder id (`<audioPatch>`): a row holds `clips_per_row` clip slots of
fixed size, audio_features (B, C, F, 560) LFR+CMVN frames and audio_lengths
(B, C) (0 = empty slot). The SAN-M tower (`models/audio.py`) turns each clip
into exactly `num_audio_tokens` tokens (those past the audio are the LLM's
`<end_of_audio>` embedding), so a clip's N `<audioPatch>` placeholders take
its N tokens, clip after clip in row order. The audio tower exists only when
`OmniConfig.audio` is set (`config.model.audio.enabled`).

Image output (`OmniConfig.image_head`, `config.model.image_head.enabled`) [ours, after
Ming-Lite-Uni; DESIGN.md §1]: a row holds S = `images_per_row` drawing slots, gen_image
(B, S, H, W, 3) in [-1, 1] with gen_image_valid (B, S), and gen_image_cond (B, L) marks the
tokens that condition each slot (s + 1; 0 elsewhere): the tokens inside its
`<gen_image> … </gen_image>` span. Their last-layer hidden states, through a small projector
(Linear–GELU–Linear), are slot s's condition vectors, in token order (at most
`cond_tokens`), for the flow-matching DiT (`models/image_head.py`). On the query route the
span holds N `<gen_imagePatch>` tokens and learnable query embeddings (`image_queries`, one
per query, zero at init) are added to them, so they stay trainable with the LLM frozen. With
the image keys, `__call__` also sows the mean flow-matching loss over the valid slots and
their count ("intermediates": `image_flow_loss`, `image_count`), its noise and times from the
"image_head" RNG stream (a fixed key when none is given: held-out losses are deterministic).

Parameters live under `llm/`, `vision/`, `connector/`, `audio/` (and a plug-in's under
`connector_extras/`; the image output's under `image_head/`, `image_projector/`,
`image_queries`), so a tower is frozen by an `opt.frozen` path regex such as `^vision/`,
`^audio/` or `^llm/`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2omni_jax.config_fields import as_dict, dataclass_from_config
from m2omni_jax.models.audio import AudioConfig, AudioEncoder
from m2omni_jax.models import image_head as image_head_lib
from m2omni_jax.models.connectors import CONNECTOR_KINDS, grid_mask, make_connector
from m2omni_jax.models.image_head import ImageHead, ImageOutputConfig
from m2omni_jax.models import layers
from m2omni_jax.models.layers import fourier_features, kernel_init, zeros_init  # noqa: F401 (re-exported)
from m2omni_jax.models.layers import to_dtype as layers_dtype
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.vision import VisionConfig, VisionEncoder, training_flops_per_pack

VISION_KEYS = ("vision_patches", "vision_segment_ids", "vision_hw")
AUDIO_KEYS = ("audio_features", "audio_lengths")
IMAGE_OUT_KEYS = ("gen_image", "gen_image_valid", "gen_image_cond")  # with model.image_head.enabled
MEDIA_KEYS = VISION_KEYS + AUDIO_KEYS + IMAGE_OUT_KEYS  # the model's extra inputs; a batch has those that are on
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
SEGMENT_GRID = ("activation_batch", None, None, None, "activation_embed")  # (B, S, Hmax, Wmax, D)


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    # One of connectors.CONNECTOR_KINDS. "linear" (M2-omni) maps each merged token of the
    # pack to one LLM token; the MM1 pooling kinds ("avg_pool", "attn_pool",
    # "c_abstractor") turn each image / video frame-pair segment into `num_tokens` tokens.
    kind: str = "linear"
    mlp: bool = False  # Linear–GELU–Linear instead of one Linear ("linear" only)
    # Multiplies the connector's tokens [ours]: for "linear" the L2-normalised ones. 1 is the
    # paper's (a pretrained Llama's token embeddings have norms near 1); an LLM trained from
    # scratch with N(0, 1) embeddings has norms near √width, and unit-norm image tokens
    # would then be drowned in the residual stream after one layer. The MM1 connectors
    # are not normalised (as in MM1); the scale multiplies their output all the same.
    output_scale: float = 1.0
    # > 0 [ours]: add Fourier features of each token's fractional (row, col) in its image
    # (pooling kinds: of each pooled-grid cell's place), through a zero-initialised
    # projection, to the LLM-width tokens after the L2 norm and the scale (what the
    # interpolated absolute position embeddings of CLIP/SigLIP ViTs give). The NaViT's 2-D
    # RoPE is relative only, and M-RoPE's height/width ids rotate too slowly in a tiny model
    # to tell "top left" from "center". After the norm and from zero, so empty background
    # tokens start empty: added before the connector, every background token became a
    # full-norm position vector and an object's colour a small tilt of it.
    position_frequencies: int = 0
    # [ours] The name of a registered connector plug-in (`register_connector_extras`; an
    # experiment registers its own) that adds features per merged token; "" = none. The
    # plug-in's own settings live in its experiment's config section. "linear" only.
    extras: str = ""
    # The pooling kinds only (ignored by "linear"):
    num_tokens: int = 64  # k per image / video frame-pair segment [MM1: 64 or 144]; a square for grids
    # S: image / frame-pair segments one row's patch pack holds (static; the pipeline skips,
    # and counts, samples with more and never packs more into a row).
    max_segments_per_row: int = 8
    # Hmax = Wmax: the largest merged-token grid side of an image (static); the pipeline
    # skips, and counts, larger images. Each row holds S grids of Hmax×Wmax tokens.
    max_grid_side: int = 16
    hidden_width: int = 0  # c_abstractor ResNet width; 0: the vision tower's out_width
    depth: int = 3  # c_abstractor ResNet blocks before and after the pooling
    num_heads: int = 8  # attn_pool heads; must divide model.vision.out_width

    def __post_init__(self):
        if self.kind not in CONNECTOR_KINDS:
            raise ValueError(f"model.connector.kind={self.kind!r}; use one of {CONNECTOR_KINDS}")
        if self.extras and self.pools:
            raise ValueError(f"model.connector.extras={self.extras!r} adds features per merged token: "
                             f"it needs kind='linear', not {self.kind!r}")
        if not self.pools:
            return
        field = "model.connector"
        if self.mlp:
            raise ValueError(f"{field}.mlp=True is for kind='linear' only, not {self.kind!r}")
        if self.num_tokens <= 0:
            raise ValueError(f"{field}.num_tokens={self.num_tokens} must be positive for {self.kind!r} "
                             "(MM1: 64 or 144)")
        if self.kind != "attn_pool" and math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(f"{field}.num_tokens={self.num_tokens} must be a perfect square for {self.kind!r}")
        for name in ("max_segments_per_row", "max_grid_side", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{field}.{name}={getattr(self, name)} must be positive for {self.kind!r}")
        for name in ("hidden_width", "depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{field}.{name}={getattr(self, name)} must not be negative")

    @property
    def pools(self) -> bool:
        """A fixed `num_tokens` per segment (MM1's connectors), not one token per merged token."""
        return self.kind != "linear"

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """(rows, cols) of one segment's pooled tokens, raster order: (√k, √k), or (1, k)
        for an attn_pool k that is not a square. Gives their M-RoPE (h, w) ids."""
        side = math.isqrt(self.num_tokens)
        return (side, side) if side * side == self.num_tokens else (1, self.num_tokens)


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
    image_head: ImageOutputConfig | None = None  # None: no image output

    def __post_init__(self):
        connector = self.connector
        if connector.kind == "attn_pool" and self.vision.out_width % connector.num_heads:
            raise ValueError(f"model.connector.num_heads={connector.num_heads} must divide "
                             f"model.vision.out_width={self.vision.out_width} for 'attn_pool'")
        if self.audio is not None and self.audio.out_width != self.llm.width:
            raise ValueError(f"config.model.audio.out_width={self.audio.out_width} must equal "
                             f"config.model.llm.width={self.llm.width} (leave it out to take the LLM width)")

    @classmethod
    def from_config(cls, model_cfg, placeholder_ids, *, audio_placeholder_id: int = -1,
                    end_of_audio_id: int = -1) -> "OmniConfig":
        """From `config.model` (llm, vision, connector, audio sections), naming unknown fields."""
        llm = LLMConfig.from_config(model_cfg.llm)
        audio, audio_output_scale = audio_from_config(getattr(model_cfg, "audio", None), llm.width)
        return cls(llm=llm, image_head=image_output_from_config(getattr(model_cfg, "image_head", None)),
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
    values = as_dict(audio_cfg)
    enabled, scale = bool(values.pop("enabled", False)), float(values.pop("output_scale", 1.0))
    values.setdefault("out_width", llm_width)
    audio = AudioConfig.from_config(values)
    return (audio if enabled else None), scale


def image_output_from_config(cfg) -> ImageOutputConfig | None:
    """`config.model.image_head` as an ImageOutputConfig when enabled, else None (checked either way)."""
    if cfg is None:
        return None
    head = ImageOutputConfig.from_config(cfg)
    return head if head.enabled else None


MODEL_KINDS = ("llm", "omni")  # config.model.kind: text-only LLM, or LLM + vision (+ audio) towers


def model_kind(config) -> str:
    """config.model.kind, checked: the one place a run's model kind is read."""
    kind = config.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r}; use one of {MODEL_KINDS}")
    return kind


def is_omni(config) -> bool:
    return model_kind(config) == "omni"


def image_output_enabled(config) -> bool:
    """Whether a config's omni model draws (`model.image_head.enabled`)."""
    head = getattr(config.model, "image_head", None)
    return is_omni(config) and head is not None and bool(head.enabled)


def audio_enabled(config) -> bool:
    """Whether an experiment config has the audio tower (omni model, `model.audio.enabled`)."""
    return is_omni(config) and bool(config.model.audio.enabled)


def merged_positions(vision_hw, merge_size: int = 2):
    """(B, M, 2) merged (row, col) of each merged token (M = N / merge²) from the
    patch (row, col) ids vision_hw (B, 2, N): its group's first patch, halved."""
    return jnp.moveaxis(vision_hw[:, :, ::merge_size ** 2] // merge_size, 1, 2)


def grid_fractions(vision_hw, merged_segment_ids, merge_size: int = 2):
    """(B, M, 2) centre of each merged token as a fraction of its image's (rows, cols).

    vision_hw (B, 2, N) patch (row, col); merged_segment_ids (B, M), M = N / merge².
    An image's extent is the largest merged row/col of its segment (static shapes:
    segment_max over M segments).
    """
    merged = merged_positions(vision_hw, merge_size)
    extent = jax.vmap(lambda hw, seg: jax.ops.segment_max(hw, seg, num_segments=seg.shape[0] + 1)[seg])(
        merged, merged_segment_ids)
    return (merged + 0.5) / (extent + 1)


def segment_grids(features, merged_segment_ids, vision_hw, max_segments: int, max_side: int,
                  merge_size: int = 2):
    """A row's merged tokens as per-segment grids, for the pooling connectors.

    features (B, M, D); merged_segment_ids (B, M) (0 = padding); vision_hw (B, 2, N).
    Returns grids (B, S, Hmax, Wmax, D), S = `max_segments`, Hmax = Wmax = `max_side`:
    the s-th segment of the row (a contiguous run of one id) at slot s, its token at
    merged (row, col) in cell (row, col), zeros elsewhere; and extents (B, S, 2) int32,
    each segment's actual (rows, cols) (0, 0 for an empty slot). Tokens of a segment
    past S or outside the grid are dropped (the pipeline never makes such rows).
    Static shapes: a cumsum ranks the segments, a scatter places the tokens.
    """
    batch, merged, width = features.shape
    slots = max_segments * max_side * max_side
    valid = merged_segment_ids > 0
    previous = jnp.pad(merged_segment_ids[:, :-1], ((0, 0), (1, 0)))
    rank = jnp.cumsum(valid & (merged_segment_ids != previous), axis=1) - 1  # (B, M) segment rank in the row
    rc = merged_positions(vision_hw, merge_size)
    inside = valid & (rank < max_segments) & (rc[..., 0] < max_side) & (rc[..., 1] < max_side)
    cell = jnp.where(inside, (rank * max_side + rc[..., 0]) * max_side + rc[..., 1], slots)  # slots: dropped
    grids = jax.vmap(lambda f, c: jnp.zeros((slots, width), f.dtype).at[c].set(f, mode="drop"))(features, cell)
    extents = jax.vmap(lambda r, hw: jnp.zeros((max_segments, 2), jnp.int32).at[r].max(hw + 1, mode="drop"))(
        jnp.where(inside, rank, max_segments), rc.astype(jnp.int32))
    return grids.reshape(batch, max_segments, max_side, max_side, width), extents


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


class ConnectorExtras(nn.Module):
    """The plug-in point of the vision connector [ours]: what an experiment adds per merged
    token without fields in the core (e.g. a tower head's per-token labels; see
    `m2omni_jax/experiments/`). `OmniModel.connector_extras`; its parameters
    live under `connector_extras/`.

    `__call__(features, merged_segment_ids, vision_hw, embedding)`: the tower's merged
    tokens (B, M, vision out_width), their segment ids (B, M) (0 = padding), the patch
    (row, col) ids (B, 2, N) and the LLM's token embedding table (vocab, width) ->
    (inputs, outputs): inputs (B, M, `input_width()`) are concatenated to the merged
    tokens before the connector, outputs (B, M, width) added to its tokens after the L2
    norm and output_scale; either may be None.
    """

    def input_width(self) -> int:
        """Width of the features `__call__` concatenates to the connector's input."""
        return 0

    def training_flops_per_merged_token(self, config: "OmniConfig") -> float:
        """Its own model FLOPs (forward + backward) per merged token slot (the connector's
        wider input is counted by `connector_macs_per_pack`)."""
        return 0.0


# name -> factory(config, tokenizer) -> ConnectorExtras; chosen by config.model.connector.extras.
_CONNECTOR_EXTRAS: dict[str, Callable[[Any, Any], ConnectorExtras]] = {}


def register_connector_extras(name: str, factory: Callable[[Any, Any], ConnectorExtras]) -> None:
    """Makes `model.connector.extras=name` build `factory(config, tokenizer)` (an experiment
    registers its plug-ins when imported: `m2omni_jax.experiments`)."""
    known = _CONNECTOR_EXTRAS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (factory.__module__, factory.__qualname__):
        raise ValueError(f"connector extras {name!r} is already registered by {known.__module__}")
    _CONNECTOR_EXTRAS[name] = factory


def make_connector_extras(config, tokenizer) -> ConnectorExtras | None:
    """The plug-in `config.model.connector.extras` names, or None for ""."""
    name = config.model.connector.extras
    if not name:
        return None
    if name not in _CONNECTOR_EXTRAS:
        raise ValueError(f"model.connector.extras={name!r} is not registered; registered: "
                         f"{sorted(_CONNECTOR_EXTRAS)} (experiments register theirs on import of "
                         "m2omni_jax.experiments)")
    return _CONNECTOR_EXTRAS[name](config, tokenizer)


class OmniModel(nn.Module):
    """LLM + vision tower + connector; same call signature as `LLM` plus the media keys."""
    config: OmniConfig
    connector_extras: ConnectorExtras | None = None  # an experiment's plug-in (see ConnectorExtras)

    def setup(self):
        cfg = self.config
        self.llm = LLM(cfg.llm)
        self.vision = VisionEncoder(cfg.vision)
        c = cfg.connector
        self.connector = make_connector(c.kind, cfg.llm.width, c.num_tokens if c.pools else None, mlp=c.mlp,
                                        hidden_width=c.hidden_width or None, num_heads=c.num_heads, depth=c.depth,
                                        max_grid_side=c.max_grid_side,
                                        dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype,
                                        attention_implementation=cfg.vision.attention_implementation)
        if self.connector_extras is not None and c.pools:
            raise ValueError(f"model.connector.extras={c.extras!r} adds features per merged token: "
                             f"it needs model.connector.kind='linear', not {c.kind!r}")
        if c.extras and self.connector_extras is None:
            raise ValueError(f"model.connector.extras={c.extras!r}, but the OmniModel has no connector_extras "
                             "module (build.build_model makes it: omni.make_connector_extras)")
        if c.position_frequencies:
            self.position_embedding = layers.Dense(cfg.llm.width, kernel_init=zeros_init((None, "embed")),
                                               bias_init=zeros_init(("embed",)))
        if cfg.audio is not None:
            if min(cfg.audio_placeholder_id, cfg.end_of_audio_id) < 0:
                raise ValueError("OmniConfig.audio needs audio_placeholder_id and end_of_audio_id "
                                 "(the tokenizer's <audioPatch> and <end_of_audio>)")
            self.audio = AudioEncoder(cfg.audio)
        head = cfg.image_head
        if head is not None:
            self.image_head = ImageHead(head)
            self.image_projector = ImageProjector(head.cond_width, cfg.llm.dtype, cfg.llm.param_dtype)
            if head.route == "query":
                self.image_queries = self.param(
                    "image_queries", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                    (head.num_queries, cfg.llm.width), layers_dtype(cfg.llm.param_dtype))

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
        features, valid = self.vision_tokens(vision_patches, vision_segment_ids, vision_hw)
        is_placeholder = jnp.isin(tokens, jnp.asarray(self.config.placeholder_ids, tokens.dtype))
        return scatter_features(x, is_placeholder, features, valid)

    def vision_tokens(self, vision_patches, vision_segment_ids, vision_hw):
        """The row's LLM-width vision tokens, in placeholder order, and which are real:
        "linear": (B, N/4, width), one per merged token (valid: not padding); pooling
        kinds: (B, S·k, width), segment s's k tokens at s·k.. (valid: segment s exists)."""
        cfg = self.config.connector
        features, merged_segment_ids, extra_outputs = self.connector_input(vision_patches, vision_segment_ids,
                                                                           vision_hw)
        if cfg.pools:
            features, valid = self.pooled_tokens(features, merged_segment_ids, vision_hw)
        else:
            features, valid = self.connector(features), merged_segment_ids > 0
        features = features * cfg.output_scale
        if cfg.position_frequencies:
            features = features + self.position_features(vision_hw, merged_segment_ids).astype(features.dtype)
        if extra_outputs is not None:
            features = features + extra_outputs.astype(features.dtype)
        return features, valid

    def position_features(self, vision_hw, merged_segment_ids):
        """Projected Fourier features of each LLM-width token's place in its image: per merged
        token ("linear"), or per cell of each segment's pooled grid, the same for every segment
        (pooling kinds)."""
        cfg = self.config.connector
        if not cfg.pools:
            fractions = grid_fractions(vision_hw, merged_segment_ids, self.config.vision.spatial_merge_size)
            return self.position_embedding(fourier_features(fractions, cfg.position_frequencies))
        rows, cols = cfg.pooled_grid
        cells = jnp.stack(jnp.meshgrid(jnp.arange(rows), jnp.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        fractions = (cells + 0.5) / jnp.asarray([rows, cols], jnp.float32)
        per_cell = self.position_embedding(fourier_features(fractions, cfg.position_frequencies))
        return jnp.tile(per_cell, (cfg.max_segments_per_row, 1))[None]

    def vision_features(self, vision_patches, vision_segment_ids, vision_hw):
        """The connector's input: merged tokens (B, N/4, out_width) (+ the plug-in's input
        features) and their segment ids (B, N/4)."""
        features, merged_segment_ids, _ = self.connector_input(vision_patches, vision_segment_ids, vision_hw)
        return features, merged_segment_ids

    def connector_input(self, vision_patches, vision_segment_ids, vision_hw):
        """(connector input (B, N/4, ·), merged segment ids (B, N/4), the plug-in's output
        features (B, N/4, width) or None)."""
        features, merged_segment_ids = self.vision(vision_patches, vision_segment_ids, vision_hw)
        if self.connector_extras is None:
            return features, merged_segment_ids, None
        inputs, outputs = self.connector_extras(features, merged_segment_ids, vision_hw, self.llm.embedding)
        if inputs is not None:
            features = jnp.concatenate([features, inputs.astype(features.dtype)], axis=-1)
        return features, merged_segment_ids, outputs

    def pooled_tokens(self, features, merged_segment_ids, vision_hw):
        """Pooling connectors: merged tokens (B, M, D) -> (B, S·k, width) tokens, (B, S·k) bool.

        Each segment's grid (`segment_grids`) goes through the connector on its own
        (B·S grids of Hmax×Wmax, pooled by their actual extent, padding masked), so
        its k tokens depend on its tokens only.
        """
        cfg = self.config.connector
        grids, extents = segment_grids(features, merged_segment_ids, vision_hw, cfg.max_segments_per_row,
                                       cfg.max_grid_side, self.config.vision.spatial_merge_size)
        grids = nn.with_logical_constraint(grids, SEGMENT_GRID)
        batch, segments, height, width, channels = grids.shape
        grids, extents = grids.reshape(batch * segments, height, width, channels), extents.reshape(-1, 2)
        if cfg.kind == "attn_pool":
            tokens = self.connector(grids.reshape(batch * segments, height * width, channels),
                                    grid_mask(extents, height, width).reshape(batch * segments, -1))
        else:
            tokens = self.connector(grids, extents)
        tokens = nn.with_logical_constraint(tokens.reshape(batch, segments * cfg.num_tokens, -1), ACTIVATION)
        present = extents[:, 0].reshape(batch, segments) > 0
        return tokens, jnp.repeat(present, cfg.num_tokens, axis=1)

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
                 vision_segment_ids=None, vision_hw=None, audio_features=None, audio_lengths=None,
                 gen_image=None, gen_image_valid=None, gen_image_cond=None, *,
                 decode: bool = False, return_hidden: bool = False):
        """tokens (B,L); positions (3,B,L) M-RoPE ids; segment_ids (B,L); vision_patches
        (B,N,patch_dim), vision_segment_ids (B,N) (one id per image/frame, 0 = padding),
        vision_hw (B,2,N); audio_features (B,C,F,560), audio_lengths (B,C) (0 = no clip).
        gen_image (B,S,H,W,3), gen_image_valid (B,S), gen_image_cond (B,L): drawing slots and the
        tokens that condition them (see the module docstring); with gen_image the flow-matching
        loss is sown. Returns logits (B,L,vocab) (and the final hidden states)."""
        x = self.embed(tokens, vision_patches, vision_segment_ids, vision_hw, audio_features, audio_lengths)
        if gen_image_cond is not None and self.config.image_head is not None:
            x = self.add_image_queries(x, gen_image_cond)
        if gen_image is None:
            return self.llm(positions=positions, segment_ids=segment_ids, inputs_embeds=x,
                            decode=decode, return_hidden=return_hidden)
        logits, hidden = self.llm(positions=positions, segment_ids=segment_ids, inputs_embeds=x,
                                  decode=decode, return_hidden=True)
        loss, count = self.image_flow_loss(hidden, gen_image_cond, gen_image, gen_image_valid)
        self.sow("intermediates", "image_flow_loss", loss)
        self.sow("intermediates", "image_count", count)
        return (logits, hidden) if return_hidden else logits

    # ------------------------------------------------------------------ image output

    def add_image_queries(self, x, gen_image_cond):
        """Query route: + query embedding j at the j-th condition token of each slot."""
        head = self.config.image_head
        if head.route != "query":
            return x
        rank = condition_ranks(gen_image_cond, head.images_per_row)
        queries = jnp.take(self.image_queries.astype(x.dtype), jnp.clip(rank, 0, head.num_queries - 1), axis=0)
        return x + jnp.where(((gen_image_cond > 0) & (rank < head.num_queries))[..., None], queries, 0)

    def image_condition(self, hidden, gen_image_cond):
        """(B,L,width) hidden states -> condition (B·S, N, cond_width) and mask (B·S, N): slot s
        of row b at b·S + s, its tokens in order (N = `cond_tokens`; later ones dropped)."""
        head = self.config.image_head
        cond, mask = gather_condition(hidden, gen_image_cond, head.images_per_row, head.cond_tokens)
        batch = hidden.shape[0] * head.images_per_row
        cond = self.image_projector(cond.reshape(batch, head.cond_tokens, -1))
        return cond, mask.reshape(batch, head.cond_tokens)

    def image_velocity(self, x_t, t, cond, cond_mask):
        """dx/dt at (x_t, t) from the head's output (its `prediction`)."""
        out = self.image_head(x_t, t, cond, cond_mask)
        return image_head_lib.output_velocity(out, x_t, t, self.config.image_head.prediction)

    def image_flow_loss(self, hidden, gen_image_cond, gen_image, gen_image_valid):
        """(mean flow-matching loss over the valid slots, their count), both float32: the
        velocity's squared error, or with prediction "data" the clean image's."""
        head = self.config.image_head
        cond, cond_mask = self.image_condition(hidden, gen_image_cond)
        images = head.normalize(gen_image.reshape((-1,) + gen_image.shape[2:]))
        valid = gen_image_valid.reshape(-1) > 0
        rng = self.make_rng("image_head") if self.has_rng("image_head") else jax.random.key(0)
        loss = image_head_lib.flow_matching_loss(
            lambda _, x_t, t, c, m: self.image_head(x_t, t, c, m), None, images, cond, cond_mask, rng,
            cond_dropout=head.cond_dropout, time_sampling=head.time_sampling, time_mean=head.time_mean,
            time_std=head.time_std, sample_mask=valid, target=head.prediction, noise_draws=head.noise_draws)
        return loss * head.loss_weight, jnp.sum(valid).astype(jnp.float32)

    def draw(self, hidden, gen_image_cond, rng):
        """Images (B·S, H, W, 3) in [-1, 1] (clipped) for the slots `gen_image_cond` marks in
        `hidden` (B, L, width), sampled with the config's sampler, steps and guidance scale."""
        head = self.config.image_head
        cond, cond_mask = self.image_condition(hidden, gen_image_cond)
        images = image_head_lib.sample(lambda _, x_t, t, c, m: self.image_velocity(x_t, t, c, m), None, cond, cond_mask,
                                       rng, image_shape=head.image_shape, num_steps=head.sample_steps,
                                       method=head.sampler, guidance_scale=head.guidance_scale)
        return jnp.clip(head.denormalize(images), -1.0, 1.0)


class ImageProjector(nn.Module):
    """The LLM's hidden states -> the image head's condition width: Linear–GELU–Linear."""
    width: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dense = lambda name, axes: layers.Dense(  # noqa: E731
            self.width, kernel_init=kernel_init(axes), bias_init=zeros_init(axes[-1:]), name=name,
            dtype=layers_dtype(self.dtype), param_dtype=layers_dtype(self.param_dtype))
        return dense("fc2", ("mlp", "embed"))(nn.gelu(dense("fc1", ("embed", "mlp"))(x)))


def condition_ranks(gen_image_cond, slots: int):
    """(B, L) int32: each condition token's index among its slot's tokens (0, 1, ...); junk elsewhere."""
    one_hot = jax.nn.one_hot(gen_image_cond - 1, slots, dtype=jnp.int32)  # (B, L, S); 0 (no slot): all zero
    return jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)


def gather_condition(hidden, gen_image_cond, slots: int, tokens: int):
    """hidden (B, L, D), gen_image_cond (B, L) (s + 1 at slot s's tokens) -> (B, S, N, D) slot s's
    hidden states in token order, zeros past its tokens, and the (B, S, N) mask of real ones.
    Tokens past N are dropped. Static shapes: a cumsum ranks, a scatter places."""
    batch, length, width = hidden.shape
    rank = condition_ranks(gen_image_cond, slots)
    inside = (gen_image_cond > 0) & (rank < tokens)
    cell = jnp.where(inside, (gen_image_cond - 1) * tokens + rank, slots * tokens)  # slots·tokens: dropped
    place = lambda values, c: jnp.zeros((slots * tokens,) + values.shape[1:], values.dtype).at[c].set(  # noqa: E731
        values, mode="drop")
    cond = jax.vmap(place)(hidden, cell).reshape(batch, slots, tokens, width)
    mask = jax.vmap(place)(inside, cell).reshape(batch, slots, tokens)
    return nn.with_logical_constraint(cond, ("activation_batch", None, "activation_length", "activation_embed")), mask


def vision_training_flops_per_pack(config: OmniConfig, pack_size: int,
                                   extras: ConnectorExtras | None = None) -> float:
    """Model FLOPs (forward + backward, 6 per multiply-add) of one row's patch pack through
    the vision tower, the position features, the connector and its plug-in `extras` (see
    vision.training_flops_per_pack). Padding is computed, so it is counted: every merged
    token slot, and for the pooling kinds every one of the S·Hmax·Wmax grid cells."""
    merged = pack_size // config.vision.spatial_merge_size ** 2
    per_merged = 6.0 * 4 * config.connector.position_frequencies * config.llm.width
    extra_width = 0
    if extras is not None:
        per_merged += extras.training_flops_per_merged_token(config)
        extra_width = extras.input_width()
    return (training_flops_per_pack(config.vision, pack_size) + per_merged * merged
            + 6.0 * connector_macs_per_pack(config, merged, extra_width))


def connector_macs_per_pack(config: OmniConfig, merged: int, extra_input_width: int = 0) -> float:
    """Multiply-adds of the connector over one row's `merged` token slots (a plug-in's
    `extra_input_width` features concatenated to each). Approximate for the pooling kinds:
    their matmuls and the pooling einsums; norms, activations and the attention softmax
    are left out."""
    c, d, out = config.connector, config.vision.out_width, config.llm.width
    if not c.pools:
        d += extra_input_width
        return merged * (d * out + (out * out if c.mlp else 0))
    k, cells = c.num_tokens, c.max_grid_side ** 2  # per segment
    rows, cols = c.pooled_grid
    pool = lambda width, side: (rows * cells + rows * cols * side) * width  # rows, then columns
    if c.kind == "avg_pool":
        per_segment = pool(d, c.max_grid_side) + k * d * out
    elif c.kind == "attn_pool":
        # keys and values of every cell, logits and weighted sum, output projection
        per_segment = 2 * cells * d * d + 2 * k * cells * d + k * d * out
    else:
        h = c.hidden_width or d

        def blocks(n, width_in):  # 1×1 reduce, depthwise 3×3, 1×1 expand, a 1×1 shortcut if widths differ
            first = width_in * h + 9 * h + h * h + (width_in * h if width_in != h else 0)
            return n * (first + (c.depth - 1) * (2 * h * h + 9 * h)) if c.depth else 0  # (+ SE, per image)
        per_segment = blocks(cells, d) + pool(h if c.depth else d, c.max_grid_side) + blocks(k, h)
        per_segment += k * ((h if c.depth else d) * out + out * out)
    return float(c.max_segments_per_row * per_segment + (k * d * d if c.kind == "attn_pool" else 0))


def init_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
    """A zeroed KV cache for `max_len` positions of `model` (an `LLM` or an `OmniModel`)."""
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(variables["cache"]))

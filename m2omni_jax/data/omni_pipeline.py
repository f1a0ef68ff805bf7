"""grain input pipeline for the omni model: text + image + video + interleaved + audio samples.

    per task: shapes-world (or speech) ArrayRecord[task::num_tasks][process::count] → shuffle → repeat
              → decode → resize → patchify [→ centre colours]; audio → fbank → LFR → CMVN
              → chat template with expanded placeholders
    text:     the text corpus of `pipeline.py` → tokenise
    → MapDataset.mix(weights) → to_iter_dataset → drop bad records (counted)
    → grain FirstFitPackIterDataset(tokens: seq_len, patches: patches_per_row
                                     [, vision segments: model.connector.max_segments_per_row])
    → per-row finalise → batch → [mp_prefetch] → running stats (`pipeline.StatsIterator`)

Sequence assembly (`assemble_chat`): each `<image>` / `<video>` in a message
becomes `<image>` + N×`<imagePatch>` + `</image>` (N = the item's LLM tokens,
`MediaItem.num_tokens`), each `<audio>` becomes `<audio>` + N×`<audioPatch>` +
`</audio>` (N = the audio encoder's fixed `model.audio.num_audio_tokens`);
M-RoPE ids follow DESIGN.md §1: text t = h = w = running index; a patch block
gets its (t, h, w) grid ids offset by the running index at the block start;
the text after it resumes at the block's max + 1; audio placeholders count as
text (1-D positions). Only assistant text (and its `<|eot_id|>`) is trained;
prompt and media tokens are not.

The token grid depends on `model.connector` (read by `VisionOptions.from_config`):
"linear": the merged grid (t, h/2, w/2), N = t·h/2·w/2. A pooling connector
("avg_pool", "attn_pool", "c_abstractor"; models/omni.py) gives k =
`num_tokens` per image and per video frame-pair: N = k for an image, t·k for
a video, grid (t, √k, √k) ((t, 1, k) for an attn_pool k that is not a
square). It also bounds a row to S = `max_segments_per_row` images + video
frame-pairs and each image's merged grid to `max_grid_side` per side.

Batch = the text batch of `pipeline.py` plus, per row, a fixed-size patch pack
(N = `patches_per_row`, so jit never recompiles):
  vision_patches      float32 (B,N,1176)  packed patches of the row's images/frames, in order
  vision_segment_ids  int32 (B,N)         one id per image / temporal frame of the row, 0 = padding
  vision_hw           int32 (B,2,N)       (row, col) of each patch in its image
Placeholder j of a row belongs to merged patch group j (4 consecutive patches);
with a pooling connector, placeholders s·k .. s·k + k - 1 to the row's s-th segment.
With the audio tower on (`model.audio.enabled`), each row also has C =
`data.speech.clips_per_row` clip slots (F = the encoder's `max_frames`):
  audio_features      float32 (B,C,F,560) LFR+CMVN frames of the row's clips, in order, zero-padded
  audio_lengths       int32 (B,C)         valid frames per clip, 0 = empty slot
Audio placeholder block j of a row (N tokens) belongs to clip j. The CMVN
statistics come from `data.speech.cmvn_file` (`with_cmvn` computes them
from the training speech once and stores them in the workdir).

A sample with more than `seq_len` tokens, `patches_per_row` patches,
`clips_per_row` clips or a clip longer than the encoder's `max_frames` (with
a pooling connector also: more than S segments, or an image past
`max_grid_side`) is skipped and counted as a bad record (text samples are
truncated instead); packing never puts more than S segments into a row.
Caption→image (`gen_image`) records are not read: the mixture has no
image-generation modality yet.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags
from etils import epath
from jax.experimental import multihost_utils

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.data import audio as audio_frontend
from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.data import pipeline
from m2omni_jax.experiments.shapes_world import speech
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import writer as write_shapes_world
from m2omni_jax.modalities import modality_id
from m2omni_jax.models import omni

MEDIA_KEYS = omni.MEDIA_KEYS
BATCH_KEYS = pipeline.BATCH_KEYS + omni.VISION_KEYS  # + omni.AUDIO_KEYS with audio: `batch_keys(config)`
PATCH_DIM = 3 * ip.TEMPORAL_PATCH_SIZE * ip.PATCH_SIZE ** 2
_TOKEN_KEYS = ("tokens", "targets", "loss_mask", "modality", "positions")
_PATCH_KEYS = ("vision_patches", "vision_hw", "vision_frames")
SEGMENTS_KEY = "vision_segments"  # packed only (pooling connectors), not a batch key
_BAD = pipeline._BAD
_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
CMVN_FILE = "cmvn.json"  # in the workdir, beside checkpoints/

UNDERSTANDING_MODALITIES = ("text", "image", "video", "interleaved", "audio")
PIXEL_NORMS = ("clip", "clip_centered")
# Modality weights of the mixture presets; `config.data.mixture = "custom"`
# takes `config.data.modality_weights` instead.
MIXTURE_PRESETS = {
    "mm1": {"interleaved": 0.45, "image": 0.45, "text": 0.10},  # MM1 pre-training [MM1]
    "omni": {"image": 0.45, "video": 0.15, "interleaved": 0.15, "text": 0.25},  # ~25% text [paper]
}


# ----------------------------------------------------------------------------- assembly


@dataclasses.dataclass(frozen=True)
class VisionOptions:
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 115 * 115
    # > 0: every image squashed to image_side x image_side (a multiple of 28) instead of
    # smart_resize's aspect-keeping size within the pixel bounds (LLaVA's fixed resize).
    image_side: int = 0
    video_min_pixels: int = 56 * 56
    video_max_pixels: int = 60 * 60
    video_src_fps: float = 2.0
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 8
    patches_per_row: int = 256
    # "clip": CLIP mean/std, as Qwen2-VL's pretrained ViT expects. "clip_centered" [ours]:
    # then subtract each image's (video's) median colour, for a tower trained from scratch:
    # otherwise the background dominates every token and the random encoder's tokens
    # look alike, so the LLM has nothing to latch on to (shapes world: no learning at all).
    # The median is the background's colour, whatever the objects are; a mean would
    # shift every background token with the objects' colours.
    pixel_norm: str = "clip"
    # [ours] True: a user turn's leading <image>/<video> placeholders move after its text
    # ("What shape is at the top left?\n<image>"), in training and in evaluation, so the
    # image tokens can attend to the question (InstructBLIP's instruction-aware visual
    # features, inside the LLM); the records keep the image first (LLaVA, M2-omni).
    question_first: bool = False
    # Not a data.vision field: `from_config` copies `model.connector`. A pooling kind fixes
    # the tokens per image / frame-pair segment and bounds the segments per row and the
    # merged grid side; the default ("linear") gives one token per merged patch group.
    connector: omni.ConnectorConfig = omni.ConnectorConfig()

    def __post_init__(self):
        if self.patches_per_row <= 0 or self.patches_per_row % ip.MERGE_SIZE ** 2:
            raise ValueError(f"data.vision.patches_per_row={self.patches_per_row} must be a positive "
                             f"multiple of {ip.MERGE_SIZE ** 2} (merger groups)")
        if self.image_side < 0 or self.image_side % ip.FACTOR:
            raise ValueError(f"data.vision.image_side={self.image_side} must be 0 (smart_resize) "
                             f"or a positive multiple of {ip.FACTOR}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"data.vision.pixel_norm={self.pixel_norm!r}; use one of {PIXEL_NORMS}")

    @classmethod
    def from_config(cls, cfg) -> "VisionOptions":
        """From an experiment config: `data.vision`, and `model.connector` when model.kind is
        "omni"; or from a `data.vision` section alone (the linear connector's token counts)."""
        if "data" in cfg and "model" in cfg:
            connector = omni.ConnectorConfig()
            if cfg.model.get("kind", "llm") == "omni":
                connector = dataclass_from_config(omni.ConnectorConfig, cfg.model.connector, "model.connector")
            return cls._from_section(cfg.data.vision, connector)
        return cls._from_section(cfg, omni.ConnectorConfig())

    @classmethod
    def _from_section(cls, section, connector: omni.ConnectorConfig) -> "VisionOptions":
        if "connector" in section:
            raise ValueError("config.data.vision.connector is not a field; set config.model.connector")
        return dataclass_from_config(cls, section, "data.vision", connector=connector)

    @property
    def max_segments_per_row(self) -> int | None:
        """S with a pooling connector (None: no bound): images + video frame-pairs per row."""
        return self.connector.max_segments_per_row if self.connector.pools else None


@dataclasses.dataclass(frozen=True)
class AudioOptions:
    """How clips enter a batch: `num_audio_tokens` placeholders each, at most `max_frames`
    LFR frames (the encoder's budget), `clips_per_row` slots per row, CMVN statistics."""
    num_audio_tokens: int
    max_frames: int
    clips_per_row: int
    cmvn: dict | None = None  # `audio.compute_cmvn_stats`; None: features without CMVN

    def __post_init__(self):
        if self.clips_per_row <= 0:
            raise ValueError(f"config.data.speech.clips_per_row={self.clips_per_row} must be positive")

    @classmethod
    def from_config(cls, config, *, read_cmvn: bool = True) -> "AudioOptions | None":
        """From `model.audio` and `data.speech`; None when the audio tower is off."""
        if not omni.audio_enabled(config):
            return None
        audio, _ = omni.audio_from_config(config.model.audio, int(config.model.llm.width))
        cmvn = None
        if read_cmvn:
            if not config.data.speech.cmvn_file:
                raise ValueError("config.data.speech.cmvn_file is empty; m2omni-train and m2omni-eval set it "
                                 f"to <workdir>/{CMVN_FILE} (omni_pipeline.with_cmvn)")
            cmvn = audio_frontend.load_cmvn(config.data.speech.cmvn_file)
        return cls(audio.num_audio_tokens, audio.max_frames, int(config.data.speech.clips_per_row), cmvn)


@dataclasses.dataclass
class AudioClip:
    features: np.ndarray  # (frames, 560) LFR (+ CMVN) frames
    num_tokens: int  # its <audioPatch> placeholders: the encoder's fixed token count
    kind: str = "audio"


def preprocess_audio(waveform: np.ndarray, sample_rate: int, opts: AudioOptions) -> AudioClip:
    """Waveform -> encoder features; a clip the encoder cannot read whole is a ValueError."""
    features = audio_frontend.audio_features(waveform, sample_rate, cmvn=opts.cmvn)
    if not 0 < len(features) <= opts.max_frames:
        raise ValueError(f"audio clip of {len(features)} LFR frames; the encoder reads 1 to {opts.max_frames} "
                         f"(model.audio.num_audio_tokens={opts.num_audio_tokens})")
    return AudioClip(features, opts.num_audio_tokens)


def clip_arrays(clips: Sequence[np.ndarray], max_frames: int) -> dict[str, np.ndarray]:
    """Feature matrices -> audio_features (n, max_frames, 560) zero-padded, audio_lengths (n,)."""
    if not clips:
        return {"audio_features": np.zeros((0, max_frames, audio_frontend.FEATURE_DIM), np.float32),
                "audio_lengths": np.zeros(0, np.int32)}
    features, lengths = audio_frontend.pad_features(clips, max_frames)
    return {"audio_features": features, "audio_lengths": lengths}


@dataclasses.dataclass
class MediaItem:
    kind: str  # "image" | "video"
    patches: np.ndarray  # (t·h·w, PATCH_DIM) in merger order
    grid_thw: tuple[int, int, int]  # in patches
    connector: omni.ConnectorConfig = omni.ConnectorConfig()  # how its merged tokens become LLM tokens

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid_thw
        return t, h // ip.MERGE_SIZE, w // ip.MERGE_SIZE

    @property
    def num_segments(self) -> int:
        """Vision-tower segments: 1 per image, t (temporal frame-pairs) per video."""
        return self.grid_thw[0]

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(t, h, w) of its LLM tokens (and M-RoPE ids): the merged grid, or with a pooling
        connector t segments of `ConnectorConfig.pooled_grid` each."""
        if self.connector.pools:
            return (self.num_segments,) + self.connector.pooled_grid
        return self.merged_grid

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.token_grid))


def preprocess_media(kind: str, pixels, opts: VisionOptions) -> MediaItem:
    """uint8 image (H,W,3) or frames [(H,W,3)] -> patches at the configured resolution."""
    if kind == "image":
        patches, grid = ip.preprocess_image(np.asarray(pixels), opts.image_min_pixels, opts.image_max_pixels,
                                             opts.image_side)
    else:
        patches, grid = ip.preprocess_video(np.stack(pixels), opts.video_src_fps, opts.video_fps,
                                            opts.video_min_pixels, opts.video_max_pixels,
                                            opts.video_min_frames, opts.video_max_frames)
    if opts.pixel_norm == "clip_centered":
        patches = center_colors(patches)
    item = MediaItem(kind, patches, tuple(int(g) for g in grid), opts.connector)
    _, h, w = item.merged_grid
    if opts.connector.pools and max(h, w) > opts.connector.max_grid_side:
        raise ValueError(f"{kind} of {h}x{w} merged tokens exceeds model.connector.max_grid_side="
                         f"{opts.connector.max_grid_side} (data.vision.{kind}_max_pixels="
                         f"{getattr(opts, kind + '_max_pixels')})")
    return item


def center_colors(patches: np.ndarray) -> np.ndarray:
    """Subtracts the per-channel median over all patches (layout (C, T, P, P) per patch)."""
    by_channel = np.moveaxis(patches.reshape(len(patches), 3, -1), 1, 0).reshape(3, -1)
    median = np.median(by_channel, axis=1).astype(patches.dtype)
    return (patches.reshape(len(patches), 3, -1) - median[None, :, None]).reshape(patches.shape)


def record_media(record: dict, opts: VisionOptions, messages: Sequence[dict] | None = None,
                 audio_opts: AudioOptions | None = None) -> list[MediaItem | AudioClip]:
    """The media of a shapes-world (or speech) record in the order their placeholders appear."""
    images, clips = iter(record["images"]), iter(record.get("audio", []))
    items = []
    for message in record["messages"] if messages is None else messages:
        for kind in _PLACEHOLDER.findall(message["content"]):
            if kind == "audio":
                if audio_opts is None:
                    raise ValueError("a record with <audio> needs the audio tower (config.model.audio.enabled)")
                items.append(preprocess_audio(next(clips), record.get("sample_rate", audio_frontend.SAMPLE_RATE),
                                              audio_opts))
                continue
            pixels = next(images) if kind == "image" else record["video"]
            items.append(preprocess_media(kind, pixels, opts))
    return items


def expand_placeholders(messages: Sequence[dict], media: Sequence[MediaItem | AudioClip]) -> list[dict]:
    """`<image>` -> `<image>` + N×`<imagePatch>` + `</image>` (same for video and audio), in order."""
    items = iter(media)

    def block(match):
        item = next(items)
        if item.kind != match.group(1):
            raise ValueError(f"placeholder <{match.group(1)}> but media item is a {item.kind}")
        return f"<{item.kind}>" + f"<{item.kind}Patch>" * item.num_tokens + f"</{item.kind}>"
    return [{**m, "content": _PLACEHOLDER.sub(block, m["content"])} for m in messages]


def mrope_positions(ids: Sequence[int], merged_grids: Sequence[Sequence[int]],
                    patch_ids: Sequence[int]) -> np.ndarray:
    """(3, L) M-RoPE (t, h, w) ids; runs of patch tokens take the grids in order."""
    ids = np.asarray(ids)
    positions = np.zeros((3, len(ids)), np.int32)
    grids = iter(merged_grids)
    next_id, i = 0, 0
    while i < len(ids):
        if ids[i] not in patch_ids:
            positions[:, i] = next_id
            next_id, i = next_id + 1, i + 1
            continue
        t, h, w = next(grids)
        n = t * h * w
        if not np.isin(ids[i:i + n], patch_ids).all() or (i + n < len(ids) and ids[i + n] in patch_ids):
            raise ValueError(f"patch run at {i} does not hold the {n} tokens of grid {(t, h, w)}")
        block = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, n)
        positions[:, i:i + n] = block + next_id
        next_id, i = next_id + int(block.max()) + 1, i + n
    return positions


def media_token_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.special_id(f"<{name}>") for name in
            ("image", "/image", "imagePatch", "video", "/video", "videoPatch", "audio", "/audio", "audioPatch")}


_LEADING_MEDIA = re.compile(r"^((?:<(?:image|video)>\n)+)(\S.*)$", re.S)


def question_first(messages: Sequence[dict]) -> list[dict]:
    """Each user turn's leading image/video placeholders moved after its text (the media
    keep their order, so `record_media` pairs them as before)."""
    moved = []
    for message in messages:
        match = _LEADING_MEDIA.match(message["content"]) if message["role"] == "user" else None
        if match:
            message = dict(message, content=match.group(2) + "\n" + match.group(1).rstrip("\n"))
        moved.append(message)
    return moved


def record_messages(record: dict, opts: VisionOptions, turns: int | None = None) -> list[dict]:
    """The record's chat (its first `turns` messages), as the model sees it (`question_first`)."""
    messages = record["messages"][:turns]
    return question_first(messages) if opts.question_first else list(messages)


def placeholder_ids(tokenizer) -> tuple[int, int]:
    """The token ids whose embeddings the vision features replace."""
    return tokenizer.special_id("<imagePatch>"), tokenizer.special_id("<videoPatch>")


def assemble_chat(tokenizer, messages: Sequence[dict], media: Sequence[MediaItem | AudioClip], *,
                  add_generation_prompt: bool = False) -> dict:
    """Chat + media -> ids, mask (1 = trained), positions (3,L), patches, hw (2,P), frames (P,),
    audio (the clips' feature matrices, in order).

    `frames` numbers the images / temporal frames of the sample 1, 2, ...: the
    attention segments of the vision tower.
    """
    ids, mask = tokenizer.apply_chat_template(expand_placeholders(messages, media), add_generation_prompt)
    ids = np.asarray(ids, np.int32)
    patch_ids = placeholder_ids(tokenizer)
    visual = [m for m in media if m.kind != "audio"]
    clips = [m for m in media if m.kind == "audio"]
    if int(np.isin(ids, patch_ids).sum()) != sum(m.num_tokens for m in visual):
        raise ValueError("placeholder count does not match the media tokens")
    if int(np.sum(ids == tokenizer.special_id("<audioPatch>"))) != sum(c.num_tokens for c in clips):
        raise ValueError("<audioPatch> count does not match the audio clips' tokens")
    pooling = [m.connector for m in visual if m.connector.pools]
    segments = sum(m.num_segments for m in visual)
    if pooling and segments > pooling[0].max_segments_per_row:
        raise ValueError(f"{segments} image / video frame-pair segments exceed "
                         f"model.connector.max_segments_per_row={pooling[0].max_segments_per_row}")
    mask = np.where(np.isin(ids, list(media_token_ids(tokenizer).values())), 0, np.asarray(mask, np.int32))
    frames, first = [], 1
    for item in visual:
        t, h, w = item.grid_thw
        frames.append(first + np.repeat(np.arange(t, dtype=np.int32), h * w))
        first += t
    return {
        "ids": ids, "mask": mask,
        "positions": mrope_positions(ids, [m.token_grid for m in visual], patch_ids),
        "patches": np.concatenate([m.patches for m in visual] or [np.zeros((0, PATCH_DIM), np.float32)]),
        "hw": np.concatenate([ip.hw_positions(m.grid_thw) for m in visual] or [np.zeros((2, 0), np.int32)], 1),
        "frames": np.concatenate(frames or [np.zeros(0, np.int32)]),
        "audio": [c.features for c in clips],
    }


def _sample_from_assembly(chat: dict, modality: int, audio_opts: AudioOptions | None,
                          opts: VisionOptions | None = None) -> dict:
    sample = pipeline.make_sample(chat["ids"], chat["mask"], modality, len(chat["ids"]))
    sample["positions"] = chat["positions"].T.copy()  # grain packs along axis 0
    sample["vision_patches"] = chat["patches"].astype(np.float32)
    sample["vision_hw"] = chat["hw"].T.copy()
    sample["vision_frames"] = chat["frames"].astype(np.int32)
    if opts is not None and opts.connector.pools:
        sample[SEGMENTS_KEY] = _segment_entries(int(chat["frames"].max(initial=0)))
    if audio_opts is not None:
        sample.update(clip_arrays(chat["audio"], audio_opts.max_frames))
    return sample


def _segment_entries(count: int) -> np.ndarray:
    """One entry per vision segment: packed with length S, it keeps a row within S segments."""
    return np.arange(1, count + 1, dtype=np.int32)


class ShapesWorldSample:
    """Shapes-world or speech record bytes → packed-ready sample dict, or `{_BAD: 1}`."""

    def __init__(self, tokenizer, seq_len: int, opts: VisionOptions, audio_opts: AudioOptions | None = None):
        self.tokenizer, self.seq_len, self.opts, self.audio_opts = tokenizer, seq_len, opts, audio_opts

    def __call__(self, raw: bytes) -> dict:
        # assemble_chat's ValueErrors include an image past model.connector.max_grid_side
        # and more than max_segments_per_row segments (pooling connectors).
        try:
            record = speech.decode_record(raw)  # a shapes-world record is a speech record without audio
            messages = record_messages(record, self.opts)
            media = record_media(record, self.opts, messages, audio_opts=self.audio_opts)
            chat = assemble_chat(self.tokenizer, messages, media)
            modality = modality_id(record["modality"])
        except (ValueError, KeyError, TypeError, AttributeError, StopIteration, OSError):
            return {_BAD: 1}
        # Cutting a media block would break the placeholder/feature pairing.
        if len(chat["ids"]) > self.seq_len or len(chat["patches"]) > self.opts.patches_per_row:
            return {_BAD: 1}
        if chat["audio"] and len(chat["audio"]) > self.audio_opts.clips_per_row:
            return {_BAD: 1}
        return _sample_from_assembly(chat, modality, self.audio_opts, self.opts)


class TextSample:
    """Text-corpus record → the text sample of `pipeline.TokenizeRecord` with empty media."""

    def __init__(self, tokenizer, seq_len: int, audio_opts: AudioOptions | None = None,
                 opts: VisionOptions | None = None):
        self.tokenize = pipeline.TokenizeRecord(tokenizer, seq_len)
        self.audio_opts, self.opts = audio_opts, opts

    def __call__(self, raw: bytes) -> dict:
        sample = self.tokenize(raw)
        if _BAD in sample:
            return sample
        sample["positions"] = np.repeat(np.arange(len(sample["tokens"]), dtype=np.int32)[:, None], 3, 1)
        sample["vision_patches"] = np.zeros((0, PATCH_DIM), np.float32)
        sample["vision_hw"] = np.zeros((0, 2), np.int32)
        sample["vision_frames"] = np.zeros(0, np.int32)
        if self.opts is not None and self.opts.connector.pools:
            sample[SEGMENTS_KEY] = _segment_entries(0)
        if self.audio_opts is not None:
            sample.update(clip_arrays([], self.audio_opts.max_frames))
        return sample


# ----------------------------------------------------------------------------- rows


def vision_segment_ids(sample_ids: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """One id per (packed sample, frame) in the row, numbered 1, 2, ...; padding stays 0."""
    valid = sample_ids > 0
    key = sample_ids.astype(np.int64) * (int(frames.max(initial=0)) + 1) + frames
    starts = valid & (key != np.concatenate([[-1], key[:-1]]))
    return (np.cumsum(starts) * valid).astype(np.int32)


def finalize_row(row: dict) -> dict:
    """grain's packed row → the omni row format (+ the two counts, summed)."""
    out = {k: row[k] for k in ("tokens", "targets", "loss_mask", "modality")}
    out["segment_ids"] = row["tokens_segment_ids"]
    out["positions"] = row["positions"].T.copy()
    out["vision_patches"] = row["vision_patches"]
    out["vision_segment_ids"] = vision_segment_ids(row["vision_patches_segment_ids"], row["vision_frames"])
    out["vision_hw"] = row["vision_hw"].T.copy()
    out.update({k: row[k] for k in omni.AUDIO_KEYS if k in row})
    for k in pipeline._COUNT_KEYS:
        out[k] = np.int32(sum(row[k]))
    return out


# ----------------------------------------------------------------------------- mixture


def modality_weights(data_cfg) -> dict[str, float]:
    """The mixture's modality weights (a preset, or `modality_weights` when "custom")."""
    name = data_cfg.get("mixture", "custom")
    if name != "custom" and name not in MIXTURE_PRESETS:
        raise ValueError(f"config.data.mixture={name!r}; use 'custom' or one of {sorted(MIXTURE_PRESETS)}")
    weights = dict(MIXTURE_PRESETS[name] if name != "custom" else data_cfg.modality_weights)
    unknown = set(weights) - set(UNDERSTANDING_MODALITIES)
    if unknown:
        raise ValueError(f"mixture weights name unknown modalities {sorted(unknown)}; "
                         f"known: {UNDERSTANDING_MODALITIES}")
    return {k: float(v) for k, v in weights.items() if v > 0}


def source_weights(data_cfg, tasks: Sequence[str]) -> dict[str, float]:
    """Weight per source ("text", a shapes-world or a speech task); a modality's weight is
    split over its tasks by `task_weights` factors (default equal)."""
    factors = dict(data_cfg.get("task_weights", {}) or {})
    unknown = set(factors) - set(sw.TASKS) - set(speech.TASKS)
    if unknown:
        raise ValueError(f"config.data.task_weights names unknown tasks {sorted(unknown)}; "
                         f"known: {sw.TASKS + speech.TASKS}")
    out = {}
    for modality, weight in modality_weights(data_cfg).items():
        if modality == "text":
            out["text"] = weight
            continue
        members = [t for t in tasks if task_modality(t) == modality]
        if not members:
            raise ValueError(f"mixture weights modality {modality!r} but the tasks {tuple(tasks)} "
                             f"(data.shapes_world.tasks, data.speech.tasks) have no {modality} task")
        total = sum(float(factors.get(t, 1.0)) for t in members)
        out.update({t: weight * float(factors.get(t, 1.0)) / total for t in members})
    return {k: v for k, v in out.items() if v > 0}


def task_modality(task: str) -> str:
    return "audio" if task in speech.TASKS else sw.TASK_MODALITY[task]


def check_audio_mixture(config) -> None:
    """Audio in the mixture needs the audio tower."""
    weight = modality_weights(config.data).get("audio", 0.0)
    if weight > 0 and not omni.audio_enabled(config):
        raise ValueError(f"the data mixture (config.data.mixture={config.data.get('mixture', 'custom')!r}) "
                         f"gives modality 'audio' weight {weight}, but config.model.audio.enabled=False")


def speech_tasks(config) -> tuple[str, ...]:
    """The speech tasks in file order; () without the audio tower."""
    return tuple(config.data.speech.tasks) if omni.audio_enabled(config) else ()


def shapes_world_dir(config) -> str:
    """config.data.shapes_world.dir, or a directory of its own per variant under data.dir."""
    cfg = config.data.shapes_world
    key = write_shapes_world.dataset_key(int(config.data.seed), int(cfg.num_train), int(cfg.num_eval),
                                         tuple(cfg.tasks))
    return os.path.expanduser(cfg.dir or os.path.join(config.data.dir, "shapes_world", key))


def write_builtin_shapes_world(config, progress: bool = False) -> tuple[str, tuple[str, ...]]:
    """Writes (once) the shapes-world splits; returns (dir, the tasks in file order)."""
    cfg = config.data.shapes_world
    out_dir = shapes_world_dir(config)
    manifest = write_shapes_world.write_shapes_world(
        out_dir, seed=int(config.data.seed), num_train=int(cfg.num_train), num_eval=int(cfg.num_eval),
        tasks=tuple(cfg.tasks), progress=progress)
    return out_dir, tuple(manifest["tasks"])


def speech_dir(config) -> str:
    """config.data.speech.dir, or a directory of its own per variant under data.dir."""
    cfg = config.data.speech
    key = write_shapes_world.dataset_key(int(config.data.seed), int(cfg.num_train), int(cfg.num_eval),
                                         tuple(cfg.tasks))
    return os.path.expanduser(cfg.dir or os.path.join(config.data.dir, "shapes_speech", key))


def write_builtin_speech(config, progress: bool = True) -> tuple[str, tuple[str, ...]]:
    """Writes (once, with a progress bar) the speech splits; returns (dir, the tasks in file order)."""
    cfg = config.data.speech
    manifest = speech.write_speech_world(
        speech_dir(config), seed=int(config.data.seed), num_train=int(cfg.num_train), num_eval=int(cfg.num_eval),
        tasks=tuple(cfg.tasks), progress=progress)
    return speech_dir(config), tuple(manifest["tasks"])


def task_file(config, task: str, split: str) -> tuple[str, tuple[str, ...]]:
    """(the ArrayRecord file holding `task`'s records of `split`, that file's tasks in order)."""
    if task in speech.TASKS:
        out_dir, tasks = write_builtin_speech(config)
        return speech.speech_split_path(out_dir, split), tasks
    out_dir, tasks = write_builtin_shapes_world(config)
    return write_shapes_world.split_path(out_dir, split), sw.split_tasks(tasks, split)


def with_cmvn(config, workdir: str, *, compute: bool = True):
    """A copy of `config` whose `data.speech.cmvn_file` names existing CMVN statistics:
    the configured file, or `<workdir>/cmvn.json`. A missing file is computed (when
    `compute`) from the first `data.speech.cmvn_samples` training speech records,
    once; a resumed run and m2omni-eval read the same file back."""
    path = config.data.speech.cmvn_file or os.path.join(workdir, CMVN_FILE)
    if not epath.Path(path).exists():
        if not compute:
            raise FileNotFoundError(f"no CMVN statistics at {path} (config.data.speech.cmvn_file="
                                    f"{config.data.speech.cmvn_file!r}); m2omni-train writes them to its workdir")
        out_dir, _ = write_builtin_speech(config)
        stats = speech.compute_cmvn(out_dir, int(config.data.speech.cmvn_samples))
        if jax.process_index() == 0:
            epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
            audio_frontend.save_cmvn(path + ".tmp", stats)
            epath.Path(path + ".tmp").rename(path)  # a killed run leaves no half-written file
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cmvn written")
    config = config.copy_and_resolve_references()
    config.data.speech.cmvn_file = path
    return config


def _task_records(path: str, task_index: int, num_tasks: int, *, seed: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """One task's records (tasks are assigned round-robin), this process's shard, shuffled, repeated."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
    ds = ds[task_index::num_tasks][process_index::process_count]
    return ds.shuffle(seed).repeat(None)


def make_omni_dataset(config, tokenizer, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> grain.IterDataset:
    """The mixed, packed, batched omni pipeline; iterate it for `pipeline.StatsIterator`s."""
    data = config.data
    seed, seq_len = int(data.seed), int(data.seq_len)
    opts = VisionOptions.from_config(config)
    check_audio_mixture(config)
    _, file_tasks = write_builtin_shapes_world(config)
    weights = source_weights(data, file_tasks + speech_tasks(config))
    # Rows always carry the clip slots; the CMVN statistics are needed only to read speech.
    audio_opts = AudioOptions.from_config(config, read_cmvn=bool(set(weights) & set(speech.TASKS)))
    split = data.get("split", "train")
    sources = []
    for k, name in enumerate(sorted(weights)):
        if split != "train" and name in sw.TRAIN_ONLY_TASKS:
            weights.pop(name)  # e.g. vqa_dialog: no held-out records
            continue
        if name == "text":
            ds = pipeline.make_record_dataset(pipeline.builtin_text_files(config, split), seed=seed + k,
                                              process_index=process_index, process_count=process_count)
            sources.append(ds.repeat(None).map(TextSample(tokenizer, seq_len, audio_opts, opts)))
        else:
            path, tasks = task_file(config, name, split)
            ds = _task_records(path, tasks.index(name), len(tasks), seed=seed + k, process_index=process_index,
                               process_count=process_count)
            sources.append(ds.map(ShapesWorldSample(tokenizer, seq_len, opts, audio_opts)))
    mixed = grain.MapDataset.mix(sources, [weights[name] for name in sorted(weights)])
    it = mixed.to_iter_dataset(grain.ReadOptions(num_threads=int(data.get("read_threads", 2)),
                                                 prefetch_buffer_size=64))
    it = pipeline._SkipBadDataset(it).map(pipeline.WeighSampleLoss(pipeline.loss_averaging_power(data)))
    lengths = {**{k: seq_len for k in _TOKEN_KEYS}, **{k: opts.patches_per_row for k in _PATCH_KEYS}}
    if opts.connector.pools:
        lengths[SEGMENTS_KEY] = opts.connector.max_segments_per_row
    if audio_opts is not None:
        lengths.update({k: audio_opts.clips_per_row for k in omni.AUDIO_KEYS})
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=int(data.get("packing_bins", 0)) or max(16, batch_size),
        seed=seed, shuffle_bins=True, meta_features=pipeline._COUNT_KEYS)
    it = it.map(finalize_row).batch(batch_size, drop_remainder=True)
    num_workers = int(data.get("num_workers", 0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # see pipeline.make_text_dataset
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return pipeline._StatsDataset(it)


def make_train_iterator(config, tokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> pipeline.StatsIterator:
    """Infinite omni training iterator for this process; `get_state()`/`set_state()` resume exactly."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    global_batch = int(config.train.batch_size)
    if global_batch % process_count:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes")
    return iter(make_omni_dataset(config, tokenizer, batch_size=global_batch // process_count,
                                  process_index=process_index, process_count=process_count))


def example_batch_shapes(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every key of a global omni batch."""
    batch, seq_len = int(config.train.batch_size), int(config.data.seq_len)
    patches = int(config.data.vision.patches_per_row)
    shapes = {"tokens": ((batch, seq_len), np.int32), "targets": ((batch, seq_len), np.int32),
              "loss_mask": ((batch, seq_len), np.float32), "segment_ids": ((batch, seq_len), np.int32),
              "positions": ((batch, 3, seq_len), np.int32), "modality": ((batch, seq_len), np.int32),
              "vision_patches": ((batch, patches, PATCH_DIM), np.float32),
              "vision_segment_ids": ((batch, patches), np.int32),
              "vision_hw": ((batch, 2, patches), np.int32)}
    audio = AudioOptions.from_config(config, read_cmvn=False)
    if audio is not None:
        clips = (batch, audio.clips_per_row)
        shapes["audio_features"] = (clips + (audio.max_frames, audio_frontend.FEATURE_DIM), np.float32)
        shapes["audio_lengths"] = (clips, np.int32)
    return shapes


def batch_keys(config) -> tuple[str, ...]:
    """The keys of an omni batch: the audio keys only with the audio tower."""
    return BATCH_KEYS + (omni.AUDIO_KEYS if omni.audio_enabled(config) else ())


# ----------------------------------------------------------------------------- evaluation prompts


def eval_prompt(record: dict, tokenizer, opts: VisionOptions, audio_opts: AudioOptions | None = None) -> dict:
    """The first user turn of a record, ready for generation (assistant header open)."""
    messages = record_messages(record, opts, turns=1)
    return assemble_chat(tokenizer, messages, record_media(record, opts, messages, audio_opts),
                         add_generation_prompt=True)


def batch_prompts(prompts: Sequence[dict], prompt_len: int, patches_per_row: int,
                  audio_opts: AudioOptions | None = None, *, max_segments_per_row: int | None = None) -> dict:
    """Left-pads prompts to `prompt_len` (segment 0) and packs each row's patches (and, with
    `audio_opts`, its clips) to the fixed sizes. `max_segments_per_row`
    (`VisionOptions.max_segments_per_row`, a pooling connector's S) bounds each prompt's
    images + video frame-pairs (`eval_prompt` with those options checks it already)."""
    rows = len(prompts)
    out = {"tokens": np.zeros((rows, prompt_len), np.int32),
           "segment_ids": np.zeros((rows, prompt_len), np.int32),
           "positions": np.zeros((rows, 3, prompt_len), np.int32),
           "vision_patches": np.zeros((rows, patches_per_row, PATCH_DIM), np.float32),
           "vision_segment_ids": np.zeros((rows, patches_per_row), np.int32),
           "vision_hw": np.zeros((rows, 2, patches_per_row), np.int32),
           "next_position": np.zeros(rows, np.int32)}
    for r, p in enumerate(prompts):
        n, num_patches = len(p["ids"]), len(p["patches"])
        if n > prompt_len or num_patches > patches_per_row:
            raise ValueError(f"prompt of {n} tokens / {num_patches} patches exceeds "
                             f"{prompt_len} / {patches_per_row}")
        segments = int(p["frames"].max(initial=0))
        if max_segments_per_row is not None and segments > max_segments_per_row:
            raise ValueError(f"prompt with {segments} image / video frame-pair segments exceeds "
                             f"model.connector.max_segments_per_row={max_segments_per_row}")
        out["tokens"][r, prompt_len - n:] = p["ids"]
        out["segment_ids"][r, prompt_len - n:] = 1
        out["positions"][r, :, prompt_len - n:] = p["positions"]
        out["next_position"][r] = int(p["positions"].max()) + 1
        out["vision_patches"][r, :num_patches] = p["patches"]
        out["vision_segment_ids"][r, :num_patches] = p["frames"]
        out["vision_hw"][r, :, :num_patches] = p["hw"]
    if audio_opts is not None:
        out.update(_batch_clips([p["audio"] for p in prompts], audio_opts))
    return out


def _batch_clips(clips_per_prompt: Sequence[Sequence[np.ndarray]], opts: AudioOptions) -> dict[str, np.ndarray]:
    """Each prompt's clips in its row's `clips_per_row` slots."""
    rows = len(clips_per_prompt)
    out = {"audio_features": np.zeros((rows, opts.clips_per_row, opts.max_frames, audio_frontend.FEATURE_DIM),
                                      np.float32),
           "audio_lengths": np.zeros((rows, opts.clips_per_row), np.int32)}
    for r, clips in enumerate(clips_per_prompt):
        if len(clips) > opts.clips_per_row:
            raise ValueError(f"prompt with {len(clips)} audio clips exceeds data.speech.clips_per_row="
                             f"{opts.clips_per_row}")
        arrays = clip_arrays(clips, opts.max_frames)
        out["audio_features"][r, :len(clips)] = arrays["audio_features"]
        out["audio_lengths"][r, :len(clips)] = arrays["audio_lengths"]
    return out


def eval_records(config, num_samples: int, tasks: Sequence[str] | None = None) -> Iterator[dict]:
    """The first `num_samples` held-out records of the given tasks (default: all understanding tasks)."""
    shapes_dir, file_tasks = write_builtin_shapes_world(config)
    file_tasks = sw.split_tasks(file_tasks, "eval")
    wanted = [t for t in (tasks or file_tasks) if t in file_tasks]
    source = write_shapes_world.open_split(shapes_dir, "eval")
    count = 0
    for index in range(len(source)):
        if count >= num_samples:
            return
        if file_tasks[index % len(file_tasks)] in wanted:
            count += 1
            yield sw.decode_record(source[index])


def speech_eval_records(config, num_samples: int) -> Iterator[dict]:
    """The first `num_samples` held-out speech records (round-robin over data.speech.tasks)."""
    source = speech.open_speech_split(write_builtin_speech(config)[0], "eval")
    for index in range(min(num_samples, len(source))):
        yield speech.decode_record(source[index])

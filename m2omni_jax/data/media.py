"""Media preprocessing: images and video frames -> NaViT patches, audio clips -> LFR features.

`record_media` turns a record's media (arrays, file paths or encoded bytes; see
`records.py`) into `MediaItem`s / `AudioClip`s in the order of their placeholders;
`chat.assemble_chat` lays them out in the token sequence.

The token grid depends on `model.connector` (read by `VisionOptions.from_config`):
"linear": the merged grid (t, h/2, w/2), N = t·h/2·w/2. A pooling connector
("avg_pool", "attn_pool", "c_abstractor"; models/omni.py) gives k = `num_tokens` per
image and per video frame-pair: N = k for an image, t·k for a video, grid (t, √k, √k)
((t, 1, k) for an attn_pool k that is not a square). It also bounds a row to S =
`max_segments_per_row` images + video frame-pairs and each image's merged grid to
`max_grid_side` per side.

Audio clips become `model.audio.num_audio_tokens` placeholders each; the features are
normalised with CMVN statistics measured once on the training audio of the configured
sources (`with_cmvn`, stored as `<workdir>/cmvn.json`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from m2omni_jax import config_fields
from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.data import audio as audio_frontend
from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.data import records as records_lib
from m2omni_jax.data import sources
from m2omni_jax.models import omni

PATCH_DIM = 3 * ip.TEMPORAL_PATCH_SIZE * ip.PATCH_SIZE ** 2
PLACEHOLDER = re.compile(r"<(image|video|audio)>")
CMVN_FILE = "cmvn.json"  # in the workdir, beside checkpoints/
PIXEL_NORMS = ("clip", "clip_centered")


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
    # look alike, so the LLM has nothing to latch on to.
    # The median is the background's colour, whatever the objects are; a mean would
    # shift every background token with the objects' colours.
    pixel_norm: str = "clip"
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
        if hasattr(cfg, "data") and hasattr(cfg, "model"):
            connector = omni.ConnectorConfig()
            if omni.is_omni(cfg):
                connector = dataclass_from_config(omni.ConnectorConfig, cfg.model.connector, "model.connector")
            return cls._from_section(cfg.data.vision, connector)
        return cls._from_section(cfg, omni.ConnectorConfig())

    @classmethod
    def _from_section(cls, section, connector: omni.ConnectorConfig) -> "VisionOptions":
        if "connector" in config_fields.as_dict(section):
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
            raise ValueError(f"config.data.audio.clips_per_row={self.clips_per_row} must be positive")

    @classmethod
    def from_config(cls, config, *, read_cmvn: bool = True) -> "AudioOptions | None":
        """From `model.audio` and `data.audio`; None when the audio tower is off."""
        if not omni.audio_enabled(config):
            return None
        audio, _ = omni.audio_from_config(config.model.audio, int(config.model.llm.width))
        cmvn = None
        if read_cmvn:
            if not config.data.audio.cmvn_file:
                raise ValueError("config.data.audio.cmvn_file is empty; m2omni-train and m2omni-eval set it "
                                 f"to <workdir>/{CMVN_FILE} (media.with_cmvn)")
            cmvn = audio_frontend.load_cmvn(config.data.audio.cmvn_file)
        return cls(audio.num_audio_tokens, audio.max_frames, int(config.data.audio.clips_per_row), cmvn)


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
    """The media of a record (`records.py`) in the order their placeholders appear."""
    images, clips = iter(record.get("images", [])), iter(record.get("audio", []))
    items = []
    for message in record["messages"] if messages is None else messages:
        for kind in PLACEHOLDER.findall(message["content"]):
            if kind == "audio":
                if audio_opts is None:
                    raise ValueError("a record with <audio> needs the audio tower (config.model.audio.enabled)")
                waveform, rate = records_lib.load_audio(next(clips), record.get("sample_rate",
                                                                               audio_frontend.SAMPLE_RATE))
                items.append(preprocess_audio(waveform, rate, audio_opts))
                continue
            if kind == "image":
                pixels = records_lib.load_image(next(images))
            else:
                pixels = [records_lib.load_image(frame) for frame in record["video"]]
            items.append(preprocess_media(kind, pixels, opts))
    return items


# ----------------------------------------------------------------------------- CMVN


def with_cmvn(config, workdir: str, *, compute: bool = True):
    """A copy of `config` whose `data.audio.cmvn_file` names existing CMVN statistics:
    the configured file, or `<workdir>/cmvn.json`. A missing file is computed (when
    `compute`) from the clips of the first `data.audio.cmvn_samples` training records of
    the configured sources' audio parts (round-robin over the parts), once; a resumed run
    and m2omni-eval read the same file back."""
    path = config.data.audio.cmvn_file or os.fspath(epath.Path(workdir) / CMVN_FILE)  # local or gs://
    if not epath.Path(path).exists():
        if not compute:
            raise FileNotFoundError(f"no CMVN statistics at {path} (config.data.audio.cmvn_file="
                                    f"{config.data.audio.cmvn_file!r}); m2omni-train writes them to its workdir")
        stats = training_audio_cmvn(config, int(config.data.audio.cmvn_samples))
        if jax.process_index() == 0:
            epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
            audio_frontend.save_cmvn(path + ".tmp", stats)
            epath.Path(path + ".tmp").rename(path)  # a killed run leaves no half-written file
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cmvn written")
    return config_fields.replace(config, **{"data.audio.cmvn_file": path})


def training_audio_cmvn(config, num_records: int) -> dict:
    """CMVN statistics (`audio.compute_cmvn_stats`) of every clip of the first `num_records`
    training records of the audio parts, features without CMVN."""
    records = sources.round_robin(sources.part_records(config, "train", modalities=("audio",)))
    feats = []
    for record in itertools.islice((r for r in records if not records_lib.is_bad(r)), num_records):
        for clip in record.get("audio", []):
            waveform, rate = records_lib.load_audio(clip, record.get("sample_rate", audio_frontend.SAMPLE_RATE))
            feats.append(audio_frontend.audio_features(waveform, rate))
    if not feats:
        raise ValueError("no training audio to measure CMVN statistics on: config.data.sources "
                         f"({sorted(config.data.sources)}) have no audio part")
    return audio_frontend.compute_cmvn_stats(feats)

"""grain input pipeline for the omni model: the sources' parts mixed, packed and batched.

    per part (`sources.parts`: a TFDS data set, a task of a generated set, ...): records
        [process::count] → shuffle(seed + k) → repeat → record → sample (`OmniSample`:
        media.py's preprocessing, chat.py's assembly; unreadable → bad-record marker)
    → MapDataset.mix(mixture weights) → to_iter_dataset → drop bad records (counted)
    → grain FirstFitPackIterDataset(tokens: seq_len, patches: patches_per_row
                                     [, vision segments: model.connector.max_segments_per_row]
                                     [, clips: data.audio.clips_per_row])
    [→ pair packing (`data.pack_pairs`): a row's samples of those modalities joined into one
       sequence, attending to each other (`pipeline.JoinRowPairs`)]
    → per-row finalise → batch → [mp_prefetch] → running stats (`pipeline.StatsIterator`)

The mixture: `config.data.mixture` names a preset of modality weights (MIXTURE_PRESETS)
or "custom" (`config.data.modality_weights`); each modality's weight is split over the
parts of that modality in proportion to their weights (`Part.weight`: a source's own
factor, e.g. a per-task factor). Part k (in name order) is shuffled with
seed `data.seed + k`.

Batch = the text batch of `pipeline.py` plus, per row, a fixed-size patch pack
(N = `patches_per_row`, so jit never recompiles):
  vision_patches      float32 (B,N,1176)  packed patches of the row's images/frames, in order
  vision_segment_ids  int32 (B,N)         one id per image / temporal frame of the row, 0 = padding
  vision_hw           int32 (B,2,N)       (row, col) of each patch in its image
Placeholder j of a row belongs to merged patch group j (4 consecutive patches);
with a pooling connector, placeholders s·k .. s·k + k - 1 to the row's s-th segment.
With the audio tower on (`model.audio.enabled`), each row also has C =
`data.audio.clips_per_row` clip slots (F = the encoder's `max_frames`):
  audio_features      float32 (B,C,F,560) LFR+CMVN frames of the row's clips, in order, zero-padded
  audio_lengths       int32 (B,C)         valid frames per clip, 0 = empty slot
Audio placeholder block j of a row (N tokens) belongs to clip j.
With the image head on (`model.image_head.enabled`), each row also has S =
`model.image_head.images_per_row` drawing slots (H = W = its `image_size`):
  gen_image           float32 (B,S,H,W,3) the row's drawn images, in order, in [-1, 1]; zero-padded
  gen_image_valid     int32 (B,S)         1 = a drawing, 0 = empty slot
  gen_image_cond      int32 (B,T)         s + 1 at the tokens inside the span of the row's s-th drawing
A source with `reverse=True` (an image–caption source) is read as drawing requests
(`records.drawing_record`, its `draw_prompt`), modality "image_gen".

A sample with media (or drawings) and more than `seq_len` tokens, `patches_per_row` patches,
`clips_per_row` clips or a clip longer than the encoder's `max_frames` (with a pooling
connector also: more than S segments, or an image past `max_grid_side`) is skipped and
counted as a bad record; a sample without media is truncated instead. Packing never puts
more than S segments into a row.
"""
from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np
from absl import flags

from m2omni_jax.data import audio as audio_frontend
from m2omni_jax.data import chat, media, pipeline, sources
from m2omni_jax.data import records as records_lib
from m2omni_jax.modalities import modality_id
from m2omni_jax.models import omni


MEDIA_KEYS = omni.MEDIA_KEYS
BATCH_KEYS = pipeline.BATCH_KEYS + omni.VISION_KEYS  # + omni.AUDIO_KEYS with audio: `batch_keys(config)`
_TOKEN_KEYS = ("tokens", "targets", "loss_mask", "modality", "positions")
_PATCH_KEYS = ("vision_patches", "vision_hw", "vision_frames")

UNDERSTANDING_MODALITIES = records_lib.RECORD_MODALITIES
# Modality weights of the mixture presets; `config.data.mixture = "custom"`
# takes `config.data.modality_weights` instead.
MIXTURE_PRESETS = {
    "mm1": {"interleaved": 0.45, "image": 0.45, "text": 0.10},  # MM1 pre-training [MM1]
    "omni": {"image": 0.45, "video": 0.15, "interleaved": 0.15, "text": 0.25},  # ~25% text [paper]
}


class OmniSample:
    """An omni record → a packed-ready sample dict, or the bad-record marker."""

    def __init__(self, tokenizer, seq_len: int, opts: media.VisionOptions, audio_opts: media.AudioOptions | None = None,
                 draw_opts: chat.DrawOptions | None = None):
        self.tokenizer, self.seq_len, self.opts, self.audio_opts = tokenizer, seq_len, opts, audio_opts
        self.draw_opts = draw_opts

    def __call__(self, record: dict) -> dict:
        if records_lib.is_bad(record):
            return record
        # assemble_record's ValueErrors include an image past model.connector.max_grid_side
        # and more than max_segments_per_row segments (pooling connectors).
        try:
            assembled = chat.assemble_record(self.tokenizer, record, self.opts, self.audio_opts, self.draw_opts)
            modality = modality_id(record.get("modality", "text"))
        except records_lib.READ_ERRORS:
            return records_lib.bad_record()
        if not len(assembled["patches"]) and not assembled["audio"] and "gen_image" not in assembled:
            return chat.sample_from_chat(assembled, modality, self.audio_opts, self.opts, seq_len=self.seq_len,
                                         draw_opts=self.draw_opts)
        # Cutting a media block would break the placeholder/feature pairing.
        if len(assembled["ids"]) > self.seq_len or len(assembled["patches"]) > self.opts.patches_per_row:
            return records_lib.bad_record()
        if assembled["audio"] and len(assembled["audio"]) > self.audio_opts.clips_per_row:
            return records_lib.bad_record()
        return chat.sample_from_chat(assembled, modality, self.audio_opts, self.opts, draw_opts=self.draw_opts)


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
    if "gen_image" in row:
        out.update(gen_image=row["gen_image"], gen_image_valid=row["gen_image_valid"],
                   gen_image_cond=drawing_slots(row["tokens_segment_ids"], row["gen_image_cond"]))
    for k in pipeline.COUNT_KEYS:
        out[k] = np.int32(sum(row[k]))
    return out


def drawing_slots(sample_ids: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """Each packed sample's own span numbers (1, 2, ... per sample) -> the row's drawing slots
    (1, 2, ... over the row, in order: the order grain packs the samples' drawings in)."""
    marked = cond > 0
    key = sample_ids.astype(np.int64) * (int(cond.max(initial=0)) + 1) + cond
    starts = marked & (key != np.concatenate([[-1], key[:-1]]))
    return (np.cumsum(starts) * marked).astype(np.int32)


# ----------------------------------------------------------------------------- mixture


def modality_weights(data_cfg) -> dict[str, float]:
    """The mixture's modality weights (a preset, or `modality_weights` when "custom")."""
    name = data_cfg.mixture
    if name != "custom" and name not in MIXTURE_PRESETS:
        raise ValueError(f"config.data.mixture={name!r}; use 'custom' or one of {sorted(MIXTURE_PRESETS)}")
    weights = dict(MIXTURE_PRESETS[name] if name != "custom" else data_cfg.modality_weights)
    unknown = set(weights) - set(UNDERSTANDING_MODALITIES)
    if unknown:
        raise ValueError(f"mixture weights name unknown modalities {sorted(unknown)}; "
                         f"known: {UNDERSTANDING_MODALITIES}")
    return {k: float(v) for k, v in weights.items() if v > 0}


def part_weights(data_cfg, parts: dict[str, sources.Part]) -> dict[str, float]:
    """Weight per part: each modality's weight split over its parts by their `weight`s."""
    out = {}
    for modality, weight in modality_weights(data_cfg).items():
        members = [name for name, part in parts.items() if part.modality == modality]
        if not members:
            raise ValueError(f"mixture weights modality {modality!r} but config.data.sources have no {modality} "
                             f"part (parts: { {n: p.modality for n, p in parts.items()} })")
        total = sum(parts[name].weight for name in members)
        out.update({name: weight * parts[name].weight / total for name in members})
    return {k: v for k, v in out.items() if v > 0}


def check_drawing_mixture(config) -> None:
    """Drawing requests in the mixture need the image head."""
    weight = modality_weights(config.data).get("image_gen", 0.0)
    if weight > 0 and not omni.image_output_enabled(config):
        raise ValueError(f"the data mixture (config.data.mixture={config.data.mixture!r}) gives modality "
                         f"'image_gen' weight {weight}, but config.model.image_head.enabled=False")


class ReversedRecords:
    """A part's records read as drawing requests (`records.DrawingRecords`); picklable."""

    def __init__(self, records, prompt: str):
        self.records, self.prompt = records, prompt

    def __call__(self) -> grain.MapDataset:
        return self.records().map(records_lib.DrawingRecords(self.prompt))


def split_parts(config, split: str) -> dict[str, sources.Part]:
    """The sources' parts of `split`, a `reverse=True` source's as drawing requests ("image_gen")."""
    out = {}
    for name, part in sources.parts(config, split).items():
        cfg = config.data.sources[part.source]
        if cfg.get("reverse", False):
            part = dataclasses.replace(part, modality="image_gen",
                                       records=ReversedRecords(part.records, cfg.get("draw_prompt", "Draw {}.")))
        out[name] = part
    return out


def check_audio_mixture(config) -> None:
    """Audio in the mixture needs the audio tower."""
    weight = modality_weights(config.data).get("audio", 0.0)
    if weight > 0 and not omni.audio_enabled(config):
        raise ValueError(f"the data mixture (config.data.mixture={config.data.mixture!r}) "
                         f"gives modality 'audio' weight {weight}, but config.model.audio.enabled=False")


def make_omni_dataset(config, tokenizer, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> grain.IterDataset:
    """The mixed, packed, batched omni pipeline; iterate it for `pipeline.StatsIterator`s."""
    data = config.data
    seed, seq_len = int(data.seed), int(data.seq_len)
    opts = media.VisionOptions.from_config(config)
    check_audio_mixture(config)
    check_drawing_mixture(config)
    train_parts = split_parts(config, "train")
    weights = part_weights(data, train_parts)
    # Rows always carry the clip slots; the CMVN statistics are needed only to read audio (spoken
    # questions, also in spoken-answer records of modality speech_gen).
    audio_opts = media.AudioOptions.from_config(
        config, read_cmvn=any(train_parts[name].modality in ("audio", "speech_gen") for name in weights))
    split = data.split
    parts_of_split = train_parts if split == "train" else split_parts(config, split)
    draw_opts = chat.DrawOptions.from_config(config)
    to_sample = OmniSample(tokenizer, seq_len, opts, audio_opts, draw_opts)
    datasets = []
    for k, name in enumerate(sorted(weights)):  # k: the seed offset stays with the part's name
        if name not in parts_of_split:
            weights.pop(name)  # a train-only part (no held-out records)
            continue
        ds = parts_of_split[name].records()[process_index::process_count]
        datasets.append(ds.shuffle(seed + k).repeat(None).map(to_sample))
    mixed = grain.MapDataset.mix(datasets, [weights[name] for name in sorted(weights)])
    it = mixed.to_iter_dataset(grain.ReadOptions(num_threads=int(data.read_threads),
                                                 prefetch_buffer_size=64))
    it = pipeline.SkipBadDataset(it).map(pipeline.WeighSampleLoss(pipeline.loss_averaging_power(data)))
    lengths = {**{k: seq_len for k in _TOKEN_KEYS}, **{k: opts.patches_per_row for k in _PATCH_KEYS}}
    if opts.connector.pools:
        lengths[chat.SEGMENTS_KEY] = opts.connector.max_segments_per_row
    if audio_opts is not None:
        lengths.update({k: audio_opts.clips_per_row for k in omni.AUDIO_KEYS})
    if draw_opts is not None:
        lengths.update(gen_image=draw_opts.images_per_row, gen_image_valid=draw_opts.images_per_row,
                       gen_image_cond=seq_len)
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=int(data.packing_bins) or max(16, batch_size),
        seed=seed, shuffle_bins=True, meta_features=pipeline.COUNT_KEYS)
    pack_pairs = pipeline.pack_pair_modalities(data)
    if pack_pairs:  # after first-fit packing: rows as full as with separate segments
        it = it.map(pipeline.JoinRowPairs(pack_pairs))
    it = it.map(finalize_row).batch(batch_size, drop_remainder=True)
    num_workers = int(data.num_workers)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # see pipeline.make_text_dataset
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return pipeline.StatsDataset(it)


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
              "vision_patches": ((batch, patches, media.PATCH_DIM), np.float32),
              "vision_segment_ids": ((batch, patches), np.int32),
              "vision_hw": ((batch, 2, patches), np.int32)}
    audio = media.AudioOptions.from_config(config, read_cmvn=False)
    if audio is not None:
        clips = (batch, audio.clips_per_row)
        shapes["audio_features"] = (clips + (audio.max_frames, audio_frontend.FEATURE_DIM), np.float32)
        shapes["audio_lengths"] = (clips, np.int32)
    draw = chat.DrawOptions.from_config(config)
    if draw is not None:
        slots = (batch, draw.images_per_row)
        shapes["gen_image"] = (slots + (draw.image_size, draw.image_size, 3), np.float32)
        shapes["gen_image_valid"] = (slots, np.int32)
        shapes["gen_image_cond"] = ((batch, seq_len), np.int32)
    return shapes


def batch_keys(config) -> tuple[str, ...]:
    """The keys of an omni batch: the audio keys only with the audio tower, the drawing keys only
    with the image head."""
    return (BATCH_KEYS + (omni.AUDIO_KEYS if omni.audio_enabled(config) else ())
            + (omni.IMAGE_OUT_KEYS if omni.image_output_enabled(config) else ()))

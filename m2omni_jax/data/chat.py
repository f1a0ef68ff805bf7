"""Chat assembly: a record's turns and media -> token ids, loss mask, M-RoPE ids, patches, clips.

Each `<image>` / `<video>` in a message becomes `<image>` + N×`<imagePatch>` +
`</image>` (N = the item's LLM tokens, `MediaItem.num_tokens`), each `<audio>` becomes
`<audio>` + N×`<audioPatch>` + `</audio>` (N = the audio encoder's fixed
`model.audio.num_audio_tokens`). M-RoPE ids follow DESIGN.md §1: text t = h = w =
running index; a patch block gets its (t, h, w) grid ids offset by the running index at
the block start; the text after it resumes at the block's max + 1; audio placeholders
count as text (1-D positions). Only assistant text (and its `<|eot_id|>`) is trained;
prompt and media tokens are not. A plain-text record is bos + text + eos, all trained.

Drawings (with the image head, `DrawOptions`): each `<gen_image>DESCRIPTION</gen_image>` span
of an assistant turn draws the record's next `gen_images` entry. The query route replaces the
description by N `<gen_imagePatch>` tokens; the caption route keeps it (the LLM learns to
write it). The whole assistant turn is trained as text. `cond` (L,) marks the tokens inside
the k-th span with k (1, 2, ...): their hidden states condition drawing k, resized to the
head's square `image_size` in [-1, 1] (`gen_image` (n, H, W, 3), `gen_image_valid` (n,)).

Evaluation prompts (`eval_prompt`, `batch_prompts`): a record's first user turn with the
assistant header open, left-padded to a fixed length, its patches and clips packed to
the batch's fixed sizes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
from PIL import Image

from m2omni_jax.data import audio as audio_frontend
from m2omni_jax.data import image_preprocessing as ip
from m2omni_jax.data import media as media_lib
from m2omni_jax.data import pipeline
from m2omni_jax.data import records as records_lib
from m2omni_jax.models import omni
from m2omni_jax.models.image_head import ImageOutputConfig

SEGMENTS_KEY = "vision_segments"  # packed only (pooling connectors), not a batch key
DRAWING_KEYS = omni.IMAGE_OUT_KEYS  # gen_image, gen_image_valid, gen_image_cond
GEN_IMAGE_SPAN = re.compile("{}(.*?){}".format(*map(re.escape, records_lib.GEN_IMAGE_SPAN)), re.S)


@dataclasses.dataclass(frozen=True)
class DrawOptions:
    """What the data needs of `config.model.image_head` (see models/image_head.py)."""
    route: str = "query"
    num_queries: int = 8
    image_size: int = 32
    images_per_row: int = 2

    @classmethod
    def from_config(cls, config) -> "DrawOptions | None":
        """None unless the omni model has the image head."""
        if not omni.image_output_enabled(config):
            return None
        head = ImageOutputConfig.from_config(config.model.image_head)
        return cls(head.route, head.num_queries, head.image_size, head.images_per_row)


def drawing_messages(messages: Sequence[dict], opts: DrawOptions) -> list[dict]:
    """Query route: each assistant `<gen_image>…</gen_image>` span's description becomes N
    `<gen_imagePatch>` tokens; the caption route keeps the messages as they are."""
    if opts.route != "query":
        return list(messages)
    open_, close = records_lib.GEN_IMAGE_SPAN
    queries = open_ + "<gen_imagePatch>" * opts.num_queries + close
    return [{**m, "content": GEN_IMAGE_SPAN.sub(queries, m["content"])} if m["role"] == "assistant" else m
            for m in messages]


def condition_slots(ids: Sequence[int], open_id: int, close_id: int) -> np.ndarray:
    """(L,) int32: k at the tokens inside the k-th `<gen_image>` … `</gen_image>` span (k = 1, 2,
    ...), 0 elsewhere (the markers included). A span unclosed, nested or empty is a ValueError."""
    out = np.zeros(len(ids), np.int32)
    span, start = 0, None
    for i, token in enumerate(ids):
        if token == open_id:
            if start is not None:
                raise ValueError(f"<gen_image> at {i} inside the span opened at {start}")
            span, start = span + 1, i
        elif token == close_id:
            if start is None or i == start + 1:
                raise ValueError(f"</gen_image> at {i} closes {'no' if start is None else 'an empty'} span")
            start = None
        elif start is not None:
            out[i] = span
    if start is not None:
        raise ValueError(f"<gen_image> at {start} is never closed")
    return out


def drawing_target(image, size: int) -> np.ndarray:
    """An image (array, path or bytes) -> float32 (size, size, 3) in [-1, 1]: squashed to the
    square, box-filtered when shrinking (each pixel the mean of what it covers)."""
    pixels = Image.fromarray(records_lib.load_image(image))
    shrink = min(pixels.size) >= size
    pixels = pixels.resize((size, size), Image.BOX if shrink else Image.BILINEAR)
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def drawings(tokenizer, ids: np.ndarray, gen_images: Sequence, opts: DrawOptions) -> dict:
    """cond (L,), gen_image (n, H, W, 3) and gen_image_valid (n,) of an assembled chat's spans."""
    cond = condition_slots(ids, tokenizer.special_id("<gen_image>"), tokenizer.special_id("</gen_image>"))
    spans = int(cond.max(initial=0))
    if spans != len(gen_images):
        raise ValueError(f"{spans} <gen_image> span(s) but {len(gen_images)} gen_images")
    if spans > opts.images_per_row:
        raise ValueError(f"{spans} drawings exceed model.image_head.images_per_row={opts.images_per_row}")
    size = opts.image_size
    targets = [drawing_target(image, size) for image in gen_images]
    return {"cond": cond, "gen_image": np.stack(targets) if targets else np.zeros((0, size, size, 3), np.float32),
            "gen_image_valid": np.ones(spans, np.int32)}


def expand_placeholders(messages: Sequence[dict], media: Sequence[media_lib.MediaItem | media_lib.AudioClip]) -> list[dict]:
    """`<image>` -> `<image>` + N×`<imagePatch>` + `</image>` (same for video and audio), in order."""
    items = iter(media)

    def block(match):
        item = next(items)
        if item.kind != match.group(1):
            raise ValueError(f"placeholder <{match.group(1)}> but media item is a {item.kind}")
        return f"<{item.kind}>" + f"<{item.kind}Patch>" * item.num_tokens + f"</{item.kind}>"
    return [{**m, "content": media_lib.PLACEHOLDER.sub(block, m["content"])} for m in messages]


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


def placeholder_ids(tokenizer) -> tuple[int, int]:
    """The token ids whose embeddings the vision features replace."""
    return tokenizer.special_id("<imagePatch>"), tokenizer.special_id("<videoPatch>")


def assemble_chat(tokenizer, messages: Sequence[dict], media: Sequence[media_lib.MediaItem | media_lib.AudioClip], *,
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
        "patches": np.concatenate([m.patches for m in visual] or [np.zeros((0, media_lib.PATCH_DIM), np.float32)]),
        "hw": np.concatenate([ip.hw_positions(m.grid_thw) for m in visual] or [np.zeros((2, 0), np.int32)], 1),
        "frames": np.concatenate(frames or [np.zeros(0, np.int32)]),
        "audio": [c.features for c in clips],
    }


def sample_from_chat(chat: dict, modality: int, audio_opts: media_lib.AudioOptions | None,
                     opts: media_lib.VisionOptions | None = None, seq_len: int | None = None,
                     draw_opts: DrawOptions | None = None) -> dict:
    """An assembled chat -> one unpacked sample for grain's packing (axis 0 = sequence);
    `seq_len` truncates (text without media only: a cut media block would lose its pairing).
    With `draw_opts` every sample has the drawing keys (none drawn: empty)."""
    sample = pipeline.make_sample(chat["ids"], chat["mask"], modality, seq_len or len(chat["ids"]))
    sample["positions"] = chat["positions"][:, :len(sample["tokens"])].T.copy()  # grain packs along axis 0
    sample["vision_patches"] = chat["patches"].astype(np.float32)
    sample["vision_hw"] = chat["hw"].T.copy()
    sample["vision_frames"] = chat["frames"].astype(np.int32)
    if opts is not None and opts.connector.pools:
        sample[SEGMENTS_KEY] = segment_entries(int(chat["frames"].max(initial=0)))
    if audio_opts is not None:
        sample.update(media_lib.clip_arrays(chat["audio"], audio_opts.max_frames))
    if draw_opts is not None:
        size, n = draw_opts.image_size, len(sample["tokens"])
        sample["gen_image"] = chat.get("gen_image", np.zeros((0, size, size, 3), np.float32))
        sample["gen_image_valid"] = chat.get("gen_image_valid", np.zeros(0, np.int32))
        sample["gen_image_cond"] = chat.get("cond", np.zeros(n, np.int32))[:n].astype(np.int32)
    return sample


def segment_entries(count: int) -> np.ndarray:
    """One entry per vision segment: packed with length S, it keeps a row within S segments."""
    return np.arange(1, count + 1, dtype=np.int32)


def assemble_text(tokenizer, text: str) -> dict:
    """A plain document -> `assemble_chat`'s dict: bos + text + eos, every target trained."""
    if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}, not str")
    ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)
    mask = np.concatenate([[0], np.ones(len(ids) - 1, np.int32)]).astype(np.int32)
    return {"ids": ids, "mask": mask, "positions": np.tile(np.arange(len(ids), dtype=np.int32), (3, 1)),
            "patches": np.zeros((0, media_lib.PATCH_DIM), np.float32), "hw": np.zeros((2, 0), np.int32),
            "frames": np.zeros(0, np.int32), "audio": []}


def assemble_record(tokenizer, record: dict, opts: media_lib.VisionOptions,
                    audio_opts: media_lib.AudioOptions | None = None, draw_opts: DrawOptions | None = None) -> dict:
    """A record (`records.py`) -> `assemble_chat`'s dict (+ `drawings`' keys with `draw_opts`
    when the record draws)."""
    if "messages" not in record:
        return assemble_text(tokenizer, record["text"])
    messages = record["messages"]
    if draw_opts is not None:
        messages = drawing_messages(messages, draw_opts)
    assembled = assemble_chat(tokenizer, messages, media_lib.record_media(record, opts, messages, audio_opts))
    if draw_opts is not None and (record.get("gen_images") or np.any(
            assembled["ids"] == tokenizer.special_id(records_lib.GEN_IMAGE_SPAN[0]))):
        assembled.update(drawings(tokenizer, assembled["ids"], record.get("gen_images", []), draw_opts))
    return assembled


def eval_prompt(record: dict, tokenizer, opts: media_lib.VisionOptions, audio_opts: media_lib.AudioOptions | None = None) -> dict:
    """A record's turns up to its first user turn (a system turn kept), ready for generation
    (assistant header open)."""
    roles = [m["role"] for m in record["messages"]]
    messages = record["messages"][:roles.index("user") + 1 if "user" in roles else 1]
    return assemble_chat(tokenizer, messages, media_lib.record_media(record, opts, messages, audio_opts),
                         add_generation_prompt=True)


def batch_prompts(prompts: Sequence[dict], prompt_len: int, patches_per_row: int,
                  audio_opts: media_lib.AudioOptions | None = None, *, max_segments_per_row: int | None = None) -> dict:
    """Left-pads prompts to `prompt_len` (segment 0) and packs each row's patches (and, with
    `audio_opts`, its clips) to the fixed sizes. `max_segments_per_row`
    (`VisionOptions.max_segments_per_row`, a pooling connector's S) bounds each prompt's
    images + video frame-pairs (`eval_prompt` with those options checks it already)."""
    rows = len(prompts)
    out = {"tokens": np.zeros((rows, prompt_len), np.int32),
           "segment_ids": np.zeros((rows, prompt_len), np.int32),
           "positions": np.zeros((rows, 3, prompt_len), np.int32),
           "vision_patches": np.zeros((rows, patches_per_row, media_lib.PATCH_DIM), np.float32),
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
        out.update(batch_clips([p["audio"] for p in prompts], audio_opts))
    return out


def batch_clips(clips_per_prompt: Sequence[Sequence[np.ndarray]], opts: media_lib.AudioOptions) -> dict[str, np.ndarray]:
    """Each prompt's clips in its row's `clips_per_row` slots."""
    rows = len(clips_per_prompt)
    out = {"audio_features": np.zeros((rows, opts.clips_per_row, opts.max_frames, audio_frontend.FEATURE_DIM),
                                      np.float32),
           "audio_lengths": np.zeros((rows, opts.clips_per_row), np.int32)}
    for r, clips in enumerate(clips_per_prompt):
        if len(clips) > opts.clips_per_row:
            raise ValueError(f"prompt with {len(clips)} audio clips exceeds data.audio.clips_per_row="
                             f"{opts.clips_per_row}")
        arrays = media_lib.clip_arrays(clips, opts.max_frames)
        out["audio_features"][r, :len(clips)] = arrays["audio_features"]
        out["audio_lengths"][r, :len(clips)] = arrays["audio_lengths"]
    return out



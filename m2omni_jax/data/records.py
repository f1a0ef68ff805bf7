"""The omni record: what every source yields and everything past a source reads.

A record is a dict:

  messages     [{"role": "system" | "user" | "assistant", "content": str}, ...]; the content
               holds one `<image>`, `<video>` or `<audio>` placeholder per media item, in the
               order of the lists below (a turn may hold several, in any order). Only
               assistant turns are trained.
  text         instead of `messages`: a plain document (bos + text + eos, every token trained)
  images       [image, ...] for the `<image>` placeholders, in order; an image is a uint8
               (H, W, 3) array, a file path, or encoded bytes (PNG, JPEG, ... as Pillow reads)
  video        [frame, ...] for the one `<video>` placeholder: frames as images (at
               `data.vision.video_src_fps`)
  audio        [clip, ...] for the `<audio>` placeholders, in order; a clip is a float
               waveform in [-1, 1], a file path, or encoded bytes (WAV, FLAC, ... as
               soundfile reads)
  sample_rate  Hz of the waveform clips (default 16,000); a file's own rate wins
  gen_images   [image, ...] the images the assistant draws, one per `<gen_image>DESCRIPTION</gen_image>`
               span of its turns, in order (the paper's format: the description is what the LLM
               writes on the caption route; the query route puts N `<gen_imagePatch>` in its place)
  modality     "text" | "image" | "video" | "interleaved" | "audio" | "image_gen" (drawing
               requests) | "speech_gen" (spoken answers, data/audio_tokens.py): the modality tag of the sample's tokens (losses per modality, the
               mixture's modality weights)
  task, id, answer, attributes, ...  optional metadata, passed through untouched (held-out
               scoring reads them; training does not)

An image–caption record read in reverse (`drawing_record`) is a drawing request: the caption
asked for and described, the image drawn.

Serialised (`encode_record`, ArrayRecord files of the `array_record` source): a msgpack
map, images, drawn images and video frames as PNG bytes, clips as little-endian int16 PCM bytes. UTF-8
JSON of a text record (`{"text": ...}` or `{"messages": [...]}`) decodes too.

A source whose record cannot be read returns `bad_record()` in its place; the pipeline
skips it and counts it (`stats["bad_records"]`).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import msgpack
import numpy as np
from PIL import Image

BAD_RECORD = "bad_record"  # key of the marker a failed record becomes
RECORD_MODALITIES = ("text", "image", "video", "interleaved", "audio", "image_gen", "speech_gen")
GEN_IMAGE_SPAN = ("<gen_image>", "</gen_image>")  # an assistant's drawing: description between
DEFAULT_SAMPLE_RATE = 16_000
_PNG_COMPRESS_LEVEL = 6
# What reading a malformed record raises; anything else is a bug and propagates.
READ_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, StopIteration, OSError,
               msgpack.UnpackException)


def bad_record() -> dict:
    return {BAD_RECORD: 1}


def is_bad(record: dict) -> bool:
    return BAD_RECORD in record


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), "RGB").save(buffer, format="PNG",
                                                            compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def pcm16_bytes(waveform: np.ndarray) -> bytes:
    """float PCM in [-1, 1] -> little-endian int16 bytes (clipped, rounded)."""
    pcm = np.clip(np.rint(np.asarray(waveform, np.float64) * 32768.0), -32768, 32767)
    return pcm.astype("<i2").tobytes()


def decode_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def encode_record(record: dict) -> bytes:
    """msgpack map (bin type for bytes); `images`/`video` as PNG, `audio` (when present) as
    int16 PCM. Arrays only: a record of file paths is encoded after `load_image`/`load_audio`."""
    payload = dict(record)
    payload["images"] = [png_bytes(a) for a in record.get("images", [])]
    payload["video"] = [png_bytes(f) for f in record.get("video", [])]
    if "gen_images" in record:
        payload["gen_images"] = [png_bytes(a) for a in record["gen_images"]]
    if "audio" in record:
        payload["audio"] = [pcm16_bytes(a) for a in record["audio"]]
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes, *, decode_media: bool = True) -> dict:
    """Inverse of `encode_record` (or a JSON text record); `decode_media=False` keeps the bytes."""
    if not data:
        raise ValueError("empty record (e.g. in a damaged ArrayRecord chunk)")
    if data[:1] in (b"{", b"["):
        record = json.loads(data.decode("utf-8"))
    else:
        record = msgpack.unpackb(data, raw=False)
        if decode_media:
            record["images"] = [decode_image(b) for b in record.get("images", [])]
            record["video"] = [decode_image(b) for b in record.get("video", [])]
            if "gen_images" in record:
                record["gen_images"] = [decode_image(b) for b in record["gen_images"]]
            if "audio" in record:
                record["audio"] = [decode_pcm16(b) for b in record["audio"]]
    if not isinstance(record, dict) or not ("text" in record or "messages" in record):
        raise ValueError("record has neither 'text' nor 'messages'")
    return record


def drawing_record(record: dict, prompt: str = "Draw {}.") -> dict:
    """An image–caption record (`<image>` + a prompt -> the caption) read in reverse: the user
    asks `prompt` with the caption, the assistant draws it, `<gen_image>caption</gen_image>`."""
    caption = record["messages"][-1]["content"].strip()
    images = record.get("images") or []
    if len(images) != 1 or not caption:
        raise ValueError(f"a drawing needs one image and a caption, got {len(images)} image(s) "
                         f"and caption {caption!r}")
    open_, close = GEN_IMAGE_SPAN
    return {**{k: v for k, v in record.items() if k not in ("images", "messages")},
            "modality": "image_gen", "gen_images": [images[0]], "answer": caption,
            "messages": [{"role": "user", "content": prompt.format(caption)},
                         {"role": "assistant", "content": f"{open_}{caption}{close}"}]}


class DrawingRecords:
    """A source's records read in reverse (`drawing_record`); bad records pass through.
    A class, so grain's worker processes can pickle it."""

    def __init__(self, prompt: str = "Draw {}."):
        self.prompt = prompt

    def __call__(self, record: dict) -> dict:
        if is_bad(record):
            return record
        try:
            return drawing_record(record, self.prompt)
        except READ_ERRORS:
            return bad_record()


def training_text(record: dict) -> str:
    """A record as tokenizer-training text; chats rendered in the chat template's format."""
    if "text" in record:
        return record["text"]
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in record["messages"])


def load_image(item: Any) -> np.ndarray:
    """uint8 (H, W, 3) from an array, a file path or encoded bytes."""
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as image:
            return np.asarray(image.convert("RGB"))
    if isinstance(item, bytes):
        return decode_image(item)
    array = np.asarray(item)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):  # grey
        array = np.repeat(array.reshape(array.shape[:2] + (1,)), 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image must be (H, W, 3), got shape {array.shape}")
    return array.astype(np.uint8)


def load_audio(item: Any, sample_rate: int = DEFAULT_SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """(float32 mono waveform, its sample rate) from an array, a file path or encoded bytes
    (WAV with the standard library; other formats need the `soundfile` package)."""
    if isinstance(item, (str, os.PathLike, bytes)):
        return _read_audio_file(io.BytesIO(item) if isinstance(item, bytes) else item)
    waveform = np.asarray(item)
    if waveform.dtype == np.int16:
        waveform = waveform.astype(np.float32) / 32768.0
    if waveform.ndim != 1:
        raise ValueError(f"a waveform must be 1-D (mono), got shape {waveform.shape}")
    return waveform.astype(np.float32), int(sample_rate)


def _read_audio_file(file) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        waveform, rate = soundfile.read(file, dtype="float32", always_2d=True)
        return waveform.mean(axis=1), int(rate)
    import wave

    try:
        with wave.open(file if not isinstance(file, os.PathLike) else os.fspath(file), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"WAV of {8 * w.getsampwidth()}-bit samples; 16-bit only without soundfile")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
            return pcm.astype(np.float32).mean(axis=1) / 32768.0, int(w.getframerate())
    except wave.Error as e:
        raise ValueError(f"{file}: not a WAV file ({e}); `pip install soundfile` reads FLAC, OGG, ...") from e

"""Shapes world: a generated multimodal data set that needs no download.

Scenes of coloured shapes on a 3x3 grid are sampled from a seed, rendered with
Pillow and turned into task records (captioning, VQA, multi-turn VQA dialogs,
OCR-like text, moving shapes video, interleaved image-text chats, caption-to-image
generation).
Sample `index` of split `split` depends only on `(seed, split, index)`, so any
sample can be regenerated alone and the splits come from disjoint RNG streams.

This module is the single home of the vocabulary (`COLORS`, `SHAPES`, `SIZES`,
`POSITIONS`, `DIRECTIONS`); the text corpus and the evaluation import it.

Record schema (see `make_record`):
  id: "split/index"; split; index; modality (from MODALITIES); task (TASKS)
  messages: [{"role": "user"|"assistant", "content": str}], one `<image>` /
    `<video>` placeholder per media item, in order
  images: [uint8 HxWx3]; video: [uint8 HxWx3 frames] (empty unless video task)
  answer: the assistant's text target ("" for gen_image; a dialog's answers joined by newlines)
  attributes: ground truth for evaluation (scene metadata, question type, ...)
Records are serialised with `encode_record` (msgpack, media as PNG bytes).
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2omni_jax.modalities import MODALITIES

DATA_VERSION = "1.0.0"
SPLITS = ("train", "eval")
_SPLIT_STREAM = {"train": 0, "eval": 1}

# Saturated / dark colours, all far from each other and from the light
# backgrounds below, so a pixel's colour names its shape unambiguously.
COLORS = {
    "red": (220, 20, 20),
    "orange": (245, 120, 0),
    "yellow": (240, 215, 0),
    "green": (20, 150, 40),
    "cyan": (0, 170, 190),
    "blue": (30, 60, 220),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
# Row-major 3x3 grid; the middle cell is just "center".
POSITIONS = tuple(
    "center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLUMNS
)
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = {
    "white": (250, 250, 250),
    "cream": (250, 244, 225),
    "light gray": (228, 228, 228),
    "light blue": (222, 234, 250),
    "light green": (226, 245, 226),
    "light pink": (250, 228, 234),
}
TASK_MODALITY = {
    "caption": "image",
    "vqa_color": "image",
    "vqa_shape": "image",
    "vqa_count": "image",
    "vqa_position": "image",
    "vqa_dialog": "image",
    "vqa_locate": "image",
    "vqa_color_by_shape": "image",
    "ocr": "image",
    "video_motion": "video",
    "interleaved": "interleaved",
    "gen_image": "image_gen",
}
TASKS = tuple(TASK_MODALITY)
# Training-only tasks: the held-out split is written round-robin over the other tasks, so
# adding one leaves the held-out records (and every evaluated figure) unchanged.
TRAIN_ONLY_TASKS = ("vqa_dialog", "vqa_locate", "vqa_color_by_shape")
assert set(TASK_MODALITY.values()) <= set(MODALITIES)

IMAGE_SIDES = (56, 64, 80, 96, 112, 128, 160, 224)
VIDEO_SIDES = (64, 80, 96, 112, 128)
_SIZE_FRACTION = {"small": 0.5, "large": 0.9}  # radius / half the grid cell
_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered: clean edges
_OCR_WORDS = (
    "cat", "dog", "sun", "moon", "tree", "book", "fish", "bird", "road", "lamp",
    "star", "ship", "rain", "milk", "door", "hat", "cup", "key", "box", "map",
)
_OCR_COLORS = ("red", "green", "blue", "purple", "black")
_PNG_COMPRESS_LEVEL = 6
_LOCATE_EMPTY_FRACTION = 0.2


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one sample; (seed, split, index) streams never overlap."""
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


# ----------------------------------------------------------------- scenes


def position_phrase(position: str) -> str:
    return f"at the {position}"


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _sample_background(rng: np.random.Generator, kinds=("solid", "noise", "gradient")) -> dict:
    kind = _pick(rng, kinds)
    names = list(BACKGROUNDS)
    background = {"kind": kind, "color": _pick(rng, names)}
    if kind == "noise":
        background.update(amplitude=int(rng.integers(3, 9)), seed=int(rng.integers(2**31)))
    elif kind == "gradient":
        background.update(color2=_pick(rng, names), axis=_pick(rng, ("x", "y")))
    return background


def _sample_image_size(rng: np.random.Generator) -> tuple[int, int]:
    width = _pick(rng, IMAGE_SIDES)
    heights = [s for s in IMAGE_SIDES if width / 2 <= s <= width * 2]
    return width, _pick(rng, heights)


def sample_scene(
    rng: np.random.Generator,
    *,
    num_objects: int | None = None,
    size: tuple[int, int] | None = None,
    background: dict | None = None,
    jitter: bool = True,
) -> dict:
    """1-3 shapes in distinct grid cells with distinct colours (so "the red
    shape" is unique); objects are listed in row-major grid order."""
    width, height = size or _sample_image_size(rng)
    n = num_objects or int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), n, replace=False))
    colors = [list(COLORS)[int(c)] for c in rng.choice(len(COLORS), n, replace=False)]
    cell_w, cell_h = width / 3, height / 3
    objects = []
    for cell, color in zip(cells, colors):
        size_name = _pick(rng, SIZES)
        radius = _SIZE_FRACTION[size_name] * min(cell_w, cell_h) / 2
        row, col = divmod(cell, 3)
        dx, dy = rng.uniform(-0.5, 0.5, 2) if jitter else (0.0, 0.0)
        cx = (col + 0.5) * cell_w + dx * (cell_w / 2 - radius)
        cy = (row + 0.5) * cell_h + dy * (cell_h / 2 - radius)
        objects.append({
            "shape": _pick(rng, SHAPES), "color": color, "size": size_name,
            "position": POSITIONS[cell], "center": [round(float(cx), 2), round(float(cy), 2)],
            "radius": round(float(radius), 2),
        })
    return {"width": width, "height": height, "background": background or _sample_background(rng),
            "objects": objects}


# -------------------------------------------------------------- rendering


def _render_background(background: dict, width: int, height: int) -> Image.Image:
    base = np.array(BACKGROUNDS[background["color"]], np.float32)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if background["kind"] == "gradient":
        other = np.array(BACKGROUNDS[background["color2"]], np.float32)
        steps = width if background["axis"] == "x" else height
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
        t = t[None, :, None] if background["axis"] == "x" else t[:, None, None]
        pixels = np.broadcast_to(base * (1 - t) + other * t, pixels.shape)
    elif background["kind"] == "noise":
        amp = background["amplitude"]
        noise = np.random.default_rng(background["seed"]).integers(-amp, amp + 1, (height, width, 1))
        pixels = pixels + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii, start_deg):
        k = len(radii)
        angles = np.deg2rad(start_deg + 360.0 * np.arange(k) / k)
        return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(radii, angles)]

    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring([r] * 3, -90.0)
    if shape == "star":
        return ring([r, 0.45 * r] * 5, -90.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(image: Image.Image, obj: dict) -> None:
    s = _SUPERSAMPLE
    mask = Image.new("L", (image.width * s, image.height * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj["center"][0] * s, obj["center"][1] * s, obj["radius"] * s
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(obj["shape"], cx, cy, r), fill=255)
    # Box-filtered coverage: interior pixels stay exactly the named colour.
    image.paste(COLORS[obj["color"]], (0, 0, image.width, image.height), mask.reduce(s))


def render_scene(scene: dict) -> np.ndarray:
    """Renders a scene dict (a pure function of it) to uint8 HxWx3."""
    image = _render_background(scene["background"], scene["width"], scene["height"])
    for obj in scene["objects"]:
        _draw_object(image, obj)
    return np.asarray(image)


def _default_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def render_text(text: str, *, font_size: int, color: str, background: str,
                padding: Sequence[int]) -> np.ndarray:
    """`text` in Pillow's default font on a plain background; padding is
    (left, top, right, bottom) pixels, images are at least 56x56."""
    font = _default_font(font_size)
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    left, top, right, bottom = padding
    width = max(56, x1 - x0 + left + right)
    height = max(56, y1 - y0 + top + bottom)
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    ImageDraw.Draw(image).text((left - x0, top - y0), text, font=font, fill=COLORS[color])
    return np.asarray(image)


# ------------------------------------------------------------------ text


def object_phrase(obj: dict, *, with_size: bool = True) -> str:
    size = f"{obj['size']} " if with_size else ""
    return f"{size}{obj['color']} {obj['shape']}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_text(scene: dict) -> str:
    """e.g. "a large red circle at the top left and a small blue square at the center"."""
    return _join([f"a {object_phrase(o)} {position_phrase(o['position'])}" for o in scene["objects"]])


def motion_text(objects: Sequence[dict]) -> str:
    """e.g. "the red circle moves left and the blue star moves up"."""
    return _join([f"the {object_phrase(o, with_size=False)} moves {o['direction']}" for o in objects])


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _image_record(scene: dict, question: str, answer: str, **extra) -> dict:
    return {"messages": _chat(f"<image>\n{question}", answer), "images": [render_scene(scene)],
            "answer": answer, "attributes": {**scene, **extra}}


# ------------------------------------------------------------------ tasks

_CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?",
                    "Write a short caption for this image.")


def _caption(rng: np.random.Generator) -> dict:
    scene = sample_scene(rng)
    return _image_record(scene, _pick(rng, _CAPTION_PROMPTS), caption_text(scene))


def _color_question(rng: np.random.Generator, scene: dict) -> tuple[str, str, dict]:
    i = int(rng.integers(len(scene["objects"])))
    obj = scene["objects"][i]
    question = f"What color is the {obj['shape']} {position_phrase(obj['position'])}?"
    return question, obj["color"], {"question_type": "color", "target": [i]}


def _shape_question(rng: np.random.Generator, scene: dict) -> tuple[str, str, dict]:
    i = int(rng.integers(len(scene["objects"])))
    obj = scene["objects"][i]
    question = _pick(rng, (f"What shape is the {obj['color']} object?",
                           f"What is the shape {position_phrase(obj['position'])}?"))
    return question, obj["shape"], {"question_type": "shape", "target": [i]}


def _count_question(rng: np.random.Generator, scene: dict) -> tuple[str, str, dict]:
    objects = scene["objects"]
    if rng.random() < 0.4:
        question, counted, count = "How many shapes are there?", "shape", len(objects)
    else:  # mostly a shape that is present, sometimes any (answer may be 0)
        pool = [o["shape"] for o in objects] if rng.random() < 0.7 else SHAPES
        counted = _pick(rng, pool)
        question = f"How many {counted}s are there?"
        count = sum(o["shape"] == counted for o in objects)
    return question, str(count), {"question_type": "count", "counted": counted}


def _position_question(rng: np.random.Generator, scene: dict) -> tuple[str, str, dict]:
    objects = scene["objects"]
    if len(objects) == 1 or rng.random() < 0.5:
        i = int(rng.integers(len(objects)))
        question = f"Where is the {object_phrase(objects[i], with_size=False)}?"
        return question, objects[i]["position"], {"question_type": "position", "target": [i]}
    i, j = (int(k) for k in rng.choice(len(objects), 2, replace=False))
    a, b = objects[i], objects[j]
    (ra, ca), (rb, cb) = (divmod(POSITIONS.index(o["position"]), 3) for o in (a, b))
    pa, pb = object_phrase(a, with_size=False), object_phrase(b, with_size=False)
    if ca != cb:
        question = f"Is the {pa} to the left or to the right of the {pb}?"
        relation = "left" if ca < cb else "right"
    else:
        question = f"Is the {pa} above or below the {pb}?"
        relation = "above" if ra < rb else "below"
    return question, relation, {"question_type": "relation", "target": [i, j]}


_QUESTIONS = {"color": _color_question, "shape": _shape_question, "count": _count_question,
              "position": _position_question}


def _vqa(kind: str) -> Callable[[np.random.Generator], dict]:
    def build(rng: np.random.Generator) -> dict:
        scene = sample_scene(rng)
        question, answer, extra = _QUESTIONS[kind](rng, scene)
        return _image_record(scene, question, answer, **extra)
    return build


def _vqa_locate(rng: np.random.Generator) -> dict:
    """"What is at the top left?" -> "a small red circle" (or "nothing"): finding an object by
    its position alone, the step that held-out questions like "What is the shape at the top
    left?" need and that no other task trains on its own. Empty cells are asked about too, so
    a lone object cannot be named without looking where it is."""
    scene = sample_scene(rng)
    objects = scene["objects"]
    empty = [p for p in POSITIONS if p not in {o["position"] for o in objects}]
    if rng.random() < _LOCATE_EMPTY_FRACTION:
        position, answer, target = _pick(rng, empty), "nothing", []
    else:
        i = int(rng.integers(len(objects)))
        position, answer, target = objects[i]["position"], f"a {object_phrase(objects[i])}", [i]
    question = f"What is {position_phrase(position)}?"
    return _image_record(scene, question, answer, question_type="locate", target=target)


def _vqa_color_by_shape(rng: np.random.Generator) -> dict:
    """"What color is the circle?" -> "red", asked of a shape the scene holds once: the shape
    word alone finds the object. Held-out colour questions name shape and position, and the
    other tasks never make the shape word a key (captions say colour before shape), so
    without it a model can answer them from the position phrase alone."""
    scene = sample_scene(rng)
    objects = scene["objects"]
    shapes = [o["shape"] for o in objects]
    i = _pick(rng, [k for k, shape in enumerate(shapes) if shapes.count(shape) == 1] or [None])
    if i is None:  # every shape repeated: the position tells the twins apart
        question, answer, extra = _color_question(rng, scene)
        return _image_record(scene, question, answer, **extra)
    question = f"What color is the {shapes[i]}?"
    return _image_record(scene, question, objects[i]["color"], question_type="color_by_shape", target=[i])


def _vqa_dialog(rng: np.random.Generator) -> dict:
    """Two to four questions about one image in one chat (LLaVA's multi-turn VQA): more
    answers per image seen. Every answer is trained; `answer` joins them by newlines."""
    scene = sample_scene(rng)
    messages, answers, questions = [], [], []
    for turn in range(int(rng.integers(2, 5))):
        kind = _pick(rng, tuple(_QUESTIONS))
        question, answer, extra = _QUESTIONS[kind](rng, scene)
        messages += _chat(("<image>\n" if turn == 0 else "") + question, answer)
        answers.append(answer)
        questions.append({"question": question, "answer": answer, **extra})
    return {"messages": messages, "images": [render_scene(scene)], "answer": "\n".join(answers),
            "attributes": {**scene, "questions": questions}}


def _ocr(rng: np.random.Generator) -> dict:
    kind = _pick(rng, ("word", "number", "code"))
    if kind == "word":
        text = _pick(rng, _OCR_WORDS).upper() if rng.random() < 0.5 else _pick(rng, _OCR_WORDS)
    elif kind == "number":
        text = str(int(rng.integers(0, 10_000)))
    else:
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        text = "".join(_pick(rng, alphabet) for _ in range(int(rng.integers(3, 6))))
    style = {"font_size": int(rng.integers(14, 29)), "color": _pick(rng, _OCR_COLORS),
             "background": _pick(rng, list(BACKGROUNDS)),
             "padding": [int(p) for p in rng.integers(6, 21, 4)]}
    image = render_text(text, **style)
    question = _pick(rng, ("What text is written in the image?", "Read the text in the image."))
    return {"messages": _chat(f"<image>\n{question}", text), "images": [image], "answer": text,
            "attributes": {"text": text, **style}}


_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _sample_trajectory(rng: np.random.Generator, side: int, color: str) -> dict:
    radius = side * rng.uniform(0.09, 0.14)
    distance = side * rng.uniform(0.3, 0.45)
    direction = _pick(rng, DIRECTIONS)
    ux, uy = _STEP[direction]
    lo, hi = radius, side - radius
    # Start so that start + distance * (ux, uy) stays inside the frame.
    sx = rng.uniform(lo - min(ux, 0) * distance, hi - max(ux, 0) * distance)
    sy = rng.uniform(lo - min(uy, 0) * distance, hi - max(uy, 0) * distance)
    return {"shape": _pick(rng, SHAPES), "color": color, "direction": direction,
            "radius": round(float(radius), 2), "start": [round(float(sx), 2), round(float(sy), 2)],
            "end": [round(float(sx + ux * distance), 2), round(float(sy + uy * distance), 2)]}


def _frame_centers(obj: dict, num_frames: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, num_frames)[:, None]
    return np.round(np.array(obj["start"]) * (1 - t) + np.array(obj["end"]) * t, 2)


def _paths_collide(a: dict, b: dict, num_frames: int) -> bool:
    gap = np.linalg.norm(_frame_centers(a, num_frames) - _frame_centers(b, num_frames), axis=1)
    return bool(np.any(gap < a["radius"] + b["radius"] + 2))


def _video_motion(rng: np.random.Generator) -> dict:
    side = _pick(rng, VIDEO_SIDES)
    num_frames = int(rng.integers(4, 9))
    colors = [list(COLORS)[int(c)] for c in rng.choice(len(COLORS), 2, replace=False)]
    objects = [_sample_trajectory(rng, side, colors[0])]
    if rng.random() < 0.5:
        for _ in range(20):  # rejection sampling; stays a 1-object video if all collide
            other = _sample_trajectory(rng, side, colors[1])
            if not _paths_collide(objects[0], other, num_frames):
                objects.append(other)
                break
    background = _sample_background(rng)
    centers = [_frame_centers(o, num_frames) for o in objects]
    frames = []
    for f in range(num_frames):
        placed = [{**o, "center": [float(c[f][0]), float(c[f][1])]} for o, c in zip(objects, centers)]
        frames.append(render_scene({"width": side, "height": side, "background": background,
                                    "objects": placed}))
    answer = motion_text(objects)
    question = _pick(rng, ("What happens in the video?", "Describe the motion in this clip."))
    return {"messages": _chat(f"<video>\n{question}", answer), "images": [], "video": frames,
            "answer": answer, "attributes": {"width": side, "height": side, "background": background,
                                             "num_frames": num_frames, "objects": objects}}


_FOLLOW_UPS = ("And this one?", "What about this picture?", "Now describe this one.")
_DESCRIBE = ("It shows {}.", "This picture has {}.", "Here there is {}.")


def _interleaved(rng: np.random.Generator) -> dict:
    """A multi-turn chat: each user turn brings an image, each reply describes it."""
    scenes = [sample_scene(rng) for _ in range(int(rng.integers(2, 4)))]
    messages, replies = [], []
    for k, scene in enumerate(scenes):
        prompt = "Describe this picture." if k == 0 else _pick(rng, _FOLLOW_UPS)
        replies.append(_pick(rng, _DESCRIBE).format(caption_text(scene)))
        messages += _chat(f"<image>\n{prompt}", replies[-1])
    return {"messages": messages, "images": [render_scene(s) for s in scenes],
            "answer": "\n".join(replies), "attributes": {"scenes": scenes}}


def _gen_image(rng: np.random.Generator) -> dict:
    """Caption -> image; the image is the output. Plain white square canvas and
    cell-centred shapes, so the caption determines the target up to size."""
    side = _pick(rng, (64, 96, 128))
    scene = sample_scene(rng, size=(side, side), background={"kind": "solid", "color": "white"},
                         jitter=False)
    prompt = _pick(rng, ("Draw {}.", "Generate an image of {}.", "Create a picture with {}."))
    return {"messages": _chat(prompt.format(caption_text(scene)), "<image>"),
            "images": [render_scene(scene)], "answer": "", "attributes": scene}


TASK_BUILDERS: dict[str, Callable[[np.random.Generator], dict]] = {
    "caption": _caption, "vqa_color": _vqa("color"), "vqa_shape": _vqa("shape"),
    "vqa_count": _vqa("count"), "vqa_position": _vqa("position"), "vqa_dialog": _vqa_dialog,
    "vqa_locate": _vqa_locate, "vqa_color_by_shape": _vqa_color_by_shape, "ocr": _ocr,
    "video_motion": _video_motion, "interleaved": _interleaved, "gen_image": _gen_image,
}


def split_tasks(tasks: Sequence[str], split: str) -> tuple[str, ...]:
    """The tasks a split holds, in order: all of them, less TRAIN_ONLY_TASKS outside "train"."""
    return tuple(t for t in tasks if split == "train" or t not in TRAIN_ONLY_TASKS)


def make_record(seed: int, split: str, index: int, tasks: Sequence[str] = TASKS) -> dict:
    """Sample `index` of `split`; tasks are assigned round-robin over `split_tasks(tasks, split)`."""
    held = split_tasks(tasks, split)
    if not held:
        raise ValueError(f"the {split} split holds none of the tasks {tuple(tasks)} (train-only: {TRAIN_ONLY_TASKS})")
    task = held[index % len(held)]
    body = TASK_BUILDERS[task](sample_rng(seed, split, index))
    return {"id": f"{split}/{index}", "split": split, "index": index,
            "modality": TASK_MODALITY[task], "task": task, "messages": body["messages"],
            "images": body["images"], "video": body.get("video", []),
            "answer": body["answer"], "attributes": body["attributes"]}


# -------------------------------------------------------------- encoding


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), "RGB").save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def png_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def encode_record(record: dict) -> bytes:
    """msgpack map (bin type for bytes); `images`/`video` become PNG bytes."""
    payload = dict(record)
    payload["images"] = [png_bytes(a) for a in record["images"]]
    payload["video"] = [png_bytes(f) for f in record.get("video", [])]
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes, *, decode_media: bool = True) -> dict:
    """Inverse of `encode_record`; `decode_media=False` keeps PNG bytes."""
    record = msgpack.unpackb(data, raw=False)
    if decode_media:
        record["images"] = [png_decode(b) for b in record["images"]]
        record["video"] = [png_decode(b) for b in record["video"]]
    return record


# --------------------------------------------------------------- metrics

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_DIRECTION_WORDS = {"leftward": "left", "leftwards": "left", "rightward": "right",
                    "rightwards": "right", "upward": "up", "upwards": "up",
                    "downward": "down", "downwards": "down"}


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower().replace("colour", "color")).split()


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits."""
    words = [_NUMBER_WORDS.get(w, w) for w in _words(text) if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], records: Sequence[dict]) -> dict[str, float]:
    """Normalised exact match per task (vqa_color, ...) and "overall"."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    hits: dict[str, list[bool]] = {}
    for prediction, record in zip(predictions, records):
        correct = normalize_answer(prediction) == normalize_answer(record["answer"])
        hits.setdefault(record["task"], []).append(correct)
    result = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    result["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(predictions))
    return result


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word


def _clauses(text: str) -> list[list[str]]:
    """Splits at "and", commas and sentence ends; words normalised."""
    parts = re.split(r"[,.;]|\band\b", text.lower().replace("colour", "color"))
    return [[_DIRECTION_WORDS.get(w, _singular(w)) for w in _words(p)] for p in parts]


def mentioned_pairs(text: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs where a colour word precedes a shape word in a clause."""
    pairs = set()
    for words in _clauses(text):
        color = None
        for w in words:
            if w in COLORS:
                color = w
            elif w in SHAPES and color is not None:
                pairs.add((color, w))
                color = None
    return pairs


def caption_attribute_accuracy(caption: str, attributes: dict) -> float:
    """Fraction of the scene's (colour, shape) pairs that the caption names."""
    truth = [(o["color"], o["shape"]) for o in attributes["objects"]]
    found = mentioned_pairs(caption)
    return sum(pair in found for pair in truth) / len(truth)


def _motions(text: str) -> dict[tuple[str, str], str]:
    motions = {}
    for words in _clauses(text):
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        # The last one: "the red circle at the top left moves right".
        direction = next((w for w in reversed(words) if w in DIRECTIONS), None)
        if color and shape and direction:
            motions.setdefault((color, shape), direction)
    return motions


def video_motion_accuracy(predictions: Sequence[str], records: Sequence[dict]) -> float:
    """Fraction of moving objects whose colour, shape and direction are all right."""
    correct = total = 0
    for prediction, record in zip(predictions, records, strict=True):
        found = _motions(prediction)
        for obj in record["attributes"]["objects"]:
            total += 1
            correct += found.get((obj["color"], obj["shape"])) == obj["direction"]
    return correct / max(1, total)

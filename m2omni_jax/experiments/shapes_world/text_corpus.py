"""Built-in "shapes world" text corpus: deterministic English about coloured shapes.

Every document is generated from (seed, doc index) alone, so any subset can be
regenerated without the others. Documents describe small scenes of up to four
shapes on a 3x3 grid (left/center/right × top/middle/bottom), tell short
stories, state facts about shapes and colours, and ask and answer questions.
The vocabulary is small and the sentence templates repeat, so a tiny LM's loss
falls fast, yet answers depend on the scene, so there is something to learn.

Record encoding (one ArrayRecord record per document): UTF-8 JSON of a dict
  {"id": int, "kind": str, "modality": "text", "text": str}            plain text
  {"id": int, "kind": str, "modality": "text", "messages": [{"role", "content"}, ...]}  chat
Chat records are trained with the prompt masked (see `pipeline.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import uuid
from typing import Iterator

from array_record.python.array_record_module import ArrayRecordWriter

from m2omni_jax.experiments.shapes_world import world as shapes_world

VERSION = 2
MANIFEST = "manifest.json"

# One vocabulary with the images: the shapes world's colours, shapes and sizes.
COLORS = tuple(shapes_world.COLORS)
SHAPES = shapes_world.SHAPES
SIZES = shapes_world.SIZES
SIDES = {"triangle": 3, "square": 4, "diamond": 4, "star": 10, "circle": 0}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# (column, row) on a 3x3 grid; names read naturally after "is".
PLACES = {
    (0, 1): "on the left", (2, 1): "on the right", (1, 0): "at the top", (1, 2): "at the bottom",
    (1, 1): "in the center", (0, 0): "at the top left", (2, 0): "at the top right",
    (0, 2): "at the bottom left", (2, 2): "at the bottom right",
}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}
NAMES = ("Ana", "Ben", "Mia", "Tom", "Lea", "Sam", "Zoe", "Max")


@dataclasses.dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    cell: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def place(self) -> str:
        return PLACES[self.cell]


def _scene(rng: random.Random, max_shapes: int = 4) -> list[Shape]:
    """Up to `max_shapes` shapes in distinct cells with distinct (colour, shape) names."""
    cells = rng.sample(sorted(PLACES), rng.randint(1, max_shapes))
    names = set()
    scene = []
    for cell in cells:
        while True:
            color, shape = rng.choice(COLORS), rng.choice(SHAPES)
            if (color, shape) not in names:
                break
        names.add((color, shape))
        scene.append(Shape(color, shape, rng.choice(SIZES), cell))
    return scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _count_phrase(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def _relation(a: Shape, b: Shape) -> str | None:
    """The clearest spatial relation of a to b, or None when they share a cell axis ambiguously."""
    dx, dy = a.cell[0] - b.cell[0], a.cell[1] - b.cell[1]
    if abs(dx) >= abs(dy) and dx:
        return "left of" if dx < 0 else "right of"
    if dy:
        return "above" if dy < 0 else "below"
    return None


def _describe(scene: list[Shape]) -> str:
    parts = [f"The picture shows {_count_phrase(len(scene), 'shape')}."]
    for s in scene:
        parts.append(f"{_article(s.size).capitalize()} {s.size} {s.name} is {s.place}.")
    if len(scene) > 1:
        a, b = scene[0], scene[1]
        rel = _relation(a, b)
        if rel:
            parts.append(f"The {a.name} is {rel} the {b.name}.")
    return " ".join(parts)


def _story(rng: random.Random, scene: list[Shape]) -> str:
    who = rng.choice(NAMES)
    parts = [f"{who} took a sheet of paper."]
    for i, s in enumerate(scene):
        lead = "First" if i == 0 else rng.choice(("Then", "Next", "After that"))
        parts.append(f"{lead}, {who} drew {_article(s.size)} {s.size} {s.name} {s.place}.")
    fav = rng.choice(scene)
    parts.append(f"{who} liked the {fav.name} best.")
    if len(scene) > 1:
        rel = _relation(scene[-1], scene[0])
        if rel:
            parts.append(f"The {scene[-1].name} is {rel} the {scene[0].name}.")
    parts.append(f"In the end there were {_count_phrase(len(scene), 'shape')} on the paper.")
    return " ".join(parts)


def _fact(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        shape = rng.choice(SHAPES)
        n = SIDES[shape]
        if n == 0:
            return f"{_article(shape).capitalize()} {shape} has no corners. Its edge is one smooth curve."
        extra = " A star has five points." if shape == "star" else ""
        return f"{_article(shape).capitalize()} {shape} has {NUMBER_WORDS[n]} sides and {NUMBER_WORDS[n]} corners.{extra}"
    if kind == 1:
        (a, b), c = rng.choice(sorted(MIXES.items()))
        return f"If you mix {a} and {b}, you get {c}. {c.capitalize()} is made from {a} and {b}."
    n = rng.randint(1, 5)
    m = rng.randint(1, 5)
    c1, c2 = rng.sample(COLORS, 2)
    s = rng.choice(SHAPES)
    return (f"There are {_count_phrase(n, c1 + ' ' + s)} and {_count_phrase(m, c2 + ' ' + s)}. "
            f"In total there are {_count_phrase(n + m, s)}.")


def _scene_prompt(scene: list[Shape]) -> str:
    items = [f"{_article(s.size)} {s.size} {s.name} {s.place}" for s in scene]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"In the picture there is {listed}."


def _question(rng: random.Random, scene: list[Shape]) -> tuple[str, str]:
    s = rng.choice(scene)
    kind = rng.randrange(5 if len(scene) > 1 else 4)
    if kind == 0 and sum(o.shape == s.shape for o in scene) == 1:
        return f"What color is the {s.shape}?", f"The {s.shape} is {s.color}."
    if kind <= 1:
        return f"Where is the {s.name}?", f"The {s.name} is {s.place}."
    if kind == 2:
        return "How many shapes are there?", f"There {'is' if len(scene) == 1 else 'are'} {_count_phrase(len(scene), 'shape')}."
    if kind == 3:
        return f"Is the {s.name} small or large?", f"The {s.name} is {s.size}."
    a, b = rng.sample(scene, 2)
    rel = _relation(a, b)
    asked = rng.choice(("left of", "right of", "above", "below"))
    answer = "Yes" if rel == asked else "No"
    tail = f"the {a.name} is {rel} the {b.name}." if rel else f"the {a.name} is not {asked} the {b.name}."
    return f"Is the {a.name} {asked} the {b.name}?", f"{answer}, {tail}"


def make_document(index: int, seed: int) -> dict:
    """The document with this index, as the dict that is stored (see module docstring)."""
    rng = random.Random(f"shapes-v{VERSION}-{seed}-{index}")
    kind = rng.choice(("description", "story", "fact", "qa_text", "chat", "chat"))
    doc = {"id": index, "kind": kind, "modality": "text"}
    scene = _scene(rng)
    if kind == "description":
        doc["text"] = _describe(scene)
    elif kind == "story":
        doc["text"] = _story(rng, scene)
    elif kind == "fact":
        facts = [_fact(rng) for _ in range(rng.randint(1, 3))]
        doc["text"] = " ".join(dict.fromkeys(facts))  # drop repeats, keep order
    elif kind == "qa_text":
        q, a = _question(rng, scene)
        doc["text"] = f"{_describe(scene)}\nQuestion: {q}\nAnswer: {a}"
    else:
        messages = []
        for turn in range(rng.randint(1, 2)):
            q, a = _question(rng, scene)
            content = f"{_scene_prompt(scene)} {q}" if turn == 0 else q
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        doc["messages"] = messages
    return doc


def iter_documents(num_docs: int, seed: int, start: int = 0) -> Iterator[dict]:
    for i in range(start, start + num_docs):
        yield make_document(i, seed)


def encode_record(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def decode_record(raw: bytes) -> dict:
    """Inverse of `encode_record`; raises ValueError on a malformed record."""
    doc = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict) or not ("text" in doc or "messages" in doc):
        raise ValueError("record is not a text or chat document")
    return doc


def _shard_names(num_shards: int) -> list[str]:
    return [f"text-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]


def _manifest(num_docs: int, seed: int, num_shards: int) -> dict:
    return {"version": VERSION, "seed": seed, "num_docs": num_docs, "num_shards": num_shards,
            "files": _shard_names(num_shards)}


def write_text_corpus(out_dir: str, num_docs: int, seed: int, num_shards: int = 4) -> list[str]:
    """Writes the corpus as `num_shards` ArrayRecord files (contiguous doc ranges).

    Idempotent: returns the existing files when `out_dir/manifest.json` matches
    (version, seed, num_docs, num_shards) and they all exist. Files are written
    under temporary names and renamed, the manifest last, so concurrent writers
    (several hosts on one file system) never expose a partial corpus.
    """
    out_dir = os.path.expanduser(out_dir)
    num_shards = max(1, min(num_shards, num_docs))
    want = _manifest(num_docs, seed, num_shards)
    paths = [os.path.join(out_dir, f) for f in want["files"]]
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            try:
                have = json.load(f)
            except ValueError:
                have = None
        if have == want and all(os.path.exists(p) for p in paths):
            return paths
    os.makedirs(out_dir, exist_ok=True)
    tmp = f".tmp-{uuid.uuid4().hex}"
    for k, path in enumerate(paths):
        start, stop = k * num_docs // num_shards, (k + 1) * num_docs // num_shards
        writer = ArrayRecordWriter(path + tmp, "group_size:1")
        for doc in iter_documents(stop - start, seed, start):
            writer.write(encode_record(doc))
        writer.close()
        os.replace(path + tmp, path)
    with open(manifest_path + tmp, "w") as f:
        json.dump(want, f, indent=1)
    os.replace(manifest_path + tmp, manifest_path)
    return paths

"""Attribute checker for caption-to-image generation (`gen_image`) [ours]: evaluation only.

    python -m m2omni_jax.experiments.shapes_world.image_checker --out=/tmp/image_checker

reads real gen_image renders at 64x64 100% right in position, colour and size, 99.95% in
shape (1000 held-out requests, 1990 objects) after 800 steps, 280 s on a busy 2-core CPU. For
the image head's 32x32 (small shapes ~5 pixels across): --side=32 --steps=2500
--num_train=16000, ≥ 99.85% in each, 110 s (benchmarks/results/image_checker.json).

A drawing request ("Draw a large red circle at the top left and a small blue star at the
center.") puts 1-3 objects, of distinct colours, in distinct cells of the 3x3 grid, each
with a colour, a shape and a size. The checker reads an image as nine cell slots, each
"empty" or (colour, shape, size): a small CNN, one softmax per slot and attribute, trained
only on the renderer's own images (never on generated ones) at the sides gen_image draws,
resized to `CheckerConfig.side`; half of them with the shapes shifted inside their cells,
so that a generator's off-centre shape still reads as its cell's.

    image → resize to side×side → [Conv 3x3, Conv 3x3 stride 2] × len(widths) → max, mean over each
    cell → Dense → Dense (shared by the cells) → per cell: colour-or-empty (9), shape (5), size (2) logits

`gen_image_accuracy` scores generated images against their requests, per requested object:
position (its cell holds an object), colour, shape and size (that object's, in its cell) and
all four; per image: unrequested cells left empty, and all nine slots as requested. The
held-out accuracy of the checker itself is the same function on real renders of fresh
gen_image records.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from PIL import Image

from m2omni_jax.experiments.shapes_world import world as sw

COLOR_SLOTS = ("empty",) + tuple(sw.COLORS)  # a slot's colour class; 0: no object in the cell
SLOT_ATTRIBUTES = (("color", COLOR_SLOTS), ("shape", sw.SHAPES), ("size", sw.SIZES))
SLOT_CLASSES = tuple(len(values) for _, values in SLOT_ATTRIBUTES)
NUM_CELLS = len(sw.POSITIONS)
GEN_IMAGE_SIDES = (64, 96, 128)  # the canvas sides world._gen_image draws
WHITE = {"kind": "solid", "color": "white"}  # gen_image's canvas
_STREAM = 0xC4EC  # the checker's RNG streams' spawn key: apart from world.sample_rng's (evaluation's)
_TRAIN_SCENES, _HELDOUT, _BATCHES = range(3)
_OBJECT_PHRASE = re.compile(r"\b({}) ({}) ({}) at the ({})\b".format(
    *("|".join(words) for words in (sw.SIZES, sw.COLORS, sw.SHAPES, sw.POSITIONS))))


# ----------------------------------------------------------------------------- targets


def request_objects(request: dict | str) -> list[dict]:
    """The objects a request asks for: of a gen_image record, a scene dict, or a caption
    ("a large red circle at the top left and ..."); dicts with colour, shape, size, position."""
    if isinstance(request, str):
        return [dict(zip(("size", "color", "shape", "position"), m))
                for m in _OBJECT_PHRASE.findall(request.lower())]
    scene = request.get("attributes", request)
    return scene["objects"]


def request_targets(request: dict | str) -> np.ndarray:
    """(NUM_CELLS, 3) int32, cells row-major as sw.POSITIONS: per cell its colour class in
    COLOR_SLOTS (0: empty) and the shape and size index (-1 where empty)."""
    targets = np.tile(np.array([0, -1, -1], np.int32), (NUM_CELLS, 1))
    for obj in request_objects(request):
        targets[sw.POSITIONS.index(obj["position"])] = [
            COLOR_SLOTS.index(obj["color"]), sw.SHAPES.index(obj["shape"]), sw.SIZES.index(obj["size"])]
    return targets


def score_predictions(targets: np.ndarray, predictions: np.ndarray) -> dict:
    """targets, predictions: (images, NUM_CELLS, 3) as request_targets. Per requested object:
    position (its cell predicted not empty), color, shape, size (right and in that cell) and
    object (all four); empty_cells: unrequested cells predicted empty; all_correct: images
    whose nine slots are all as requested (shape and size only where an object is)."""
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    wanted, placed = targets[..., 0] > 0, predictions[..., 0] > 0
    right = (targets == predictions) & placed[..., None]  # (images, cells, attributes)
    per_object = {"position": placed, "color": right[..., 0], "shape": right[..., 1], "size": right[..., 2],
                  "object": right.all(-1)}
    out = {name: float(hit[wanted].mean()) for name, hit in per_object.items()}
    out["empty_cells"] = float((~placed)[~wanted].mean())
    out["all_correct"] = float(np.where(wanted, right.all(-1), ~placed).all(-1).mean())
    return dict(out, num_images=len(targets), num_objects=int(wanted.sum()))


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class CheckerConfig:
    side: int = 64  # images are resized to side×side
    widths: tuple[int, ...] = (16, 32, 64)  # one stage each: Conv 3x3, Conv 3x3 stride 2
    hidden: int = 128


def cell_pool(features):
    """(N, H, W, C) -> (N, NUM_CELLS, 2C): the maximum and the mean over each grid cell's
    feature rows and columns (row-major, as sw.POSITIONS); a cell takes every row/column it overlaps."""
    def bounds(n):
        return [(k * n // 3, -(-(k + 1) * n // 3)) for k in range(3)]
    _, h, w, _ = features.shape
    cells = [features[:, r0:r1, c0:c1] for r0, r1 in bounds(h) for c0, c1 in bounds(w)]
    return jnp.stack([jnp.concatenate([c.max((1, 2)), c.mean((1, 2))], -1) for c in cells], 1)


class CheckerCNN(nn.Module):
    """Convolutions over the image, a max and a mean over each cell, one head shared by the cells."""
    config: CheckerConfig

    @nn.compact
    def __call__(self, images):  # (N, side, side, 3) float in [-1, 1]
        x = images
        for width in self.config.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(self.config.hidden)(cell_pool(x)))
        return nn.Dense(sum(SLOT_CLASSES))(x)  # (N, NUM_CELLS, sum(SLOT_CLASSES))


def split_logits(logits) -> list:
    """(..., sum(SLOT_CLASSES)) -> colour, shape and size logits."""
    return jnp.split(logits, np.cumsum(SLOT_CLASSES)[:-1], axis=-1)


def to_input(images: Sequence[np.ndarray], side: int) -> np.ndarray:
    """uint8 HxWx3 images of any size -> (N, side, side, 3) float32 in [-1, 1]."""
    resized = [np.asarray(Image.fromarray(np.asarray(im, np.uint8)).resize((side, side), Image.BILINEAR))
               if np.shape(im)[:2] != (side, side) else np.asarray(im, np.uint8) for im in images]
    return np.stack(resized).astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class ImageChecker:
    config: CheckerConfig
    params: Any

    @classmethod
    def init(cls, config: CheckerConfig = CheckerConfig(), seed: int = 0) -> "ImageChecker":
        dummy = jnp.zeros((1, config.side, config.side, 3), jnp.float32)
        return cls(config, CheckerCNN(config).init(jax.random.key(seed), dummy)["params"])

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """(N, NUM_CELLS, 3) int32 in request_targets' layout (shape and size -1 where empty)."""
        out = []
        for start in range(0, len(images), batch_size):
            x = to_input(images[start:start + batch_size], self.config.side)
            out.append(np.asarray(_predict(self.config, self.params, x)))
        return np.concatenate(out) if out else np.zeros((0, NUM_CELLS, 3), np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _predict(config: CheckerConfig, params, x):
    labels = jnp.stack([part.argmax(-1) for part in split_logits(CheckerCNN(config).apply({"params": params}, x))], -1)
    return jnp.where(labels[..., :1] > 0, labels, labels.at[..., 1:].set(-1)).astype(jnp.int32)


def gen_image_accuracy(checker: ImageChecker, requests: Sequence[dict | str], images: Sequence[np.ndarray]) -> dict:
    """score_predictions of the checker's reading of `images` against `requests` (gen_image
    records, scene dicts or captions; one image per request)."""
    if len(requests) != len(images):
        raise ValueError(f"{len(images)} images for {len(requests)} requests")
    return score_predictions(np.stack([request_targets(r) for r in requests]), checker.predict(images))


def save_checker(checker: ImageChecker, path: str) -> None:
    """One flax msgpack file: the config (as JSON) and the parameters."""
    payload = {"config": json.dumps(dataclasses.asdict(checker.config)), "params": jax.device_get(checker.params)}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))


def load_checker(path: str) -> ImageChecker:
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    fields = json.loads(payload["config"])
    config = CheckerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return ImageChecker(config, payload["params"])


# ----------------------------------------------------------------------------- training


def checker_rng(seed: int, purpose: int, index: int = 0) -> np.random.Generator:
    """The checker's own RNG streams, disjoint from every world.sample_rng(seed, split, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(_STREAM, purpose)))


def training_scene(rng: np.random.Generator) -> dict:
    """A gen_image scene (white canvas, a side gen_image draws); half the time with its shapes
    shifted inside their cells."""
    side = int(rng.choice(GEN_IMAGE_SIDES))
    return sw.sample_scene(rng, size=(side, side), background=WHITE, jitter=bool(rng.random() < 0.5))


def heldout_records(seed: int, num: int) -> list[dict]:
    """`num` fresh gen_image records (the world's own builder) from the checker's stream `seed`."""
    return [sw.TASK_BUILDERS["gen_image"](checker_rng(seed, _HELDOUT, i)) for i in range(num)]


# The checker the held-out metrics read generated images with, per side: trained once on first use.
CACHED_TRAINING = {32: dict(num_train=16_000, steps=2_500), 64: dict(num_train=8_000, steps=800)}
DEFAULT_CACHE_DIR = "~/.cache/m2omni_jax/image_checker"


def cached_checker(side: int, cache_dir: str = "", log: Callable[[str], None] = lambda _: None) -> ImageChecker:
    """The checker at `side` (the image head's image_size: 32 or 64) from `cache_dir`
    (default `DEFAULT_CACHE_DIR`), trained and saved there the first time (about two minutes)."""
    if side not in CACHED_TRAINING:
        raise ValueError(f"no checker recipe for side={side}; sides: {sorted(CACHED_TRAINING)}")
    path = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), f"checker-side{side}-v{sw.DATA_VERSION}.msgpack")
    if os.path.exists(path):
        return load_checker(path)
    checker, figures = train_checker(config=CheckerConfig(side=side), log=log, **CACHED_TRAINING[side])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_checker(checker, tmp)
    with open(path.replace(".msgpack", ".json"), "w") as f:
        json.dump(figures, f, indent=2)
    os.replace(tmp, path)
    return checker


def loss_fn(params, config: CheckerConfig, images, targets):
    """Softmax cross-entropy: colour-or-empty over all cells (occupied and empty cells weighted
    alike, as the empty ones are two thirds), shape and size over the occupied ones; and the
    share of slots right."""
    logits = split_logits(CheckerCNN(config).apply({"params": params}, images))
    occupied = (targets[..., 0] > 0).astype(jnp.float32)
    on_object, on_empty = occupied / occupied.sum(), (1 - occupied) / jnp.maximum((1 - occupied).sum(), 1)
    ce = [optax.softmax_cross_entropy_with_integer_labels(part, jnp.maximum(targets[..., k], 0))
          for k, part in enumerate(logits)]
    loss = (ce[0] * (on_object + on_empty)).sum() + sum((c * on_object).sum() for c in ce[1:])
    slot_right = jnp.stack([part.argmax(-1) == targets[..., k] for k, part in enumerate(logits)], -1)
    return loss, jnp.where(occupied[..., None] > 0, slot_right, slot_right[..., :1]).all(-1).mean()


def train_checker(num_train: int = 8_000, steps: int = 800, batch_size: int = 64, lr: float = 3e-3,
                  config: CheckerConfig = CheckerConfig(), seed: int = 0, eval_seed: int = 1,
                  num_eval: int = 1_000, log_every: int = 100,
                  log: Callable[[str], None] = functools.partial(print, flush=True)) -> tuple[ImageChecker, dict]:
    """Trains on `num_train` scenes of stream `seed` (training_scene), then scores `num_eval`
    fresh gen_image records of stream `eval_seed` (their real renders): (checker, figures)."""
    if seed == eval_seed:
        raise ValueError(f"seed={seed} must differ from eval_seed={eval_seed}: held-out scenes are fresh")
    start = time.time()
    scenes = [training_scene(checker_rng(seed, _TRAIN_SCENES, i)) for i in range(num_train)]
    images = np.stack([to_input([sw.render_scene(s)], config.side)[0] for s in scenes])
    targets = np.stack([request_targets(s) for s in scenes])
    render_seconds = time.time() - start
    log(f"rendered {num_train} training scenes at {config.side}x{config.side} in {render_seconds:.1f}s")

    checker = ImageChecker.init(config, seed)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps), weight_decay=1e-4)

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, config, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    params, opt_state = checker.params, tx.init(checker.params)
    batch_rng, train_start = checker_rng(seed, _BATCHES), time.time()
    for i in range(1, steps + 1):
        idx = batch_rng.integers(num_train, size=batch_size)
        params, opt_state, loss, acc = step(params, opt_state, images[idx], targets[idx])
        if i % log_every == 0 or i == steps:
            log(f"step {i}/{steps}  loss {float(loss):.4f}  batch slots right {float(acc):.3f}  "
                f"{time.time() - train_start:.0f}s")
    train_seconds = time.time() - train_start
    checker = ImageChecker(config, params)
    records = heldout_records(eval_seed, num_eval)
    heldout = gen_image_accuracy(checker, records, [r["images"][0] for r in records])
    figures = {"heldout": heldout, "train_seconds": round(train_seconds, 1),
               "render_seconds": round(render_seconds, 1), "num_train": num_train, "steps": steps,
               "batch_size": batch_size, "lr": lr, "seed": seed, "eval_seed": eval_seed,
               "config": dataclasses.asdict(config), "devices": f"{jax.device_count()} {jax.default_backend()}"}
    return checker, figures


# ----------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for checker.msgpack and checker.json")
    parser.add_argument("--num_train", type=int, default=8_000, help="training scenes (rendered once)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--side", type=int, default=CheckerConfig.side, help="images are resized to side×side")
    parser.add_argument("--num_eval", type=int, default=1_000, help="held-out gen_image records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_seed", type=int, default=1)
    parser.add_argument("--log_every", type=int, default=100)
    args = parser.parse_args(argv)
    checker, figures = train_checker(args.num_train, args.steps, args.batch_size, args.lr,
                                     CheckerConfig(side=args.side), args.seed, args.eval_seed,
                                     args.num_eval, args.log_every)
    print("held-out accuracy on real renders:", json.dumps(figures["heldout"]))
    os.makedirs(args.out, exist_ok=True)
    save_checker(checker, os.path.join(args.out, "checker.msgpack"))
    with open(os.path.join(args.out, "checker.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {args.out}/checker.msgpack and checker.json")
    return figures


if __name__ == "__main__":
    main()

"""The image head alone on an oracle condition: how well the DiT recipe draws in N steps.

    python benchmarks/image_head_oracle.py [--steps=400] [--noise_draws=4] [--time_sampling=uniform] \
        [--patch_size=4] [--guidance_scale=3] [--json=out.json]

Separates the decoder from the LLM in issue 21's drawing task: the condition of each shapes-world
drawing request is one token per requested object, the sum of learned embeddings of its colour,
shape, size and cell (what a perfect LLM could hand the DiT). The DiT is
`configs/experiments/shapes_world_gen_image.py`'s (32×32 pixels, patch 4, width 128, depth 4,
pixels scaled by data_shift/data_scale), trained by `image_head.flow_matching_loss` with AdamW
(warm-up 50, cosine), clip 1, batch 32; then 200 held-out requests are drawn (Euler, 20 steps,
guidance 3) and read by the attribute checker (`experiments/shapes_world/image_checker.py`).

2 shared CPU cores, 400 steps (docs/experiments.md, "Drawing (issue 21)"), position / colour /
shape: one draw 93.0 / 54.6 / 24.0 (169 s); `--noise_draws=4` 95.6 / 81.8 / 19.7 (690 s).
"""
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from m2omni_jax.experiments.shapes_world import image_checker as ic
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.models import image_head as ih

flags.DEFINE_integer("steps", 400, "Training steps.")
flags.DEFINE_integer("batch", 32, "Drawings per step.")
flags.DEFINE_integer("noise_draws", 1, "(noise, t) draws per drawing (image_head.noise_draws).")
flags.DEFINE_enum("time_sampling", "uniform", list(ih.TIME_SAMPLINGS), "Training times.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate.")
flags.DEFINE_integer("width", 128, "DiT width.")
flags.DEFINE_integer("depth", 4, "DiT blocks.")
flags.DEFINE_integer("patch_size", 4, "DiT patch side (32 must be a multiple).")
flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance at sampling.")
flags.DEFINE_integer("num_train", 8000, "Training requests (rendered once).")
flags.DEFINE_integer("num_eval", 200, "Held-out requests drawn and checked.")
flags.DEFINE_string("json", "", "Write the results here as JSON (default: print only).")
FLAGS = flags.FLAGS
SIDE = 32
ATTRIBUTES = (("color", tuple(sw.COLORS)), ("shape", sw.SHAPES), ("size", sw.SIZES), ("position", sw.POSITIONS))
MAX_OBJECTS = 3


def requests(seed: int, num: int) -> list[dict]:
    """`num` gen_image records of their own stream `seed`."""
    rng = np.random.default_rng(seed)
    return [sw.TASK_BUILDERS["gen_image"](np.random.default_rng(rng.integers(1 << 62))) for _ in range(num)]


def oracle_condition(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(MAX_OBJECTS, 4) attribute indices and (MAX_OBJECTS,) mask of a request's objects."""
    ids, mask = np.zeros((MAX_OBJECTS, len(ATTRIBUTES)), np.int32), np.zeros((MAX_OBJECTS,), bool)
    for k, obj in enumerate(ic.request_objects(record)[:MAX_OBJECTS]):
        ids[k] = [list(values).index(obj[name]) for name, values in ATTRIBUTES]
        mask[k] = True
    return ids, mask


class OracleDiT(nn.Module):
    """Attribute embeddings summed per object -> the image head's condition tokens."""
    config: ih.ImageHeadConfig

    @nn.compact
    def __call__(self, x_t, t, ids, mask):
        cond = sum(nn.Embed(len(values), self.config.cond_width, name=f"{name}_embed")(ids[..., k])
                   for k, (name, values) in enumerate(ATTRIBUTES))
        return ih.ImageHead(self.config, name="head")(x_t, t, cond, mask)


def main(argv):
    del argv
    cfg = ih.ImageHeadConfig(image_size=SIDE, patch_size=FLAGS.patch_size, width=FLAGS.width, depth=FLAGS.depth,
                             num_heads=4, cond_width=64, cond_dropout=0.1, time_sampling=FLAGS.time_sampling,
                             data_shift=0.89, data_scale=0.31, noise_draws=FLAGS.noise_draws)
    train, held_out = requests(0, FLAGS.num_train), requests(1, FLAGS.num_eval)
    images = ic.to_input([r["images"][0] for r in train], SIDE)
    ids, masks = map(np.stack, zip(*map(oracle_condition, train)))
    eval_ids, eval_masks = map(np.stack, zip(*map(oracle_condition, held_out)))

    model = OracleDiT(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)), jnp.zeros((1,)),
                                 ids[:1], masks[:1])["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(50, FLAGS.steps // 2), FLAGS.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(params)
    apply = lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m)  # noqa: E731

    @jax.jit
    def step(params, opt_state, x, c, m, rng):
        loss, grads = jax.value_and_grad(lambda p: ih.flow_matching_loss(
            apply, p, cfg.normalize(x), c, m, rng, cond_dropout=cfg.cond_dropout, time_sampling=cfg.time_sampling,
            noise_draws=cfg.noise_draws))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def draw(params, c, m, rng):
        x = ih.sample(apply, params, c, m, rng, image_shape=cfg.image_shape, num_steps=20,
                      guidance_scale=FLAGS.guidance_scale)
        return jnp.clip(cfg.denormalize(x), -1, 1)

    batches, start = np.random.default_rng(0), time.time()
    for i in range(1, FLAGS.steps + 1):
        idx = batches.integers(len(images), size=FLAGS.batch)
        params, opt_state, loss = step(params, opt_state, images[idx], ids[idx], masks[idx], jax.random.key(i))
        if i % 100 == 0 or i == FLAGS.steps:
            print(f"step {i}/{FLAGS.steps}  loss {float(loss):.4f}  {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start
    drawn = np.asarray(draw(params, eval_ids, eval_masks, jax.random.key(123)))
    pixels = ((drawn + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    accuracy = ic.gen_image_accuracy(ic.cached_checker(SIDE), held_out, list(pixels))
    result = {"accuracy": {k: round(v, 4) for k, v in accuracy.items() if isinstance(v, float)},
              "train_seconds": round(train_seconds, 1), "flags": {k: FLAGS[k].value for k in (
                  "steps", "batch", "noise_draws", "time_sampling", "lr", "width", "depth", "patch_size",
                  "guidance_scale", "num_train", "num_eval")}}
    print(json.dumps(result))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

"""Vision-tower pre-training [ours]: a stand-in for the paper's pretrained ViT.

    m2omni-pretrain-tower --config=configs/experiments/shapes_world_vqa.py --workdir=/tmp/vqa/tower

M2-omni starts from Qwen2-VL's ViT, pre-trained on billions of image–text pairs;
the built-in shapes world has no such tower, and one trained from scratch through
the LLM learns colour and size fast but outlines (circle vs star) hardly at all in
a CPU budget. This stage trains the NaViT tower alone on image–caption pairs,
classification on caption tokens as in SuperClass (Huang et al. 2024,
"Classification Done Right for Vision-Language Pre-Training"): each image
predicts the bag of its caption's tokens (a sigmoid cross-entropy per vocabulary
token, where SuperClass uses an IDF-weighted softmax) from the mean of its
merged tokens (`pooling="mean"`) or, per word, from its best token
(`pooling="max"`, multiple-instance learning). No text tower and no decoder, so a
step costs the tower alone, and every caption word pulls on the image's features
directly. The head's biases start at each token's caption frequency
(`head_bias="prior"`), so the tower's first steps go to telling images apart.

    shapes-world train records (single-image tasks) → caption of the scene → tokens → multi-hot
    image → resize → patchify → `images_per_row` images packed per row (segment ids)
    → VisionEncoder → [mean per image] → LayerNorm → Dense(vocab) → [max per image]
    → sigmoid cross-entropy

`objective="regions"` instead trains on the scene's ground truth per merged token:
each token names the shape, colour, size and grid position of the object it covers
(or background), a softmax per attribute, as detector features with attribute heads
(Anderson et al. 2018, "Bottom-Up and Top-Down Attention for Image Captioning and
VQA"). Captions bind attributes to objects only through word order; here one token
must hold all of one object's attributes, which is what "what shape is the red
object?" asks of the LLM.

    scene objects (centre, radius) → the token boxes each one covers → (shape, colour, size, position) per token
    image → ... → VisionEncoder → RegionHead (regions.py) → softmax cross-entropy per attribute

Measured (tiny tower, steps of 128 images; chance 20%). Caption objective, the head's
one-object shape accuracy: mean pooling, biases at -log V: 66% after 900 steps; max
pooling, prior biases: 76% after 900, 87% after 1300. Region objective, each object's
shape from its tokens: 84% after 400 steps and 86% after 800, the same with one, two or
three objects (69% in 56x56 images, where a small star is 9 pixels across, 99% at 84x84);
with images of at least 84x84 and `model.vision.fractional_position_frequencies=4`, 93-98%
after 800 (and positions 98-100%; 25-39% without the fractional positions: 2-D RoPE is
relative). The run ends by writing these figures to `tower_eval.json`.

The tower is `config.model.vision` (so its parameters fit the omni model's
`vision/` tree) and the region head is the omni model's "shapes_world_regions"
connector plug-in (`regions.py`, params `connector_extras/region_head/...`);
`config.tower_pretrain` (configs/experiments/shapes_world_vqa.py) sets the run.
`tower_pretrain.optimizer="fixnorm"` trains with FixNorm-AdamW instead of AdamW
(`tower_optimizer`; compared with TPE-tuned AdamW in benchmarks/fixnorm_vs_tpe.py).
The checkpoint has the omni layout (`checkpoints/<step>/state` with
`params/vision/...`), so the next run loads it with `config.init_from` (this
workdir) and `config.init_from_include = ("^vision/", "^connector_extras/")`.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from m2omni_jax import cli
from m2omni_jax.config_fields import dataclass_from_config, replace
from m2omni_jax.data import image_preprocessing as ip, media
from m2omni_jax.data import pipeline, tokenizer as tokenizer_lib
from m2omni_jax.experiments.shapes_world import source as shapes_world_source
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import writer as write_shapes_world
from m2omni_jax.experiments.shapes_world.regions import (MODULE_NAME, REGION_ATTRIBUTES, REGION_CLASSES, RegionTags,
                                                         split_region_logits)
from m2omni_jax.models.layers import LayerNorm, kernel_init
from m2omni_jax.models.vision import VisionConfig, VisionEncoder, training_flops_per_pack
from m2omni_jax.parallel import sharding
from m2omni_jax.training import loop as loop_lib, mfu, optimizers, train_step
from m2omni_jax.run_config import RunConfig

BATCH_KEYS = ("patches", "segment_ids", "hw", "targets", "region_labels")
_BATCH_NDIM = {"patches": 3, "hw": 3, "targets": 3, "segment_ids": 2, "region_labels": 3}
SCENE_TASKS = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position")  # one image with a scene


# ----------------------------------------------------------------------------- data


# Region targets: each merged token's object (0: background), as indices into
# regions.REGION_ATTRIBUTES.
REGION_MIN_OVERLAP = 0.3  # of the smaller of the token's box and the object's box


def region_owners(scene: dict, grid_thw) -> np.ndarray:
    """(merged tokens,) int32: per merged token of the image (row-major), the index of the
    object covering it, -1 for background. A token belongs to the object whose bounding box
    overlaps it most, if that overlap is at least REGION_MIN_OVERLAP of the smaller box; the
    token under an object's centre always does (a small object between four tokens). The
    grid is the resized image's, the scene in its own pixels."""
    _, h, w = (int(g) for g in grid_thw)
    rows, cols = h // ip.MERGE_SIZE, w // ip.MERGE_SIZE
    cell_h, cell_w = scene["height"] / rows, scene["width"] / cols
    y0 = np.arange(rows)[:, None] * cell_h  # token boxes, (rows, 1) and (1, cols)
    x0 = np.arange(cols)[None, :] * cell_w
    best, owner = np.zeros((rows, cols)), np.full((rows, cols), -1, np.int32)
    for k, obj in enumerate(scene["objects"]):
        (cx, cy), r = obj["center"], obj["radius"]
        over_y = np.clip(np.minimum(y0 + cell_h, cy + r) - np.maximum(y0, cy - r), 0, None)
        over_x = np.clip(np.minimum(x0 + cell_w, cx + r) - np.maximum(x0, cx - r), 0, None)
        overlap = over_y * over_x / min(cell_h * cell_w, (2 * r) ** 2)
        wins = (overlap >= REGION_MIN_OVERLAP) & (overlap > best)
        best, owner = np.where(wins, overlap, best), np.where(wins, k, owner)
    for k, obj in enumerate(scene["objects"]):
        cx, cy = obj["center"]
        owner[min(int(cy // cell_h), rows - 1), min(int(cx // cell_w), cols - 1)] = k
    return owner.reshape(-1)


def region_labels(scene: dict, grid_thw) -> np.ndarray:
    """(merged tokens, 4) int32: per merged token, the shape, colour, size and position class
    of the object covering it (region_owners; 1 + index in REGION_ATTRIBUTES, 0: background)."""
    owner = region_owners(scene, grid_thw)
    table = np.array([[0] * len(REGION_ATTRIBUTES)]
                     + [[1 + values.index(obj[attr]) for attr, values in REGION_ATTRIBUTES]
                        for obj in scene["objects"]], np.int32)
    return table[owner + 1]


class CaptionedImage:
    """Record bytes -> the image's patches, the multi-hot tokens of its scene's caption and its
    tokens' region labels, or a bad-record marker (skipped and counted downstream)."""

    def __init__(self, tokenizer, vocab_size: int, opts: media.VisionOptions):
        self.tokenizer, self.vocab_size, self.opts = tokenizer, vocab_size, opts

    def __call__(self, raw: bytes) -> dict:
        try:
            record = sw.decode_record(raw)
            item = media.preprocess_media("image", record["images"][0], self.opts)
            ids = self.tokenizer.encode(sw.caption_text(record["attributes"]))
            regions = region_labels(record["attributes"], item.grid_thw)
        except (ValueError, KeyError, TypeError, IndexError):
            return {pipeline.BAD_RECORD: 1}
        targets = np.zeros(self.vocab_size, np.float32)
        targets[[i for i in ids if i < self.vocab_size]] = 1.0
        return {"patches": item.patches, "grid_thw": item.grid_thw, "targets": targets, "region_labels": regions}


def pack_row(images: list[dict], patches_per_row: int) -> dict:
    """`images_per_row` images -> one fixed-size patch pack (image k is segment k + 1)."""
    packed = ip.pack_patches([(im["patches"], im["grid_thw"]) for im in images], bucket_sizes=(patches_per_row,))
    regions = np.full((patches_per_row // ip.MERGE_SIZE ** 2, len(REGION_ATTRIBUTES)), -1, np.int32)  # -1: padding
    if all("region_labels" in im for im in images):  # else no region targets: all padding
        labels = np.concatenate([im["region_labels"] for im in images])
        regions[:len(labels)] = labels
    return {"patches": packed["patches"], "segment_ids": packed["segment_ids"], "hw": packed["hw_positions"],
            "targets": np.stack([im["targets"] for im in images]), "region_labels": regions,
            "num_bad_records": sum(int(im.get("num_bad_records", 0)) for im in images)}


def max_patches_per_image(opts: media.VisionOptions) -> int:
    """The most patches one image can have under `data.vision.image_max_pixels` (or its
    `image_side`): its sides are multiples of 28, so its area is a whole number of 28²
    blocks of 2×2 patches."""
    area = opts.image_side ** 2 if opts.image_side else opts.image_max_pixels
    return area // ip.FACTOR ** 2 * ip.MERGE_SIZE ** 2


def make_dataset(config, tokenizer, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of `tower_pretrain.batch_size / process_count` rows for this process."""
    tc, opts = tower_config(config), media.VisionOptions.from_config(config)
    per_row, per_pack = int(tc.images_per_row), int(tc.patches_per_row)
    if per_pack % ip.MERGE_SIZE ** 2 or per_pack < per_row * max_patches_per_image(opts):
        raise ValueError(f"config.tower_pretrain.patches_per_row={per_pack} must be a multiple of "
                         f"{ip.MERGE_SIZE ** 2} holding images_per_row={per_row} images of up to "
                         f"{max_patches_per_image(opts)} patches (data.vision.image_max_pixels)")
    world_cfg = shapes_world_source.world_source_config(config)
    shapes_dir, file_tasks = shapes_world_source.write_builtin_shapes_world(config, world_cfg)
    tasks = [t for t in file_tasks if t in SCENE_TASKS]
    if not tasks:
        raise ValueError(f"data.sources.<shapes_world>.tasks={tuple(file_tasks)} has none of {SCENE_TASKS} to pre-train on")
    source = write_shapes_world.open_split(shapes_dir, "train")
    indices = [i for i in range(len(source)) if file_tasks[i % len(file_tasks)] in tasks]
    ds = grain.MapDataset.source(indices)[process_index::process_count].shuffle(int(config.data.seed)).repeat(None)
    ds = ds.map(lambda i: source[i]).map(CaptionedImage(tokenizer, int(config.model.llm.vocab_size), opts))
    it = pipeline.SkipBadDataset(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)))
    it = it.batch(per_row, drop_remainder=True, batch_fn=functools.partial(pack_row, patches_per_row=per_pack))
    return it.batch(int(tc.batch_size) // process_count, drop_remainder=True)


# ----------------------------------------------------------------------------- model


class CaptionTokenHead(nn.Module):
    """LayerNorm, then one logit per vocabulary token."""
    vocab_size: int

    @nn.compact
    def __call__(self, features):
        features = LayerNorm(name="norm")(features)
        # A random kernel (a zero one, as big_vision's classifiers, passes the tower no gradient
        # at first: its one-object shape accuracy stayed at chance after 900 steps, against
        # 42.5% after 600 with this one). Biases start at a rare token's prior, -log V;
        # pretrain() moves them to each token's caption frequency (head_bias="prior").
        prior = nn.with_logical_partitioning(nn.initializers.constant(-np.log(self.vocab_size)), ("vocab",))
        return nn.Dense(self.vocab_size, kernel_init=kernel_init(("embed", "vocab")), bias_init=prior,
                        name="classifier")(features)


class TowerClassifier(nn.Module):
    """The vision tower and its pre-training heads -> {"caption": (B, K, vocab), "regions": (B, M, classes)}.

    "caption": a vocabulary classifier and a pool over each image's merged tokens. pooling
    "mean": classify the mean of the image's tokens (SuperClass). "max": classify every
    token and take each word's largest logit in the image (multiple-instance learning), so
    the one token that holds the star must itself say "star"; a mean lets the background
    tokens dilute an object's outline.
    "regions": every merged token names the shape, colour, size and position of the object it covers
    (regions.RegionHead), as detector features with attribute heads (Anderson et al. 2018,
    "Bottom-Up and Top-Down Attention"): one token holds one object's attributes together.
    """
    vision: VisionConfig
    vocab_size: int
    images_per_row: int
    pooling: str = "mean"
    objective: str = "caption"

    @nn.compact
    def __call__(self, patches, segment_ids, hw):
        """patches (B, N, D), segment_ids (B, N) (image k = k + 1), hw (B, 2, N) -> the heads' logits."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"config.tower_pretrain.pooling={self.pooling!r}: use one of {POOLINGS}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"config.tower_pretrain.objective={self.objective!r}: use one of {OBJECTIVES}")
        features, merged_ids = VisionEncoder(self.vision, name="vision")(patches, segment_ids, hw)
        out = {}
        if "regions" in self.objective:
            # Under the omni model's plug-in scope, so its checkpoint loads there as it is.
            regions = RegionTags(REGION_CLASSES, name=MODULE_NAME).logits(features)
            out["regions"] = nn.with_logical_constraint(regions, ("activation_batch", "activation_length", None))
        if "caption" in self.objective:
            out["caption"] = self.caption_logits(features, merged_ids)
        return out

    def caption_logits(self, features, merged_ids):
        if self.pooling == "mean":
            weights = (merged_ids[..., None] == jnp.arange(1, self.images_per_row + 1)).astype(features.dtype)
            features = jnp.einsum("bmk,bmd->bkd", weights, features) / jnp.maximum(weights.sum(1), 1.0)[..., None]
        logits = CaptionTokenHead(self.vocab_size, name="head")(features)
        if self.pooling == "max":
            per_image = jax.vmap(lambda x, ids: jax.ops.segment_max(x, ids, self.images_per_row + 1))
            # Segment 0 is padding. An empty image slot (-inf) gets -1e9: no loss and no gradient
            # against its all-zero targets.
            logits = jnp.maximum(per_image(logits, merged_ids)[:, 1:], -1e9)
        return nn.with_logical_constraint(logits, ("activation_batch", None, "activation_vocab"))


POOLINGS = ("mean", "max")
OBJECTIVES = ("caption", "regions", "caption+regions")


def model_inputs(batch) -> dict:
    return {k: batch[k] for k in ("patches", "segment_ids", "hw")}


def loss_fn(params, batch, *, model):
    out = model.apply({"params": params}, **model_inputs(batch))
    loss, metrics = 0.0, {}
    if "caption" in out:
        metrics.update(caption_loss(out["caption"].astype(jnp.float32), batch["targets"]))
        loss += metrics["caption_loss"]
    if "regions" in out:
        metrics.update(region_loss(out["regions"].astype(jnp.float32), batch["region_labels"]))
        loss += metrics["region_loss"]
    return loss, dict(metrics, loss=loss)


def caption_loss(logits, targets) -> dict:
    # One sigmoid classifier per token. (SuperClass's softmax needs IDF weights: without them,
    # on the shapes world, it learned the frequent words and no colour in 400 steps.)
    loss = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()
    # Recall of the caption's tokens among each image's top-|caption| predictions.
    k = targets.sum(-1, keepdims=True)
    rank = jnp.argsort(jnp.argsort(-logits, axis=-1), axis=-1)
    recall = ((rank < k) * targets).sum() / jnp.maximum(targets.sum(), 1.0)
    return {"caption_loss": loss, "caption_token_recall": recall}


def split_regions(logits) -> list:
    """(..., sum(REGION_CLASSES)) -> one (..., classes) array per region attribute."""
    return split_region_logits(logits, REGION_CLASSES)


def region_loss(logits, labels) -> dict:
    """Softmax cross-entropy per attribute over the image tokens (labels -1: padding), summed
    over attributes; and the accuracy on the tokens that cover an object."""
    valid = labels[..., 0] >= 0
    on_object = labels[..., 0] > 0
    loss, metrics = 0.0, {}
    for (attr, _), part, label in zip(REGION_ATTRIBUTES, split_regions(logits), jnp.moveaxis(labels, -1, 0)):
        ce = optax.softmax_cross_entropy_with_integer_labels(part, jnp.maximum(label, 0))
        loss += jnp.where(valid, ce, 0.0).sum() / jnp.maximum(valid.sum(), 1)
        hit = (part.argmax(-1) == label) & on_object
        metrics[f"region_{attr}_accuracy"] = hit.sum() / jnp.maximum(on_object.sum(), 1)
    return dict(metrics, region_loss=loss)


def jit_step(model, mesh, rules, shardings):
    loss = lambda params, batch, rng: loss_fn(params, batch, model=model)  # noqa: E731 (no randomness)
    return train_step.jit_loss_step(loss, mesh, rules, shardings, _BATCH_NDIM)


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass(frozen=True)
class TowerPretrainConfig:
    steps: int = 1000
    batch_size: int = 32  # rows per step (global)
    images_per_row: int = 4
    patches_per_row: int = 256  # ≥ images_per_row × the largest image's patches
    peak_lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    objective: str = "caption"  # "caption" | "regions" | "caption+regions" (TowerClassifier)
    pooling: str = "mean"  # "mean" (SuperClass) | "max": each word from its best token (TowerClassifier)
    head_bias: str = "prior"  # "prior": each token's caption frequency (prior_batches) | "rare": -log(vocab)
    prior_batches: int = 4
    eval_batches: int = 1  # at the end: the head's shape/colour accuracy on fresh scenes (0: skip)
    log_every: int = 10
    checkpoint_every: int = 500
    optimizer: str = "adamw"  # "adamw" | "fixnorm" (tower_optimizer: FixNorm-AdamW, no weight decay)
    fixnorm_tau: float = 10.0  # fixnorm: the heads' classifier norm (the logit scale)


OPTIMIZERS = ("adamw", "fixnorm")
# FixNorm's labels for the tower and its heads. Scale-invariant: the merger's last kernel, the
# only tower weight a normalisation reads right after: both heads start with a LayerNorm of the
# merged tokens (the caption head's mean pool before it is linear). Its bias, left free (held
# at its zero initial norm it could never move), makes it near- rather than exactly invariant,
# as the omni connector's projection (optimizers.fixnorm_scale_invariant). No other tower
# weight is: in the pre-norm blocks every kernel writes into the residual stream (with the
# patch and position embeddings), which each LayerNorm normalises as a whole, and the towers
# have no QK-norm. Classifier (norm held at fixnorm_tau): each head's output kernel.
TOWER_SCALE_INVARIANT = (r"^vision/merger/fc2/kernel$",)
TOWER_CLASSIFIERS = (rf"^{MODULE_NAME}/region_head/classifier/kernel$", r"^head/classifier/kernel$")


def tower_optimizer(opt, tc: TowerPretrainConfig):
    """config.opt for the tower run: AdamW (peak_lr, weight_decay) or FixNorm-AdamW with the
    TOWER_* labels, τ = fixnorm_tau and no weight decay; no groups, nothing frozen."""
    if tc.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.tower_pretrain.optimizer={tc.optimizer!r}: use one of {OPTIMIZERS}")
    if tc.optimizer == "fixnorm" and not tc.fixnorm_tau > 0:
        raise ValueError(f"config.tower_pretrain.fixnorm_tau={tc.fixnorm_tau!r} must be > 0")
    fixnorm = {"fixnorm.scale_invariant": TOWER_SCALE_INVARIANT, "fixnorm.classifier": TOWER_CLASSIFIERS,
               "fixnorm.tau": float(tc.fixnorm_tau), "fixnorm.per_channel": False,
               "fixnorm.classifier_per_class": False} if tc.optimizer == "fixnorm" else {}
    return replace(opt, name=tc.optimizer, peak_lr=tc.peak_lr, warmup_steps=tc.warmup_steps,
                   weight_decay=tc.weight_decay if tc.optimizer == "adamw" else 0.0,
                   param_groups=(), lr_multipliers={}, frozen=(), **fixnorm)


def example_shapes(tc: TowerPretrainConfig, vocab_size: int) -> dict:
    b, n = tc.batch_size, tc.patches_per_row
    return {"patches": jax.ShapeDtypeStruct((b, n, media.PATCH_DIM), jnp.float32),
            "segment_ids": jax.ShapeDtypeStruct((b, n), jnp.int32), "hw": jax.ShapeDtypeStruct((b, 2, n), jnp.int32),
            "targets": jax.ShapeDtypeStruct((b, tc.images_per_row, vocab_size), jnp.float32),
            "region_labels": jax.ShapeDtypeStruct((b, n // ip.MERGE_SIZE ** 2, len(REGION_ATTRIBUTES)), jnp.int32)}


def tower_config(config) -> TowerPretrainConfig:
    return dataclass_from_config(TowerPretrainConfig, RunConfig.of(config).section("tower_pretrain"), "tower_pretrain")


def pretrain(config, workdir: str) -> dict:
    """Trains the tower; returns the last logged metrics. Resumes from `workdir`'s checkpoint."""
    config = RunConfig.of(config)
    tc = tower_config(config)
    if tc.head_bias not in ("prior", "rare") or tc.prior_batches < 1:
        raise ValueError(f"config.tower_pretrain.head_bias={tc.head_bias!r} must be 'prior' or 'rare', and "
                         f"prior_batches={tc.prior_batches} at least 1")
    if not 0 <= tc.warmup_steps <= tc.steps:
        raise ValueError(f"config.tower_pretrain.warmup_steps={tc.warmup_steps} must be in [0, steps={tc.steps}]")
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh)
    ways = sharding.batch_axis_size(mesh)
    if tc.batch_size % (ways * jax.process_count()):
        raise ValueError(f"config.tower_pretrain.batch_size={tc.batch_size} must divide over the "
                         f"{ways} batch-axis devices and {jax.process_count()} processes")
    tokenizer = tokenizer_lib.get_tokenizer(config)
    vision = dataclass_from_config(VisionConfig, config.model.vision, "model.vision")
    vocab_size = int(config.model.llm.vocab_size)
    model = TowerClassifier(vision, vocab_size, tc.images_per_row, tc.pooling, tc.objective)
    opt = tower_optimizer(config.opt, tc)
    shapes = example_shapes(tc, vocab_size)
    abstract_params = nn.unbox(train_step.abstract_boxed_params(model, shapes, model_inputs))
    tx = optimizers.make_optimizer(opt, tc.steps, abstract_params)
    state, _, shardings = train_step.create_train_state(model, tx, mesh, rules, shapes, config.seed,
                                                               inputs=model_inputs)
    data_iter = iter(make_dataset(config, tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count()))
    peak = mfu.peak_flops_per_device(float(config.train.peak_flops_per_device)) * jax.device_count()
    options = loop_lib.LoopOptions(steps=tc.steps, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
                                   max_nonfinite_steps=int(config.train.max_nonfinite_steps))
    head_bias_at_prior = tc.head_bias == "prior" and "caption" in tc.objective
    loop = loop_lib.Loop(
        jit_step(model, mesh, rules, shardings), data_iter, options, workdir,
        to_global=lambda local: pipeline.make_global_batch(
            {k: v for k, v in local.items() if k != "num_bad_records"}, mesh),
        metrics_fn=lambda fetched, local: dict(loop_lib.scalar_metrics(fetched),
                                               bad_records=int(np.sum(local.get("num_bad_records", 0)))),
        throughput=loop_lib.Throughput(items_per_step=tc.batch_size * tc.images_per_row, item="images",
                                       flops_per_step=training_flops_per_pack(vision, tc.patches_per_row) * tc.batch_size,
                                       peak_flops=peak),
        schedule=optimizers.make_schedule_from_config(opt, tc.steps),
        callbacks=[HeadAccuracy(model, config, tokenizer, mesh, rules, workdir, tc.eval_batches)],
        fresh_start=(functools.partial(_head_bias_at_prior, shardings=shardings, config=config, tokenizer=tokenizer,
                                       num_batches=tc.prior_batches) if head_bias_at_prior else None))
    _, last = loop.run(state)
    return last


class HeadAccuracy(loop_lib.Callback):
    """At the end of the run: the heads' accuracy on fresh scenes (`evaluate_head`), written to
    `tower_eval.json` and returned as `tower_eval`."""

    def __init__(self, model, config, tokenizer, mesh, rules, workdir: str, num_batches: int):
        self.args, self.workdir, self.num_batches = (model, config, tokenizer, mesh, rules), workdir, num_batches

    def finish(self, state) -> dict:
        if not self.num_batches or jax.process_count() > 1:
            return {}
        model, config, tokenizer, mesh, rules = self.args
        accuracy = evaluate_head(model, state.params, config, tokenizer, mesh, rules, self.num_batches)
        step = int(state.step)
        (epath.Path(self.workdir) / "tower_eval.json").write_text(json.dumps(dict(accuracy, step=step), indent=2))
        logging.info("tower head on fresh scenes (objects: accuracy): shape %s, colour %s; %s/tower_eval.json",
                     accuracy["shape"], accuracy["color"], self.workdir)
        return {"tower_eval": accuracy}


# ----------------------------------------------------------------------------- eval


def word_token_ids(tokenizer, words, context: str = "a large") -> list[int]:
    """Each word's (first) token id as it appears mid-caption, after `context`."""
    prefix = tokenizer.encode(context)
    return [tokenizer.encode(f"{context} {word}")[len(prefix)] for word in words]


def attribute_accuracy(logits: np.ndarray, scenes: list[dict], shape_ids, color_ids) -> dict:
    """logits (num_images, vocab) of the head. For each scene, the share of its objects' shapes
    (colours) among the head's top-|set| shape (colour) words; averaged per number of objects:
    {"shape": {"1": acc, ...}, "color": {...}, "num_scenes": {"1": n, ...}}."""
    hits = {"shape": {}, "color": {}}
    for row, scene in zip(logits, scenes):
        n = str(len(scene["objects"]))
        for attr, ids, vocab in (("shape", shape_ids, sw.SHAPES), ("color", color_ids, list(sw.COLORS))):
            truth = {o[attr] for o in scene["objects"]}
            top = {vocab[i] for i in np.argsort(-row[list(ids)])[:len(truth)]}
            hits[attr].setdefault(n, []).append(len(top & truth) / len(truth))
    out = {attr: {n: float(np.mean(v)) for n, v in sorted(by_n.items())} for attr, by_n in hits.items()}
    out["num_scenes"] = {n: len(v) for n, v in sorted(hits["shape"].items())}
    return out


def region_accuracy(logits: list[np.ndarray], scenes: list[dict], grids: list) -> dict:
    """logits: per image (its merged tokens, sum(REGION_CLASSES)) of the region head. Each
    object's shape (colour, position) is the class, background aside, of the largest summed logit
    over the tokens it covers (region_owners); the share right, averaged per number of
    objects, in attribute_accuracy's layout."""
    hits, num_scenes = {"shape": {}, "color": {}, "position": {}}, {}
    for image, scene, grid in zip(logits, scenes, grids):
        n, owner = str(len(scene["objects"])), region_owners(scene, grid)
        num_scenes[n] = num_scenes.get(n, 0) + 1
        parts = dict(zip([attr for attr, _ in REGION_ATTRIBUTES], split_regions(np.asarray(image))))
        for k, obj in enumerate(scene["objects"]):
            for attr, values in (a for a in REGION_ATTRIBUTES if a[0] in hits):
                guess = values[int(np.argmax(parts[attr][owner == k, 1:].sum(0)))]
                hits[attr].setdefault(n, []).append(float(guess == obj[attr]))
    out = {attr: {n: float(np.mean(v)) for n, v in sorted(by_n.items())} for attr, by_n in hits.items()}
    out["num_scenes"] = dict(sorted(num_scenes.items()))
    return out


def evaluate_head(model, params, config, tokenizer, mesh, rules, num_batches: int, seed: int = 7) -> dict:
    """The heads' shape and colour accuracy on fresh scenes (half with one object, where an
    answer needs no locating), `num_batches` batches of tower_pretrain.batch_size rows: the
    region head's (region_accuracy) if the model has one, else the caption head's
    (attribute_accuracy)."""
    tc, opts = tower_config(config), media.VisionOptions.from_config(config)
    rng = np.random.default_rng(seed)
    vocab_size = int(config.model.llm.vocab_size)
    apply = jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs))
    outputs, scenes, grids = [], [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(int(tc.batch_size)):
            images = []
            for _ in range(int(tc.images_per_row)):
                scene = sw.sample_scene(rng, num_objects=1 if rng.random() < 0.5 else int(rng.integers(2, 4)))
                item = media.preprocess_media("image", sw.render_scene(scene), opts)
                images.append({"patches": item.patches, "grid_thw": item.grid_thw,
                               "targets": np.zeros(vocab_size, np.float32)})
                scenes.append(scene)
                grids.append(item.grid_thw)
            rows.append(pack_row(images, int(tc.patches_per_row)))
        batch = {k: np.stack([r[k] for r in rows]) for k in ("patches", "segment_ids", "hw")}
        with sharding.activate(mesh, rules):
            out = jax.device_get(apply(params, batch["patches"], batch["segment_ids"], batch["hw"]))
        outputs.append(out)
    if "regions" in outputs[0]:
        rows = [row for out in outputs for row in np.asarray(out["regions"])]
        per_image, k = [], int(tc.images_per_row)
        for i, row in enumerate(rows):
            sizes = [ip.num_merged_tokens(g) for g in grids[i * k:(i + 1) * k]]
            per_image += np.split(row[:sum(sizes)], np.cumsum(sizes)[:-1])
        return dict(region_accuracy(per_image, scenes, grids), head="regions")
    logits = np.concatenate([np.asarray(out["caption"]).reshape(-1, vocab_size) for out in outputs])
    shape_ids, color_ids = word_token_ids(tokenizer, sw.SHAPES), word_token_ids(tokenizer, sw.COLORS)
    return dict(attribute_accuracy(logits, scenes, shape_ids, color_ids), head="caption")


def caption_token_prior(batches, num_images: int) -> np.ndarray:
    """Each token's share of captions over `num_images` images, kept inside (0, 1) by half an image."""
    counts = sum(np.asarray(b["targets"], np.float64).reshape(-1, b["targets"].shape[-1]).sum(0) for b in batches)
    return np.clip(counts / num_images, 0.5 / num_images, 1 - 0.5 / num_images)


def _head_bias_at_prior(state, shardings, config, tokenizer, num_batches: int):
    """Starts each token's bias at the logit of its caption frequency. From a rare token's
    prior (-log V) a frequent word's bias climbs about peak_lr per step under Adam, and
    while it climbs the words a tower learns first (colours) crowd out the rest: one-object
    shape accuracy after 300 steps 21% -> 61% with only the shape words as targets."""
    # Every process reads the same first batches (process 0 of 1), so all get one bias.
    data = iter(make_dataset(config, tokenizer, process_index=0, process_count=1))
    batches = [next(data) for _ in range(num_batches)]
    num_images = sum(int(np.asarray(b["segment_ids"]).max(axis=-1).sum()) for b in batches)
    prior = caption_token_prior(batches, num_images)
    bias_sharding = shardings.params["head"]["classifier"]["bias"]
    bias = jax.device_put(np.log(prior / (1 - prior)).astype(np.float32), bias_sharding)
    params = dict(state.params)
    params["head"] = {**params["head"], "classifier": {**params["head"]["classifier"], "bias": bias}}
    logging.info("head biases at the caption-token prior of %d images (%d tokens seen)", num_images,
                 int((prior > 0.5 / num_images).sum()))
    return state.replace(params=params)


def run():
    cli.run(pretrain, "m2omni-pretrain-tower")


if __name__ == "__main__":
    run()

"""FixNorm on the vision tower's pre-training: the merger's last kernel keeps its initial norm,
each head's classifier sits at τ, the rest trains as Adam without weight decay."""
import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from m2omni_jax.data import media as media_lib
from m2omni_jax.experiments.shapes_world import tower as pt
from m2omni_jax.experiments.shapes_world.regions import REGION_ATTRIBUTES
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import optimizers

from configs import base

TINY_VISION = VisionConfig(width=16, depth=1, num_heads=2, out_width=16)
TAU = 3.0


def _batch(rng, images_per_row=2):
    images = [{"patches": rng.normal(size=(16, media_lib.PATCH_DIM)).astype(np.float32), "grid_thw": (1, 4, 4),
               "targets": (rng.random(11) < 0.3).astype(np.float32),
               "region_labels": rng.integers(0, 3, size=(4, len(REGION_ATTRIBUTES))).astype(np.int32)}
              for _ in range(images_per_row)]
    row = pt.pack_row(images, 64)
    return {k: np.stack([row[k]] * 2) for k in pt.BATCH_KEYS}


def _paths_and_norms(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {optimizers.path_str(path): float(np.linalg.norm(np.asarray(x))) for path, x in flat}


@pytest.mark.parametrize("objective", ["regions", pytest.param("caption", marks=pytest.mark.slow)])
def test_fixnorm_holds_the_merger_kernel_and_pins_the_classifier_at_tau(objective):
    model = pt.TowerClassifier(TINY_VISION, vocab_size=11, images_per_row=2, objective=objective)
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    params = nn.unbox(model.init(jax.random.key(0), *(batch[k] for k in ("patches", "segment_ids", "hw")))["params"])
    tc = pt.TowerPretrainConfig(optimizer="fixnorm", fixnorm_tau=TAU, peak_lr=3e-2, warmup_steps=0,
                                weight_decay=0.5, objective=objective)
    opt = pt.tower_optimizer(RunConfig.of(base.get_config()).opt, tc)
    assert opt.name == "fixnorm" and opt.weight_decay == 0.0
    tx = optimizers.make_optimizer(opt, 10, params)
    state = tx.init(params)
    grad_fn = jax.jit(jax.grad(functools.partial(pt.loss_fn, model=model), has_aux=True))
    start = _paths_and_norms(params)
    for _ in range(4):
        grads, _ = grad_fn(params, _batch(rng))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    norms = _paths_and_norms(params)
    classifier = ("connector_extras/region_head/classifier/kernel" if objective == "regions"
                  else "head/classifier/kernel")
    assert norms["vision/merger/fc2/kernel"] == pytest.approx(start["vision/merger/fc2/kernel"], abs=1e-5)
    assert norms[classifier] == pytest.approx(TAU, abs=1e-5) and abs(start[classifier] - TAU) > 0.1
    # Everything else trains freely: the patch embedding's norm moves.
    assert abs(norms["vision/patch_embed/kernel"] - start["vision/patch_embed/kernel"]) > 1e-3


def test_the_tower_optimizer_is_one_clear_error_when_unknown():
    opt = RunConfig.of(base.get_config()).opt
    with pytest.raises(ValueError, match="tower_pretrain.optimizer='sgd'"):
        pt.tower_optimizer(opt, pt.TowerPretrainConfig(optimizer="sgd"))
    with pytest.raises(ValueError, match="fixnorm_tau=0"):
        pt.tower_optimizer(opt, pt.TowerPretrainConfig(optimizer="fixnorm", fixnorm_tau=0))
    adamw = pt.tower_optimizer(opt, pt.TowerPretrainConfig(weight_decay=0.05))
    assert adamw.name == "adamw" and adamw.weight_decay == 0.05

"""configs/experiments/shapes_world_vqa_paper.py is the paper's path: linear + L2-norm connector
without plug-ins or region words, sectioned M-RoPE in [16, 24, 24] proportion, native resolution."""
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs.experiments import shapes_world_vqa_paper
from m2omni_jax.data import image_preprocessing as ip, media
from m2omni_jax.models import connectors
from m2omni_jax.models.omni import ConnectorConfig
from m2omni_jax.run_config import RunConfig

PAPER_SECTIONS = (16, 24, 24)  # M2-omni / Qwen2-VL: (time, height, width) of head_dim 128's 64 pairs


def test_connector_is_linear_then_l2_norm_without_extras_or_region_words():
    config = shapes_world_vqa_paper.get_config()
    typed = RunConfig.of(config)
    connector = ConnectorConfig(**dict(config.model.connector))
    assert (connector.kind, connector.mlp, connector.extras) == ("linear", False, "")
    assert not typed.section("shapes_world").region_words
    # Nothing of a plug-in is loaded from the tower's checkpoint or frozen as one.
    assert all("connector_extras" not in p for p in (*config.init_from_include, *config.opt.frozen))
    # The connector's own tokens are unit-norm: the L2 norm is applied (output_scale after it).
    module = connectors.make_connector(connector.kind, out_width=32, mlp=connector.mlp)
    x = jax.random.normal(jax.random.key(0), (2, 5, int(config.model.vision.out_width)))
    out = module.apply(module.init(jax.random.key(1), x), x)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)

def test_mrope_is_sectioned_in_the_papers_proportion():
    llm = RunConfig.of(shapes_world_vqa_paper.get_config()).model.llm
    assert llm.mrope_layout == "sectioned"
    assert sum(llm.mrope_sections) == llm.head_dim // 2
    assert [Fraction(s, sum(llm.mrope_sections)) for s in llm.mrope_sections] == \
        [Fraction(s, sum(PAPER_SECTIONS)) for s in PAPER_SECTIONS]


def test_images_keep_their_native_resolution():
    config = shapes_world_vqa_paper.get_config()
    opts = media.VisionOptions.from_config(config)
    assert config.data.vision.image_side == 0
    # Aspect kept (no squashing): a wide scene gives a wide grid of merged tokens, a small one
    # stays at its own size (84x112 -> 3x4 merged tokens).
    for (width, height), (rows, cols) in (((224, 112), (2, 5)), ((112, 84), (3, 4))):
        image = Image.new("RGB", (width, height), "white")
        _, grid_h, grid_w = media.preprocess_media("image", image, opts).grid_thw
        assert (grid_h // ip.MERGE_SIZE, grid_w // ip.MERGE_SIZE) == (rows, cols)
    # Every world image fits the omni row's and the tower row's patch packs.
    largest = (opts.image_max_pixels // ip.FACTOR ** 2) * ip.MERGE_SIZE ** 2
    assert config.data.vision.patches_per_row >= largest
    assert config.tower_pretrain.patches_per_row >= config.tower_pretrain.images_per_row * largest

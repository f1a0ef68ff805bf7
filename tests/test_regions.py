"""The shapes world's region tags: the "shapes_world_regions" connector plug-in."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from m2omni_jax.experiments.shapes_world import regions
from m2omni_jax.experiments.shapes_world import tower as pt
from m2omni_jax.models import omni as omni_lib
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.models.omni import ConnectorConfig, OmniConfig, OmniModel, vision_training_flops_per_pack
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.training import train_step
from test_omni import VISION_INPUTS, make_batch

LLM_CONFIG = LLMConfig(vocab_size=128, width=32, depth=1, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=64, mrope_sections=(2, 3, 3))
CONFIG = OmniConfig(llm=LLM_CONFIG, vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
                    connector=ConnectorConfig(output_scale=4.0), placeholder_ids=(6, 9))
CLASSES, NAMES = (3, 4), ((), (5,), (6, 7), (), (8,), (9,), (10,))


def init(extras):
    model = OmniModel(CONFIG, connector_extras=extras)
    inputs = train_step.model_inputs(make_batch())
    params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
    return model, params, [inputs[k] for k in VISION_INPUTS]


def test_region_tags_join_the_connector_input():
    """The head's per-attribute softmax is concatenated to each merged token (one distribution
    per attribute; padding stays zero), from parameters of its own that a tower checkpoint fills."""
    model, params, vision = init(regions.RegionTags(CLASSES))
    head = params["connector_extras"]["region_head"]
    assert head["classifier"]["kernel"].shape == (16, 7)
    assert params["connector"]["proj"]["kernel"].shape == (16 + 7, LLM_CONFIG.width)
    features, merged_ids = model.apply({"params": params}, *vision, method=OmniModel.vision_features)
    tags, valid = np.asarray(features)[..., 16:], np.asarray(merged_ids) > 0
    np.testing.assert_allclose(tags[valid][:, :3].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(tags[valid][:, 3:].sum(-1), 1.0, rtol=1e-5)
    assert not tags[~valid].any()
    # The tags follow the head: a bias on class 1 of the first attribute makes it everyone's pick.
    biased = dict(head, classifier=dict(head["classifier"], bias=np.array([0, 30, 0, 0, 0, 0, 0], np.float32)))
    biased = dict(params, connector_extras={"region_head": biased})
    tags = np.asarray(model.apply({"params": biased}, *vision, method=OmniModel.vision_features)[0])[..., 16:]
    assert (tags[valid][:, 1] > 0.99).all()
    merged = 16  # 64 patches / 4
    plain = vision_training_flops_per_pack(CONFIG, 64)
    assert vision_training_flops_per_pack(CONFIG, 64, model.connector_extras) - plain == \
        6.0 * merged * (16 * 7 + 7 * LLM_CONFIG.width)  # the head, the connector's 7 more inputs


def test_region_words_add_the_embeddings_of_the_tagged_class_names():
    """Each image token gains sum_c tag_c * embedding(name of c) (the mean over a name's tokens;
    background adds nothing), through the LLM's own table."""
    model, params, vision = init(regions.RegionTags(CLASSES, NAMES))
    tokens, valid = (np.asarray(a) for a in model.apply({"params": params}, *vision, method=OmniModel.vision_tokens))
    tags = np.asarray(model.apply({"params": params}, *vision, method=OmniModel.vision_features)[0])[..., 16:]
    delta = np.arange(LLM_CONFIG.width, dtype=np.float32) / LLM_CONFIG.width
    for row, klass in ((5, 1), (6, 2), (8, 4)):  # "6" is half of class 2's two-token name
        moved = np.asarray(model.apply({"params": _shift(params, row, delta)}, *vision,
                                       method=OmniModel.vision_tokens)[0]) - tokens
        share = 0.5 if row == 6 else 1.0
        np.testing.assert_allclose(moved[valid], share * tags[valid][:, klass:klass + 1] * delta, atol=1e-5)
    untouched = model.apply({"params": _shift(params, 11, delta)}, *vision, method=OmniModel.vision_tokens)[0]
    np.testing.assert_allclose(np.asarray(untouched), tokens, atol=1e-6)
    with pytest.raises(ValueError, match="one name per region class: 6 names"):
        init(regions.RegionTags(CLASSES, NAMES[:-1]))


def _shift(params, row, delta):
    table = np.array(params["llm"]["embedding"])
    table[row] += delta
    return dict(params, llm=dict(params["llm"], embedding=table))


class _Tokenizer:
    def encode(self, text):
        return [len(word) for word in text.split()]


def test_the_plug_in_is_registered_and_read_from_its_config_section():
    from configs import tiny
    from m2omni_jax.run_config import RunConfig
    config = tiny.get_config()
    config.model.connector.extras = regions.EXTRAS_NAME
    config.shapes_world = ml_collections.ConfigDict(dict(region_words=True))
    extras = omni_lib.make_connector_extras(RunConfig.of(config), _Tokenizer())
    assert isinstance(extras, regions.RegionTags) and extras.classes == regions.REGION_CLASSES
    assert extras.word_ids[:2] == ((), (len(regions.REGION_ATTRIBUTES[0][1][0]),))  # background, the first shape
    assert len(extras.word_ids) == sum(regions.REGION_CLASSES)
    config.shapes_world.region_words = False
    assert omni_lib.make_connector_extras(RunConfig.of(config), _Tokenizer()).word_ids == ()
    config.shapes_world.region_wrods = True
    with pytest.raises(ValueError, match=r"config.shapes_world has unknown fields \['region_wrods'\]"):
        omni_lib.make_connector_extras(RunConfig.of(config), _Tokenizer())


def test_the_tower_writes_its_region_head_where_the_omni_model_reads_it():
    tower = pt.TowerClassifier(CONFIG.vision, vocab_size=7, images_per_row=2, objective="regions")
    batch = make_batch()
    inputs = [batch["vision_patches"], batch["vision_segment_ids"], batch["vision_hw"]]
    tower_params = jax.eval_shape(lambda: nn.unbox(tower.init(jax.random.key(0), *inputs)["params"]))
    _, omni_params, _ = init(regions.RegionTags(regions.REGION_CLASSES))
    assert set(tower_params) == {"vision", regions.MODULE_NAME}
    shape = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    assert shape(tower_params[regions.MODULE_NAME]) == shape(omni_params[regions.MODULE_NAME])

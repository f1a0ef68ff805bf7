"""Region tags for the shapes world [ours]: the vision connector's "shapes_world_regions" plug-in.

The tower pre-training's "regions" objective (`tower.py`) teaches a head on the
tower to name, for every merged token, the shape, colour, size and grid position
of the object it covers (class 0: background), a softmax per attribute. In the
omni model that head runs again, as `OmniModel.connector_extras`
(`models/omni.py: ConnectorExtras`):

- its per-attribute softmax ("tags") is concatenated to the merged tokens before
  the linear connector, as detector object tags are fed with region features
  (Oscar, VinVL);
- with `config.shapes_world.region_words`, each token also gains the LLM's own
  embeddings of its tagged class names ("circle", "red", "small", "top left"),
  weighted by the tags, after the L2 norm: a question's words and the image
  tokens then share vectors, so finding "the circle" is matching a word.

Chosen with `model.connector.extras = "shapes_world_regions"`. The head's
parameters are `connector_extras/region_head/...` in both the tower checkpoint
and the omni model, so the omni run loads and freezes them with the tower
(`init_from_include` / `opt.frozen`: `^vision/`, `^connector_extras/`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.models.layers import LayerNorm, kernel_init, zeros_init
from m2omni_jax.models.omni import ConnectorExtras, OmniConfig, register_connector_extras

EXTRAS_NAME = "shapes_world_regions"  # model.connector.extras
MODULE_NAME = "connector_extras"  # the plug-in's parameter scope, in the omni model and the tower
PARAMS = r"^connector_extras/"  # init_from_include / opt.frozen regex of the region head

# Each merged token's object (0: background), as indices into these. The position is the
# object's grid cell ("top left"), not the token's: a token at a big object's edge still says
# where its object is, as the caption's "at the top left" does.
REGION_ATTRIBUTES = (("shape", sw.SHAPES), ("color", tuple(sw.COLORS)), ("size", sw.SIZES),
                     ("position", sw.POSITIONS))
REGION_CLASSES = tuple(1 + len(values) for _, values in REGION_ATTRIBUTES)  # + background


@dataclasses.dataclass(frozen=True)
class RegionSettings:
    """`config.shapes_world`: the plug-in's settings."""
    region_words: bool = False  # + the tags as the LLM's embeddings of the class names


def region_word_ids(tokenizer) -> tuple[tuple[int, ...], ...]:
    """Per region class (REGION_CLASSES order), the token ids of its name ("circle", "top
    left"); () for background."""
    return tuple(ids for _, values in REGION_ATTRIBUTES
                 for ids in [()] + [tuple(tokenizer.encode(str(value))) for value in values])


def split_region_logits(logits, classes=REGION_CLASSES):
    """(..., sum(classes)) -> one (..., n) array per attribute of `classes` (n per attribute)."""
    ends = np.cumsum(classes)
    return [logits[..., end - size:end] for size, end in zip(classes, ends)]


def region_tags(logits, classes=REGION_CLASSES):
    """Per-attribute softmax of the head's logits, concatenated (..., sum(classes)): each
    token's predicted object labels, one distribution per attribute."""
    return jnp.concatenate([jax.nn.softmax(part.astype(jnp.float32), axis=-1)
                            for part in split_region_logits(logits, classes)], axis=-1)


class RegionHead(nn.Module):
    """LayerNorm, then one logit per merged token for each class of each attribute, concatenated."""
    num_classes: int

    @nn.compact
    def __call__(self, features):
        features = LayerNorm(name="norm")(features)
        # The class axis is small: replicated (no rule in the sharding table).
        return nn.Dense(self.num_classes, kernel_init=kernel_init(("embed", None)),
                        bias_init=zeros_init((None,)), name="classifier")(features)


class RegionTags(ConnectorExtras):
    """The plug-in: the region head's tags as connector input, and optionally as words.

    `word_ids`: per class (`classes` order, background included) the token ids of its
    name, () for none; empty: no words.
    """
    classes: tuple[int, ...] = REGION_CLASSES
    word_ids: tuple[tuple[int, ...], ...] = ()

    def setup(self):
        if min(self.classes) < 2:
            raise ValueError(f"region classes {self.classes}: every attribute needs at least 2 (background + 1)")
        if self.word_ids and len(self.word_ids) != sum(self.classes):
            raise ValueError(f"shapes_world.region_words needs one name per region class: "
                             f"{len(self.word_ids)} names for classes {self.classes}")
        self.region_head = RegionHead(sum(self.classes))

    def logits(self, features):
        """(B, M, out_width) merged tokens -> (B, M, sum(classes)) head logits."""
        return self.region_head(features)

    def __call__(self, features, merged_segment_ids, vision_hw, embedding):
        tags = region_tags(self.logits(features), self.classes)
        tags = jnp.where(merged_segment_ids[..., None] > 0, tags, 0)  # padding: no tags
        return tags, (self.word_embeddings(tags, embedding) if self.word_ids else None)

    def word_embeddings(self, tags, embedding):
        """tags (B, M, classes) -> (B, M, width): the tag-weighted mean embedding of each
        class's name; background adds nothing."""
        longest = max(len(ids) for ids in self.word_ids)
        ids = np.array([list(ids) + [0] * (longest - len(ids)) for ids in self.word_ids], np.int32)
        weights = np.array([[1.0 / max(len(ids), 1)] * len(ids) + [0.0] * (longest - len(ids))
                            for ids in self.word_ids], np.float32)
        per_class = jnp.einsum("cn,cnw->cw", weights, jnp.take(embedding, ids, axis=0))
        return jnp.einsum("bmc,cw->bmw", tags.astype(per_class.dtype), per_class)

    def input_width(self) -> int:
        return sum(self.classes)

    def training_flops_per_merged_token(self, config: OmniConfig) -> float:
        classes = sum(self.classes)
        words = classes * config.llm.width if self.word_ids else 0
        return 6.0 * (config.vision.out_width * classes + words)


def regions_from_config(config, tokenizer) -> RegionTags:
    """The plug-in of `model.connector.extras="shapes_world_regions"`, set by `config.shapes_world`."""
    settings = dataclass_from_config(RegionSettings, config.sections.get("shapes_world", {}),
                                     "shapes_world")
    return RegionTags(REGION_CLASSES, region_word_ids(tokenizer) if settings.region_words else ())


register_connector_extras(EXTRAS_NAME, regions_from_config)

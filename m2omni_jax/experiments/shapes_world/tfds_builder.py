"""TFDS builder `shapes_world`: ArrayRecord files, prepared and read without TensorFlow.

Features are `tfds.features.Tensor` only (`tfds.features.Image` would need
TensorFlow to encode): `record` holds `shapes_world.encode_record` bytes
(msgpack, media as PNG); `index`, `task` and `modality` allow filtering
without decoding. Examples keep generation order (shuffling disabled), so
example `i` of a split is `make_record(seed, split, i, tasks)`.

  import m2omni_jax.experiments.shapes_world.tfds_builder  # registers `shapes_world`
  prepare(data_dir, config="tiny")          # or tfds.builder(...).download_and_prepare()
  ds = tfds.data_source("shapes_world/tiny", data_dir=data_dir)
  record = shapes_world.decode_record(ds["train"][0]["record"])
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from m2omni_jax.experiments.shapes_world import world as sw


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    seed: int = 0
    num_train: int = 20_000
    num_eval: int = 1_000
    tasks: tuple[str, ...] = sw.TASKS


def make_config(*, seed: int, num_train: int, num_eval: int,
                tasks: Sequence[str] = sw.TASKS) -> ShapesWorldConfig:
    """A config whose name encodes its contents, so that different contents
    never share a TFDS directory."""
    name = f"seed{seed}_train{num_train}_eval{num_eval}"
    if tuple(tasks) != sw.TASKS:
        name += "_tasks" + hashlib.sha1(",".join(tasks).encode()).hexdigest()[:8]
    return ShapesWorldConfig(name=name, seed=seed, num_train=num_train, num_eval=num_eval,
                             tasks=tuple(tasks))


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Generated coloured-shapes scenes: captions, VQA, OCR, video, interleaved, generation."""

    VERSION = tfds.core.Version(sw.DATA_VERSION)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesWorldConfig(name="default", description="20k train / 1k eval samples."),
        ShapesWorldConfig(name="tiny", num_train=256, num_eval=64,
                          description="256 train / 64 eval samples, for smoke tests."),
    ]
    DEFAULT_CONFIG_NAME = "default"

    # TFDS 4.9.10's own `code_path` needs the `importlib_resources` backport,
    # which it only declares for Python < 3.9 (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # TFDS defaults to TFRecord, whose writer needs TensorFlow.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        scalar_bytes = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "record": scalar_bytes, "task": scalar_bytes, "modality": scalar_bytes,
                "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {"train": self._generate_examples("train", config.num_train),
                "eval": self._generate_examples("eval", config.num_eval)}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        for index in range(num_examples):
            record = sw.make_record(config.seed, split, index, config.tasks)
            yield index, {"record": sw.encode_record(record), "task": record["task"],
                          "modality": record["modality"], "index": index}


def prepare(data_dir: str, *, config: str | ShapesWorldConfig = "default") -> ShapesWorld:
    """Generates the data set under `data_dir` (a no-op when already there)."""
    builder = ShapesWorld(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder

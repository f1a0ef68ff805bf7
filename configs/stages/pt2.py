"""PT2 image–text knowledge: high-quality image–text and OCR with 15% pure text; all trained.

    m2omni-train --config=configs/stages/pt2.py:tiny --workdir=/tmp/m2omni_stages/pt2

Starts from PT1's parameters (config.init_from = ../pt1).
"""
from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "pt2", previous="pt1")
    common.mixture(config, image=0.85, text=0.15)
    config.data.sources.shapes_world.tasks = ("caption", "ocr", "vqa_color", "vqa_shape")
    return config

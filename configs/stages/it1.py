"""IT1 instruction tuning: image understanding + dialogue, ~30% text; all trained.

    m2omni-train --config=configs/stages/it1.py:tiny --workdir=/tmp/m2omni_stages/it1
"""
from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "it1", previous="pt3")
    common.mixture(config, image=0.7, text=0.3)
    config.data.sources.shapes_world.tasks = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr")
    return config

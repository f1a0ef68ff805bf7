"""IT2 instruction tuning: + video and interleaved conversations, ~25% text.

    m2omni-train --config=configs/stages/it2.py:tiny --workdir=/tmp/m2omni_stages/it2
"""
from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "it2", previous="it1")
    common.mixture(config, image=0.45, video=0.15, interleaved=0.15, text=0.25)
    config.data.sources.shapes_world.tasks = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr",
                                      "video_motion", "interleaved")
    return config

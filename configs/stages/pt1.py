"""PT1 encoder alignment: image–text pairs and OCR; encoders + projectors trained, LLM frozen.

    m2omni-train --config=configs/stages/pt1.py:tiny --workdir=/tmp/m2omni_stages/pt1

[paper] image–text, OCR, audio–text pairs packed into sequences; the frozen
LLM is our reading where the paper is silent (DESIGN §2).
"""
from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "pt1", previous=None)
    common.mixture(config, image=0.7, audio=0.3)  # image–text, OCR, audio–text (ASR)
    config.data.sources.shapes_world.tasks = ("caption", "ocr")
    config.data.sources.shapes_world.speech.tasks = ("asr",)
    # [paper] several image–text pairs in one sequence, attending to each other (benchmarks/pair_packing.py).
    config.data.pack_pairs = ("image",)
    config.opt.frozen = common.FREEZE_LLM
    return config

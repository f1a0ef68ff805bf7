"""IT3 instruction tuning with dynamic adaptive balance, ~25% text; `+draw`: with image generation.

    m2omni-train --config=configs/stages/it3.py:tiny --workdir=/tmp/m2omni_stages/it3
    m2omni-train --config=configs/stages/it3.py:tiny+draw --workdir=/tmp/m2omni_stages/it3

Every `balance.dynamic.interval_steps` steps a validation pass per modality
updates the modality loss weights from the slopes of their recent
normalised validation losses [paper]; the weights are checkpointed and
logged to TensorBoard (balance/weight/<modality>).

`+draw` adds image generation as the paper's IT3 does: the image head (models/image_head.py,
query route; new parameters start random when the IT2 checkpoint has none) and the shapes
world's drawing requests (modality "image_gen"); the head's flow-matching loss is balanced
as modality "image_out" beside the others.
"""
from configs.stages import common


def get_config(size="tiny"):
    size, _, extra = size.partition("+")
    if extra not in ("", "draw"):
        raise ValueError(f"stage config argument must be <size> or <size>+draw, got {size}+{extra}")
    config = common.sized_config(size, "it3", previous="it2")
    common.mixture(config, image=0.35, video=0.1, interleaved=0.1, audio=0.2, text=0.25)
    config.data.sources.shapes_world.tasks = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr",
                                      "video_motion", "interleaved")
    config.balance.strategy = "dynamic"
    config.data.sources.shapes_world.speech.tasks = ("asr", "spoken_vqa", "spoken_scene_qa", "spoken_caption_qa")  # + audio QA
    config.balance.modalities = ("text", "image", "video", "interleaved", "audio")
    config.balance.dynamic.interval_steps = 10 if size == "tiny" else 500
    if extra == "draw":
        config.model.image_head.enabled = True
        config.data.sources.shapes_world.tasks += ("gen_image",)
        common.mixture(config, image=0.3, video=0.1, interleaved=0.1, audio=0.15, text=0.25, image_gen=0.1)
        config.balance.modalities += ("image_gen", "image_out")
    return config

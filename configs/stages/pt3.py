"""PT3 joint pre-training: + video and interleaved documents, with step balance.

    m2omni-calibrate --config=configs/stages/pt3.py:tiny --workdir=/tmp/m2omni_stages/calib
    m2omni-train --config=configs/stages/pt3.py:tiny --workdir=/tmp/m2omni_stages/pt3 \
        --config.balance.step.calibration_file=/tmp/m2omni_stages/calib/converged_losses.json

Every optimizer step runs one single-modality micro-batch per modality and
combines their gradients with wᵢ = α·(1/Lᵢ*)/Σⱼ(1/Lⱼ*), α = 10 [paper].
The calibration file is required; `--config.balance.step.equal_weights=True`
instead runs with equal weights (α/M each).
"""
from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "pt3", previous="pt2")
    common.mixture(config, text=0.25, image=0.3, video=0.15, interleaved=0.15, audio=0.15)
    config.data.sources.shapes_world.tasks = ("caption", "ocr", "vqa_color", "vqa_shape", "video_motion", "interleaved")
    config.balance.strategy = "step"
    config.data.sources.shapes_world.speech.tasks = ("asr", "spoken_caption_qa")
    config.balance.modalities = ("text", "image", "video", "interleaved", "audio")
    return config

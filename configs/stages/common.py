"""Shared by the stage configs: the model size each stage runs at.

A stage config is run as `--config=configs/stages/<stage>.py:<size>`, size one
of `tiny` (CPU), `9b` (TPU v5p-64) or `72b` (TPU v5p-512).
"""
from configs import m2omni_9b, m2omni_72b, tiny
from m2omni_jax.experiments.shapes_world import source as shapes_world_source

SIZES = {"tiny": tiny.get_config, "9b": m2omni_9b.get_config, "72b": m2omni_72b.get_config}
# Steps per stage by size (the tiny pipeline runs end to end on a CPU in well under an hour).
STEPS = {"tiny": 150, "9b": 20_000, "72b": 20_000}

FREEZE_LLM = (r"^llm/",)

# The paper's towers at 9B/72B [paper]: Qwen2-VL's 675M NaViT (models/vision.py:
# VisionConfig.qwen2vl_675m) and Paraformer-large's SAN-M (models/audio.py:
# AudioConfig.paraformer, 256 tokens); unit-norm tokens (output_scale 1) for a pretrained LLM.
LARGE_VISION = dict(width=1280, depth=32, num_heads=16, mlp_ratio=4.0, out_width=3584, dtype="bfloat16",
                    param_dtype="float32", remat_policy="full", scan=True)
LARGE_AUDIO = dict(enabled=True, output_scale=1.0, width=512, depth=50, num_heads=4, mlp_dim=2048,
                   num_audio_tokens=256, dtype="bfloat16", param_dtype="float32", remat_policy="full")
# Up to 1,024 tokens per image (Qwen2-VL's range, capped); 4 such images per 4,096-token row.
LARGE_PIXELS = dict(image_min_pixels=4 * 28 * 28, image_max_pixels=1024 * 28 * 28,
                    video_min_pixels=4 * 28 * 28, video_max_pixels=256 * 28 * 28, patches_per_row=16_384,
                    video_fps=2.0, video_min_frames=4, video_max_frames=120)  # the paper's 2 fps, 4-120 frames


def sized_config(size: str, stage: str, previous: str | None):
    if size not in SIZES:
        raise ValueError(f"stage config argument must be one of {sorted(SIZES)}, got {size!r} "
                         f"(run as --config=configs/stages/{stage}.py:tiny)")
    config = SIZES[size]()
    # Every size reads the built-in shapes world (tiny.py adds it; the large configs do not).
    if "shapes_world" not in config.data.sources:
        config.data.sources.shapes_world = shapes_world_source.default_config()
    config.model.kind = "omni"
    if size != "tiny":
        config.model.vision.update(LARGE_VISION)
        config.model.audio.update(LARGE_AUDIO)
        config.data.vision.update(LARGE_PIXELS)
    config.stage = stage
    config.train.steps = STEPS[size]
    config.checkpoint.every = max(config.train.steps // 2, 1)
    # The previous stage's workdir, relative to this stage's workdir (…/pt1 next to …/pt2).
    config.init_from = f"../{previous}" if previous else ""
    return config


def mixture(config, **modality_weights):
    """A custom mixture over modalities (weights are normalised by the pipeline)."""
    config.data.mixture = "custom"
    config.data.modality_weights = dict(modality_weights)
    return config

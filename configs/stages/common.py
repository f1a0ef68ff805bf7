"""Shared by the stage configs: the model size each stage runs at.

A stage config is run as `--config=configs/stages/<stage>.py:<size>`, size one
of `tiny` (CPU), `9b` (TPU v5p-64) or `72b` (TPU v5p-512).
"""
from configs import m2omni_9b, m2omni_72b, tiny

SIZES = {"tiny": tiny.get_config, "9b": m2omni_9b.get_config, "72b": m2omni_72b.get_config}
# Steps per stage by size (the tiny pipeline runs end to end on a CPU in well under an hour).
STEPS = {"tiny": 150, "9b": 20_000, "72b": 20_000}

FREEZE_LLM = (r"^llm/",)


def sized_config(size: str, stage: str, previous: str | None):
    if size not in SIZES:
        raise ValueError(f"stage config argument must be one of {sorted(SIZES)}, got {size!r} "
                         f"(run as --config=configs/stages/{stage}.py:tiny)")
    config = SIZES[size]()
    config.model.kind = "omni"
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

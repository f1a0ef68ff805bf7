"""Modality tags carried per token in every batch.

Losses are reported per modality and balance strategies weight them; the tag
of a token is the modality of the sample it belongs to. The tuple's order is
the index used in batches (`batch["modality"]`) and in loss-weight vectors.

"image_gen" tags the tokens of a drawing request (its text and, on the caption route, the
description the LLM writes); "image_out" is no token's tag: it is the image head's
flow-matching loss (models/omni.py), weighted and balanced like a modality of its own.
"""
MODALITIES = ("text", "image", "video", "audio", "interleaved", "image_gen", "speech_gen", "image_out")
NUM_MODALITIES = len(MODALITIES)
MODALITY_ID = {name: i for i, name in enumerate(MODALITIES)}


def modality_id(name: str) -> int:
    if name not in MODALITY_ID:
        raise ValueError(f"unknown modality {name!r}; known modalities are {MODALITIES}")
    return MODALITY_ID[name]

"""Alignment: DPO(chosen, rejected) + 0.3·instruction loss with LoRA on the LLM (~5% of its weights).

    m2omni-align --config=configs/stages/alignment.py:tiny --workdir=/tmp/m2omni_stages/align

Starts from IT3's omni parameters (config.init_from = ../it3: LLM, vision
tower, connector, all frozen); preference pairs (the correct answer about an
image chosen over a wrong one of the same type, the image in both) and
instruction samples 1:1 [paper].
"""
import ml_collections

from configs.stages import common


def get_config(size="tiny"):
    config = common.sized_config(size, "alignment", previous="it3")
    # One sample per row: one image of ≤ data.vision.image_max_pixels (115², i.e. ≤ 8x8 patches).
    config.data.vision.patches_per_row = 64
    if size == "tiny":
        config.data.seq_len = 128  # the longest shapes-world chat with its image block is ~80 tokens
    config.alignment = ml_collections.ConfigDict(dict(
        beta=0.1,  # DPO temperature
        instruction_weight=0.3,  # [paper]
        batch_size=8 if size == "tiny" else 128,  # pairs (and as many instruction samples) per step
        lora_rank=0,  # 0: the rank that gives lora_target_fraction of the LLM's parameters
        lora_alpha=0.0,  # 0: 2·rank
        lora_dropout=0.05,
        lora_target_fraction=0.05,
    ))
    config.opt.peak_lr = 1e-3 if size == "tiny" else 5e-5
    config.opt.warmup_steps = 10 if size == "tiny" else 100
    config.opt.weight_decay = 0.0
    return config

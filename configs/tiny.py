"""Tiny omni model on the built-in shapes-world data: runs in minutes on 2 CPU cores.

    m2omni-train --config=configs/tiny.py --workdir=/tmp/m2omni_tiny

Rerun with more steps to resume from the last checkpoint:

    m2omni-train --config=configs/tiny.py --config.train.steps=400 --workdir=/tmp/m2omni_tiny
"""
from configs import base


def get_config():
    config = base.get_config()
    config.model.llm.update(dict(
        vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=704, mrope_sections=(8, 12, 12)))
    config.tokenizer.vocab_size = 1024
    config.data.seq_len = 256
    config.train.steps = 200
    config.train.batch_size = 16
    config.checkpoint.every = 100
    return config

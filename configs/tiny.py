"""Tiny omni model (text + image + video + audio) on the built-in shapes world, from random weights.

    m2omni-train --config=configs/tiny.py --workdir=/tmp/m2omni_tiny && m2omni-eval --config=configs/tiny.py --workdir=/tmp/m2omni_tiny

200 steps in minutes on 2 CPU cores (a smoke run); with more steps and speech, ASR word error
rate 10.1% after 600 steps in 26 min (docs/experiments.md, with its other runs).
"""
from configs import base
from m2omni_jax.experiments.shapes_world import source as shapes_world_source


def get_config():
    config = base.get_config()
    config.model.kind = "omni"
    config.model.llm.update(dict(
        vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=704, mrope_sections=(8, 12, 12)))
    # From scratch: blocks start as the identity and the LayerNorms leave near-empty
    # (background) patches near zero; see VisionConfig in models/vision.py.
    config.model.vision.update(dict(width=64, depth=2, num_heads=4, out_width=128,
                                    zero_init_residual=True, layer_norm_epsilon=1.0))
    config.model.connector.update(dict(
        output_scale=16.0,  # √width: image tokens as loud as the N(0, 1) word embeddings
        position_frequencies=4))  # where a token sits in its image ("top left"), see models/omni.py
    # A tiny SAN-M; 48 tokens (8.6 s) hold every built-in clip (the longest is 8.1 s).
    config.model.audio.update(dict(enabled=True, width=128, depth=3, num_heads=4, mlp_dim=256, num_audio_tokens=48,
                                   output_scale=16.0))  # √width: as loud as the image tokens
    config.tokenizer.vocab_size = 1024

    config.data.seq_len = 256
    config.data.vision.pixel_norm = "clip_centered"  # without it a random ViT's tokens all look alike
    # The built-in shapes world (its fields: experiments/shapes_world/source.py), beside base's text corpus.
    config.data.sources.shapes_world = shapes_world_source.default_config()
    config.data.sources.shapes_world.update(dict(num_train=10_000, num_eval=500))
    config.data.mixture = "custom"
    config.data.modality_weights.update(dict(text=0.15, image=0.6, video=0.15, interleaved=0.1))
    config.data.modality_weights.audio = 0.15  # ASR, spoken VQA, spoken scene / caption QA
    # eSpeak NG: about 1.5 minutes on 2 CPU cores, once.
    config.data.sources.shapes_world.speech.update(dict(num_train=3_000, num_eval=200))
    # Captions name every object's colour, shape and position: the densest visual signal.
    config.data.sources.shapes_world.task_weights.update(dict(caption=4.0, vqa_color=2.0, vqa_shape=2.0))

    config.train.steps = 200  # minutes
    config.train.batch_size = 16
    config.opt.warmup_steps = 50
    config.checkpoint.every = 200
    return config

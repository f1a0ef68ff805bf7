"""Tiny omni model (text + image + video + audio) on the built-in shapes world: minutes on 2 CPU cores.

    m2omni-train --config=configs/tiny.py --workdir=/tmp/m2omni_tiny       # 200 steps, minutes
    m2omni-eval --config=configs/tiny.py --workdir=/tmp/m2omni_tiny

The held-out VQA run (`:vqa`: no audio tower, 75% image tasks, 128-token rows, a 60,000-record
world, interleaved M-RoPE, every image squashed to 84x84 = 3x3 tokens; the vision tower
pre-trained first for 800 steps of 224 images by m2omni-pretrain-tower, each token naming its
object's shape, colour, size and position, then frozen through 1300 omni steps; held-out
answers every 500 steps):

    bash launch/tiny_vqa.sh /tmp/m2omni_vqa      # = the three commands below, timed
    m2omni-pretrain-tower --config=configs/tiny.py:vqa --workdir=/tmp/m2omni_vqa/tower
    m2omni-train --config=configs/tiny.py:vqa --workdir=/tmp/m2omni_vqa/main   # init_from ../tower
    m2omni-eval --config=configs/tiny.py:vqa --workdir=/tmp/m2omni_vqa/main

Held-out figures (500 records, 72 questions per colour/shape type, so about +-5 points; greedy),
session 13, each a single run:
  this config: colour 91.7%, shape 86.1%, count 66.2%, position 79.6%; caption attribute 97.2%,
    video motion 13.1%. Training: tower 551 s + omni 941 s = 24.9 minutes on 2 quiet cores.
    By objects in the scene: colour 100/85/88%, shape 100/88/73% (one/two/three).
  tower 300 steps + omni 1900 (--config.tower_pretrain.steps=300 --config.train.steps=1900;
    26.4 minutes): colour 93.1%, shape 80.6% (shape by colour 100%, by position 69%),
    caption 98.6%; + connector region tags (see README): colour 88.9%, shape 81.9%
    (by position 73%), position 92.6% (79.6% without); 300 + 1900 steps with
    --config.data.loss_averaging=sample: colour 91.7%, shape 73.6%, caption 81.2%. This config
    with --config.data.task_weights.vqa_shape=4.0: colour 79.2%, shape 87.5% (by position 80%).
  With smart_resize sizes (56x56 to 112x112, 2x2 to 4x4 tokens, a token mixing objects),
    session 11's config: colour 86.1%, shape 76.4%, caption 84.7%; with --config.seed=1
    58.3%, 75.0%: a ~30-point spread between seeds. Session 12 (84x84-minimum smart_resize):
    + data.loss_averaging="square" 81.9%, 81.9%; + region tags 70.8%, 79.2%; + vqa_dialog
    63.9%, 69.4%; + question_first 65.3%, 66.7%.
The tower names every object's shape and colour on fresh scenes. What is left is finding the
object a question names by its position: "What is the shape at the top left?" is 69-80%
right where "What shape is the red object?" is 96-100%; its wrong answers are another object's
shape. Shape's 90% target is not met yet; colour's is.

The speech run (ASR word error rate 10.1% after 600 steps, 26 minutes on 2 shared CPU
cores; 1.3% after 1000; spoken VQA 37%):

    m2omni-train --config=configs/tiny.py --workdir=/tmp/m2omni_tiny_asr --config.train.steps=1000 \
        --config.data.modality_weights.audio=0.6 --config.data.speech.num_train=8000 \
        "--config.data.speech.tasks=('asr','spoken_vqa')"
    m2omni-eval --config=configs/tiny.py --workdir=/tmp/m2omni_tiny_asr (the same overrides) \
        --config.eval.num_speech_samples=200

Rerun with more steps to resume from the last checkpoint:

    m2omni-train --config=configs/tiny.py --config.train.steps=400 --workdir=/tmp/m2omni_tiny

Text only (the LLM alone on the text corpus): --config.model.kind=llm
Without the audio tower: --config.model.audio.enabled=False --config.data.modality_weights.audio=0

The towers start from random weights, so two choices differ from the paper's
(whose ViT and LLM are pretrained); see the comments where they are set.
"""
from configs import base


def get_config(variant: str = ""):
    """variant "": text + image + video + audio; "vqa": the held-out VQA run (see above)."""
    if variant not in VARIANTS:
        raise ValueError(f"configs/tiny.py:{variant}: unknown variant; use one of {VARIANTS}")
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
        position_frequencies=4,  # where a token sits in its image ("top left"), see models/omni.py
        position_placement="output"))  # after the L2 norm, from 0: background tokens start empty
    # A tiny SAN-M; 48 tokens (8.6 s) hold every built-in clip (the longest is 8.1 s).
    config.model.audio.update(dict(enabled=True, width=128, depth=3, num_heads=4, mlp_dim=256, num_audio_tokens=48,
                                   output_scale=16.0))  # √width: as loud as the image tokens
    config.tokenizer.vocab_size = 1024

    config.data.seq_len = 256
    config.data.vision.pixel_norm = "clip_centered"  # without it a random ViT's tokens all look alike
    config.data.shapes_world.num_train = 10_000
    config.data.shapes_world.num_eval = 500
    config.data.mixture = "custom"
    config.data.modality_weights.update(dict(text=0.15, image=0.6, video=0.15, interleaved=0.1))
    config.data.modality_weights.audio = 0.15  # ASR, spoken VQA, spoken scene / caption QA
    config.data.speech.num_train = 3_000  # eSpeak NG: about 1.5 minutes on 2 CPU cores, once
    config.data.speech.num_eval = 200
    # Captions name every object's colour, shape and position: the densest visual signal.
    config.data.task_weights.update(dict(caption=4.0, vqa_color=2.0, vqa_shape=2.0))

    config.train.steps = 200  # minutes; the VQA figures need --config.train.steps=1200 (see above)
    config.train.batch_size = 16
    config.opt.warmup_steps = 50
    config.checkpoint.every = 200
    if variant == "vqa":
        config.model.audio.enabled = False
        # Captions keep their weight: moving it to the colour/shape questions (caption 2,
        # colour 3, shape 4, image 0.85) made both worse (colour 55.6%, shape 19.4%).
        config.data.modality_weights.update(dict(text=0.1, image=0.75, video=0.1, interleaved=0.05, audio=0.0))
        config.data.seq_len = 128  # ~3 images per row: half the step time of 256
        # Every image squashed to 84x84: 3x3 merged tokens, one per cell of the world's 3x3
        # grid, so each token holds one object (or none) and "at the top left" is one token.
        # With smart_resize (56x56 to 112x112, 2x2 to 4x4 tokens) a token mixes objects or
        # cuts one: held-out colour 86.1%, shape 76.4% (this: 91.7%, 86.1%, same steps).
        config.data.vision.image_side = 84
        config.data.vision.patches_per_row = 144  # 4 images of 36 patches
        # + where each patch sits in its image: 2-D RoPE alone is relative (models/vision.py).
        config.model.vision.fractional_position_frequencies = 4
        # 8,500 records per task instead of 1,400: the tower sees each image about once.
        config.data.shapes_world.num_train = 60_000
        # "top left" from rotary angles that turn within a 4x4 grid (colour 59.7% vs 43.1% at 500 steps).
        config.model.llm.mrope_layout = "interleaved"
        # The tower pre-trained first (m2omni-pretrain-tower), a stand-in for the paper's
        # pretrained ViT; this run loads it from ../tower. Each of its merged tokens learns to
        # name the shape, colour, size and position of the object it covers ("regions"): on
        # fresh scenes it names every object's shape and colour (100% with one, two or three
        # objects; at smart_resize sizes 86%, the caption objective 76% of lone objects).
        config.tower_pretrain.update(dict(steps=800, batch_size=32, images_per_row=7, patches_per_row=256,
                                          objective="regions", eval_batches=2))
        config.init_from = "../tower"
        config.init_from_include = (r"^vision/",)
        # The loaded tower stays frozen: trained on, the random LLM's early gradients wash out
        # what it learned (at the full rate the omni model's one-object shape accuracy fell
        # from 38% at step 500 to 33% at 1300). With 900 tower steps: shape 43.1% frozen, 37.5% at a tenth
        # of the learning rate (opt.param_groups / lr_multipliers); caption attributes 64.1% vs 42.1%.
        config.opt.frozen = (r"^vision/",)
        config.train.steps = 1300
        config.checkpoint.every = 500
        # m2omni-eval answers the whole 2,000-record held-out split (286 questions per colour /
        # shape type: +-2 points where 500 records gave +-5); training answers its first 500
        # at 500, 1000 and 1300 steps (eval/* in metrics.jsonl).
        config.data.shapes_world.num_eval = 2000
        config.eval.num_samples = 2000
        config.eval.every = 500
        config.eval.periodic_num_samples = 500
    return config


VARIANTS = ("", "vqa")

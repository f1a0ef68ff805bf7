"""Drawing on the shapes world: the tiny omni model with the flow-matching image head, from scratch.

    m2omni-train --config=configs/experiments/shapes_world_gen_image.py:query --workdir=/tmp/m2omni_draw_query \
        && m2omni-eval --config=configs/experiments/shapes_world_gen_image.py:query --workdir=/tmp/m2omni_draw_query

`:query` (N <gen_imagePatch> queries condition the DiT) or `:caption` (the paper's route: the LLM
writes the description inside <gen_image> … </gen_image> and its hidden states condition the DiT).
Not yet at the target (≥ 80% each): query route, 200 held-out requests, 2 busy CPU cores —
velocity prediction, 1200 steps (this config; 23.5 min): position 60.2%, colour 12.6%, shape 12.3%;
clean-image prediction, stopped at step 755 (23.6 min): position 24.9%, colour 6.2%, shape 3.6%.
The samples are noise speckles where the shapes should be; from t ≥ 0.6 of a true path the model
does render the requested shapes (under-trained early denoising). The caption route is not measured.
"""
from configs import tiny

ROUTES = ("query", "caption")


def get_config(route="query"):
    if route not in ROUTES:
        raise ValueError(f"config argument must be one of {ROUTES}, got {route!r} "
                         "(run as --config=configs/experiments/shapes_world_gen_image.py:query)")
    config = tiny.get_config()
    config.model.audio.enabled = False
    config.model.image_head.update(dict(
        enabled=True, route=route, num_queries=8, max_cond_tokens=48, images_per_row=2,
        image_size=32, patch_size=4, width=128, depth=4, num_heads=4, cond_width=128,
        cond_dropout=0.1, time_sampling="uniform", sample_steps=20, sampler="euler",
        prediction="velocity"))
    world = config.data.sources.shapes_world
    world.tasks = ("gen_image",)
    world.update(dict(num_train=20_000, num_eval=400))
    config.data.mixture = "custom"
    config.data.modality_weights = dict(text=0.0, image=0.0, video=0.0, interleaved=0.0, audio=0.0, image_gen=1.0)
    config.data.seq_len = 128  # two drawing requests per row
    config.data.vision.patches_per_row = 4  # no image is read: the (idle) vision tower's pack kept minimal
    if route == "caption":  # the description too: ~80 tokens a drawing
        config.data.seq_len = 160
    config.train.steps = 1200
    config.train.batch_size = 16
    config.opt.peak_lr = 1e-3
    config.opt.warmup_steps = 100
    config.checkpoint.every = 500
    config.eval.num_samples = 200  # held-out drawing requests (and captions) answered by m2omni-eval
    config.eval.max_new_tokens = 40
    return config

"""Drawing on the shapes world: the tiny omni model with the flow-matching image head, from scratch.

    m2omni-train --config=configs/experiments/shapes_world_gen_image.py:caption --workdir=/tmp/m2omni_draw \
        && m2omni-eval --config=configs/experiments/shapes_world_gen_image.py:caption --workdir=/tmp/m2omni_draw

`:caption` (the default, the paper's route: the LLM writes the description inside <gen_image> …
</gen_image> and its hidden states condition the DiT) or `:query` (N <gen_imagePatch> queries
condition it). 1200 steps, 200 held-out requests, 2 idle CPU cores, generated images read by the
attribute checker (held-out real renders ≥ 99.8% per attribute):
  caption (session 22): 28.4 min; position 100%, colour 92.9%, shape 35.8%, size 86.3%
    (benchmarks/results/gen_image_caption_route_1200steps_draws4.json, grid PNG beside it);
  query (session 23): 28.1 min; position 39.3%, colour 9.5%, shape 8.8%, size 23.0%
    (benchmarks/results/gen_image_query_route_1200steps_draws4.json, grid PNG beside it).
Shape is short of 80% on every route, and with an oracle condition too (21.8% after 800 steps): at
32×32 with 4×4 patches a small shape is a few pixels across and the samples' speckle erases it.
The query route's queries learn to read the request through the flow loss alone, in an LLM
trained from scratch. The run history: docs/experiments.md, "Drawing (issue 21)".
"""
from configs import tiny

ROUTES = ("query", "caption")


def get_config(route="caption"):
    if route not in ROUTES:
        raise ValueError(f"config argument must be one of {ROUTES}, got {route!r} "
                         "(run as --config=configs/experiments/shapes_world_gen_image.py:caption)")
    config = tiny.get_config()
    config.model.audio.enabled = False
    config.model.image_head.update(dict(
        enabled=True, route=route, num_queries=8, max_cond_tokens=48, images_per_row=2,
        image_size=32, patch_size=4, width=128, depth=4, num_heads=4, cond_width=128,
        cond_dropout=0.1, time_sampling="logit_normal", sample_steps=20, sampler="euler",
        # The renders are ~89% white: per channel mean 0.89, std 0.31 in [-1, 1]. Scaled to
        # unit variance they are decided earlier on the path; guidance 3 at sampling
        # (docs/experiments.md, "Drawing (issue 21)").
        data_shift=0.89, data_scale=0.31, prediction="velocity", guidance_scale=3.0,
        # Four (noise, t) draws per drawing and logit-normal times: the DiT alone on an oracle
        # condition, 400 steps: colour 54.6% -> 85.9%, position 93.0% -> 97.6%, shape 24.0% -> 24.3%
        # (benchmarks/image_head_oracle.py; docs/experiments.md, "Drawing (issue 21)").
        noise_draws=4))
    world = config.data.sources.shapes_world
    world.tasks = ("gen_image",)
    world.update(dict(num_train=20_000, num_eval=400))
    config.data.mixture = "custom"
    config.data.modality_weights = dict(text=0.0, image=0.0, video=0.0, interleaved=0.0, audio=0.0, image_gen=1.0)
    config.data.seq_len = 128  # two drawing requests per row
    config.data.vision.patches_per_row = 4  # no image is read: the (idle) vision tower's pack kept minimal
    if route == "caption":  # the description too: ~80 tokens a drawing
        config.data.seq_len = 160
    config.train.steps = 1200  # 28 min on 2 CPU cores
    config.train.batch_size = 16
    config.opt.peak_lr = 1e-3
    config.opt.warmup_steps = 100
    config.checkpoint.every = 200
    config.eval.num_samples = 200  # held-out drawing requests (and captions) answered by m2omni-eval
    config.eval.max_new_tokens = 40
    return config

"""M2-omni-9B (Llama-3.1-8B LLM, Qwen2-VL's 675M NaViT, Paraformer-large's SAN-M) on a TPU v5p-64 (32 chips).

    python launch/tpu.py train --name=m2omni-9b --zone=us-east5-a --accelerator-type=v5p-64 \\
        --config=configs/m2omni_9b.py --workdir=gs://my-bucket/m2omni_9b
    m2omni-aot --config=configs/m2omni_9b.py --topology=v5p-64     # per-chip HBM, before renting

FSDP over all chips, bf16 compute with fp32 master weights, full rematerialisation, the
LM head chunked (no whole logits), global batch 256 × 4096 tokens (8 rows per chip),
4,096-patch packs: 50.1 of 95.7 GiB per chip, a 48% margin (m2omni-aot;
benchmarks/results/aot_m2omni_9b_v5p-64.json). MM1's 512 rows need ~97 GiB with the
O(length²) attention (see the results file). Add your data sources (`config.data.sources`, README)
and point `tokenizer.path` at a SentencePiece model with the special tokens
(m2omni_jax/data/tokenizer.py); the paper's stages are configs/stages/*.py:9b.

`--config=configs/m2omni_9b.py:llm` is the text-only LLM (no towers, text data only), for
text pre-training or to size the LLM alone with m2omni-aot.
"""
from configs import base

# The paper's towers [paper]: Qwen2-VL's 675M NaViT (models/vision.py: VisionConfig.qwen2vl_675m)
# and Paraformer-large's SAN-M (models/audio.py: AudioConfig.paraformer, 256 tokens per clip).
VISION = dict(width=1280, depth=32, num_heads=16, mlp_ratio=4.0, out_width=3584, dtype="bfloat16",
              param_dtype="float32", remat_policy="full", scan=True)
AUDIO = dict(enabled=True, output_scale=1.0, width=512, depth=50, num_heads=4, mlp_dim=2048,
             num_audio_tokens=256, dtype="bfloat16", param_dtype="float32", remat_policy="full", dropout=0.1)
# Up to 1,024 tokens per image (Qwen2-VL's range, capped); 4,096-patch packs (one such image,
# or several smaller, per row): the ViT's attention over a pack is quadratic in its size, and
# 16,384-patch packs need ~26 GiB per row on a v5p (m2omni-aot: 423 GiB/chip at 16 rows).
PIXELS = dict(image_min_pixels=4 * 28 * 28, image_max_pixels=1024 * 28 * 28,
              video_min_pixels=4 * 28 * 28, video_max_pixels=256 * 28 * 28, patches_per_row=4096)


VARIANTS = ("omni", "llm")


def variant_of(config, variant: str, name: str):
    """`omni` (the model of the paper) or `llm` (its LLM alone, reading text only)."""
    if variant not in VARIANTS:
        raise ValueError(f"config argument must be one of {VARIANTS}, got {variant!r} "
                         f"(run as --config=configs/{name}.py:llm)")
    if variant == "llm":
        config.model.kind = "llm"
        config.model.audio.enabled = False
    return config


def get_config(variant: str = "omni"):
    config = base.get_config()
    config.model.kind = "omni"
    config.model.llm.update(dict(
        vocab_size=128_256, width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, rope_theta=500_000.0, mrope_sections=(16, 24, 24), norm_eps=1e-5,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True, lm_head_chunk=512))
    config.model.vision.update(VISION)
    config.model.audio.update(AUDIO)
    config.data.vision.update(PIXELS)
    config.tokenizer.vocab_size = 128_256
    config.mesh.update(dict(data=1, fsdp=-1, expert=1, tensor=1))
    config.data.seq_len = 4096
    config.data.num_workers = 8
    config.data.mixture = "mm1"  # 45% interleaved, 45% image-text, 10% text [MM1]
    config.train.batch_size = 256
    config.train.steps = 200_000
    config.train.log_every = 50
    config.opt.update(dict(warmup_steps=2000, decay="cosine", final_fraction=0.1, mu_dtype="bfloat16"))
    # MM1's law, resolved at start from the LLM's size (N = 8.03e9: peak_lr ≈ 3.85e-5),
    # weight_decay = 0.1·peak_lr in the "schedule_only" convention: run_config.resolve_lr_law.
    config.opt.peak_lr = "mm1"
    config.checkpoint.update(dict(every=1000, keep=3))
    return variant_of(config, variant, "m2omni_9b")

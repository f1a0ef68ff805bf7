"""M2-omni-72B (Llama-3.3-70B LLM, the 9B's vision and audio towers) on a TPU v5p-512 (256 chips).

    python launch/tpu.py train --name=m2omni-72b --zone=us-east5-a --accelerator-type=v5p-512 \\
        --config=configs/m2omni_72b.py --workdir=gs://my-bucket/m2omni_72b
    m2omni-aot --config=configs/m2omni_72b.py --topology=v5p-512   # per-chip HBM, before renting

FSDP over 64 chips × 4-way tensor parallelism within a host, bf16 compute, fp32 master
weights, full rematerialisation, the LM head chunked, global batch 512 × 4096 (8 rows per
chip), 4,096-patch packs: 69.2 of 95.7 GiB per chip, a 28% margin (m2omni-aot;
benchmarks/results/aot_m2omni_72b_v5p-512.json). Data and tokenizer as in configs/m2omni_9b.py;
`:llm` is the text-only LLM, as there.
"""
from configs import base, m2omni_9b


def get_config(variant: str = "omni"):
    config = base.get_config()
    config.model.kind = "omni"
    config.model.llm.update(dict(
        vocab_size=128_256, width=8192, depth=80, num_heads=64, num_kv_heads=8, head_dim=128,
        mlp_dim=28_672, rope_theta=500_000.0, mrope_sections=(16, 24, 24), norm_eps=1e-5,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True, lm_head_chunk=512))
    config.model.vision.update(m2omni_9b.VISION)
    config.model.audio.update(m2omni_9b.AUDIO)
    config.data.vision.update(m2omni_9b.PIXELS)
    config.tokenizer.vocab_size = 128_256
    config.mesh.update(dict(data=1, fsdp=-1, expert=1, tensor=4))
    config.data.seq_len = 4096
    config.data.num_workers = 8
    config.data.mixture = "mm1"  # 45% interleaved, 45% image-text, 10% text [MM1]
    config.train.batch_size = 512
    config.train.steps = 200_000
    config.train.log_every = 50
    config.opt.update(dict(warmup_steps=2000, decay="cosine", final_fraction=0.1, mu_dtype="bfloat16"))
    # MM1's law, resolved at start from the LLM's size (N = 7.06e10: peak_lr ≈ 1.54e-5),
    # weight_decay = 0.1·peak_lr in the "schedule_only" convention: run_config.resolve_lr_law.
    config.opt.peak_lr = "mm1"
    config.checkpoint.update(dict(every=500, keep=3))
    return m2omni_9b.variant_of(config, variant, "m2omni_72b")

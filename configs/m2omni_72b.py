"""M2-omni-72B language model (Llama-3.3-70B dimensions) on a TPU v5p-512 (256 chips).

    bash launch/tpu_pod.sh my-v5p-512 us-east5-a \
        --config=configs/m2omni_72b.py --workdir=gs://my-bucket/m2omni_72b

FSDP over 64 chips × 4-way tensor parallelism within a host, bf16 compute,
fp32 master weights, full rematerialisation, global batch 512 × 4096.
"""
from configs import base
from m2omni_jax.training import optimizers


def get_config():
    config = base.get_config()
    config.model.llm.update(dict(
        vocab_size=128_256, width=8192, depth=80, num_heads=64, num_kv_heads=8, head_dim=128,
        mlp_dim=28_672, rope_theta=500_000.0, mrope_sections=(16, 24, 24), norm_eps=1e-5,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    config.tokenizer.vocab_size = 128_256
    config.mesh.update(dict(data=1, fsdp=-1, expert=1, tensor=4))
    config.data.seq_len = 4096
    config.data.num_workers = 8
    config.train.batch_size = 512
    config.train.steps = 200_000
    config.train.log_every = 50
    config.opt.update(dict(warmup_steps=2000, decay="cosine", final_fraction=0.1, mu_dtype="bfloat16"))
    # MM1's law for N = 7.06e10: peak_lr ≈ 1.54e-5, weight_decay = 0.1·peak_lr ("schedule_only").
    config.opt.update(optimizers.mm1_opt_fields(config.model.llm))
    config.checkpoint.update(dict(every=500, keep=3))
    return config

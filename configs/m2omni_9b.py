"""M2-omni-9B language model (Llama-3.1-8B dimensions) on a TPU v5p-64 (32 chips).

    bash launch/tpu_pod.sh my-v5p-64 us-east5-a \
        --config=configs/m2omni_9b.py --workdir=gs://my-bucket/m2omni_9b

Sized for: FSDP over all chips, bf16 compute with fp32 master weights,
full rematerialisation, global batch 512 × 4096 tokens (MM1's pre-training
batch). Point `tokenizer.path` at your SentencePiece model with the special
tokens (see m2omni_jax/data/tokenizer.py).
"""
from configs import base
from m2omni_jax.training import optimizers


def get_config():
    config = base.get_config()
    config.model.llm.update(dict(
        vocab_size=128_256, width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, rope_theta=500_000.0, mrope_sections=(16, 24, 24), norm_eps=1e-5,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True))
    config.tokenizer.vocab_size = 128_256
    config.mesh.update(dict(data=1, fsdp=-1, expert=1, tensor=1))
    config.data.seq_len = 4096
    config.data.num_workers = 8
    config.train.batch_size = 512
    config.train.steps = 200_000
    config.train.log_every = 50
    config.opt.update(dict(warmup_steps=2000, decay="cosine", final_fraction=0.1, mu_dtype="bfloat16"))
    # MM1's law for N = 8.03e9: peak_lr ≈ 3.85e-5, weight_decay = 0.1·peak_lr ("schedule_only").
    config.opt.update(optimizers.mm1_opt_fields(config.model.llm))
    config.checkpoint.update(dict(every=1000, keep=3))
    return config

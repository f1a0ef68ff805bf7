"""32M-parameter LLM for throughput benchmarks (8 layers, d=512, 8/4 heads, FFN 1408, vocab 8192).

    python benchmarks/train_throughput.py --config=configs/bench_32m.py

Batch 8 × 512 tokens. fp32 compute: on CPUs bf16 matmuls are slower than fp32. On CPUs,
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot is ~17% faster (benchmarks/results/).
"""
from configs import base


def get_config():
    config = base.get_config()
    config.model.llm.update(dict(
        vocab_size=8192, width=512, depth=8, num_heads=8, num_kv_heads=4, head_dim=64,
        mlp_dim=1408, mrope_sections=(8, 12, 12), remat_policy="none", scan_layers=True))
    config.tokenizer.vocab_size = 8192
    config.data.seq_len = 512
    config.train.batch_size = 8
    config.train.steps = 10
    return config

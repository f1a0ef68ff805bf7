"""Defaults shared by every experiment; other configs start from `get_config()`.

Not meant to be run alone; see configs/tiny.py for a runnable experiment.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Llama-3 decoder with M-RoPE (m2omni_jax/models/llm.py: LLMConfig).
    config.model = ml_collections.ConfigDict()
    config.model.llm = ml_collections.ConfigDict(dict(
        vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=704, rope_theta=500_000.0, mrope_sections=(8, 12, 12), norm_eps=1e-5,
        tie_embeddings=False, dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True))

    # Mesh axis sizes; one may be -1 (fills the remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    # Logical-axis rules: empty means the table in m2omni_jax/parallel/sharding.py.
    config.sharding_rules = ()

    config.tokenizer = ml_collections.ConfigDict(dict(
        path="",  # a SentencePiece .model of your own; empty trains one on the built-in text
        vocab_size=1024,  # requested pieces (the model's embedding is model.llm.vocab_size)
        cache_dir="",  # empty: ~/.cache/m2omni_jax/tokenizer
        train_docs=4000,  # built-in documents the tokenizer is trained on
    ))

    config.data = ml_collections.ConfigDict(dict(
        dir="~/.cache/m2omni_jax/data",  # the built-in data set is generated here once
        seed=0,  # corpus, shuffling and packing order
        num_text_docs=20_000,
        num_shards=4,
        seq_len=256,
        packing_bins=0,  # first-fit bins open at once; 0: max(16, local batch)
        num_workers=0,  # grain worker processes (0: in the main process)
        read_threads=2,
    ))

    config.train = ml_collections.ConfigDict(dict(
        steps=200,
        batch_size=16,  # global batch (sequences)
        log_every=10,
        z_loss_weight=0.0,
        # Per-modality loss weights (missing modalities weigh 1).
        loss_weights=ml_collections.ConfigDict(),
        peak_flops_per_device=0.0,  # 0: from the device table (or measured on CPU)
    ))

    # m2omni_jax/training/optimizers.py: make_optimizer.
    config.opt = ml_collections.ConfigDict(dict(
        name="adamw",  # "adamw" | "fixnorm" (FixNorm-AdamW: no weight decay)
        peak_lr=3e-3,  # MM1 law: optimizers.mm1_lr_and_wd(N)[0]
        warmup_steps=20,  # 2,000 at MM1 scale; schedule length = config.train.steps
        decay="cosine",  # "cosine" | "linear" | "constant"
        final_fraction=0.1,
        b1=0.9, b2=0.95, eps=1e-8,
        mu_dtype="",  # "": the parameter dtype; "bfloat16" at scale
        grad_clip=1.0,  # global norm; 0 disables
        weight_decay=0.1,
        weight_decay_convention="lr_coupled",  # "schedule_only": MM1/AXLearn λ (decay = λ·lr_t/peak)
        no_decay=(r"(^|/)(scale|bias)$",),  # path regexes never decayed
        param_groups=(),  # ((path_regex, group), ...), first match wins, else "default"
        lr_multipliers={},  # {group: multiplier}
        frozen=(),  # path regexes: zero updates, no optimizer state
        fixnorm=dict(
            scale_invariant=(),  # path regexes of weights followed by a normalisation
            classifier=(r"(^|/)lm_head/kernel$",),  # the LLM's classifier
            tau=None,  # classifier norm; None keeps its initial norm
            per_channel=False,
            classifier_per_class=False,
            stacked=(r"(^|/)layers/",),  # nn.scan-stacked params: norms never mix layers
        ),
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every=100,
        keep=3,
        async_save=True,
    ))
    return config

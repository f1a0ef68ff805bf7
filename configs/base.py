"""Defaults shared by every experiment; other configs start from `get_config()`.

Not meant to be run alone; see configs/tiny.py for a runnable experiment.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init (and LoRA init, mixture sampling)

    # Llama-3 decoder with M-RoPE (m2omni_jax/models/llm.py: LLMConfig).
    config.model = ml_collections.ConfigDict()
    config.model.kind = "llm"  # "llm": text only | "omni": + vision tower (models/omni.py)
    config.model.llm = ml_collections.ConfigDict(dict(
        vocab_size=1024,  # embedding rows (≥ tokenizer.vocab_size)
        width=256,  # residual stream width
        depth=4,  # decoder layers
        num_heads=4, num_kv_heads=2,  # query heads; key/value heads (GQA; must divide num_heads)
        head_dim=64,  # per attention head (128 in Llama-3)
        mlp_dim=704,  # SwiGLU hidden width
        rope_theta=500_000.0,  # Llama-3's rotary base
        mrope_sections=(8, 12, 12),  # rotary pairs for (time, height, width); sum = head_dim / 2
        mrope_layout="sectioned",  # the paper's | "interleaved": Qwen3-VL (models/rope.py: mrope_axis_of_pair)
        norm_eps=1e-5,  # RMSNorm epsilon
        tie_embeddings=False,  # True: the LM head reuses the token embedding
        dtype="float32", param_dtype="float32",  # compute / parameter dtypes ("bfloat16" compute on TPU/GPU)
        remat_policy="none",  # rematerialisation per layer (models/layers.py: REMAT_POLICIES)
        scan_layers=True,  # nn.scan over the layers: one compiled layer, stacked parameters
        lm_head_chunk=0,  # > 0: the loss's LM head + cross-entropy this many positions at a time (no whole logits)
        # "einsum" (ours, the fastest on CPU) | "xla" (jax.nn.dot_product_attention) | "cudnn"
        # (its flash attention: GPU, bf16/fp16 only); models/layers.py, benchmarks/attention.py
        attention_implementation="einsum"))
    # NaViT vision tower (models/vision.py: VisionConfig); read when kind="omni".
    config.model.vision = ml_collections.ConfigDict(dict(
        width=64, depth=2, num_heads=4,  # ViT width, blocks, heads (head dim a multiple of 4: 2-D RoPE)
        mlp_ratio=4.0,  # quick-GELU MLP width / width
        out_width=64,  # PatchMerger output (the connector's input)
        dtype="float32", param_dtype="float32",  # compute / parameter dtypes
        remat_policy="none",  # as model.llm.remat_policy
        scan=True,  # nn.scan over the blocks
        layer_norm_epsilon=1e-6,  # Qwen2-VL's; a tower from scratch wants ~1 (models/vision.py)
        zero_init_residual=False,  # True: blocks start as the identity (a tower from scratch)
        fractional_position_frequencies=0,  # > 0: + where each patch sits in its image (NaViT)
        attention_implementation="einsum"))  # as model.llm's; also the attn_pool connector's
    # The vision connector (models/omni.py: ConnectorConfig); read when kind="omni".
    config.model.connector = ml_collections.ConfigDict(dict(
        kind="linear",  # M2-omni | MM1's "avg_pool", "attn_pool", "c_abstractor"
        mlp=False,  # "linear" only: Linear–GELU–Linear instead of one Linear
        # 1 = the paper's unit-norm tokens (right for a pretrained Llama); ≈ √width for an LLM
        # trained from scratch, whose N(0, 1) token embeddings have that norm.
        output_scale=1.0,
        position_frequencies=0,  # > 0: + where each token sits in its image, after the L2 norm, from 0
        extras="",  # a registered connector plug-in (an experiment's, e.g. "shapes_world_regions"); "" = none
        # The pooling kinds only (ignored by "linear"):
        num_tokens=64,  # k per image / video frame-pair (a square for avg_pool, c_abstractor)
        max_segments_per_row=8,  # S: images + video frame-pairs one row's pack holds
        max_grid_side=16,  # largest merged-grid side of an image; larger images are skipped
        hidden_width=0,  # c_abstractor ResNet width (0: model.vision.out_width)
        depth=3,  # c_abstractor ResNet blocks per stage
        num_heads=8))  # attn_pool; must divide model.vision.out_width
    # SAN-M audio tower (models/audio.py: AudioConfig fields; its out_width is the LLM width),
    # read when kind="omni" and enabled. Each clip becomes num_audio_tokens tokens (180 ms
    # each; 48 cover 8.6 s), padded with <end_of_audio>.
    config.model.audio = ml_collections.ConfigDict(dict(
        enabled=False,  # off: no audio tower, no audio batch keys (text + vision configs unchanged)
        output_scale=1.0,  # multiplies the L2-normalised audio tokens, as connector.output_scale
        width=64, depth=2, num_heads=4,  # SAN-M width, blocks (the input block included), heads
        mlp_dim=128,  # feed-forward width
        fsmn_kernel=11,  # the FSMN memory's depthwise kernel over time
        fsmn_shift=0,  # > 0 moves that window into the past (streaming)
        layer_norm_epsilon=1e-12,  # Paraformer's
        frames_per_token=3,  # LFR frames concatenated per token (3 × 60 ms)
        num_audio_tokens=48,  # tokens per clip (fixed)
        projector="linear",  # "linear" | "mlp": into the LLM width, then L2 norm
        dtype="float32", param_dtype="float32",  # compute / parameter dtypes
        remat_policy="none",  # as model.llm.remat_policy
        scan=True,  # nn.scan over the blocks
        attention_implementation="einsum",  # as model.llm.attention_implementation
        dropout=0.0))  # SAN-M dropout while training (Paraformer's 0.1: the 9B / 72B)
    # The image output head (models/image_head.py: ImageOutputConfig), read when kind="omni" and
    # enabled: a flow-matching DiT conditioned on the LLM's hidden states of a `<gen_image>` span.
    config.model.image_head = ml_collections.ConfigDict(dict(
        enabled=False,  # off: no head, no image batch keys (configs without it unchanged)
        route="query",  # "query": N <gen_imagePatch> tokens | "caption": the description the LLM writes
        num_queries=8,  # "query": <gen_imagePatch> tokens per drawing
        max_cond_tokens=32,  # "caption": description tokens the decoder attends to
        images_per_row=2,  # drawing slots per packed row (static)
        loss_weight=1.0,  # × the flow-matching loss (modality "image_out" in train.loss_weights too)
        image_size=32, patch_size=4, channels=3,  # square RGB target, patchified
        width=128, depth=4, num_heads=4, mlp_ratio=4.0,  # the DiT
        cond_width=64,  # the projector's output (the head's condition width)
        position_embedding="sincos",  # "sincos" | "learned"
        cond_dropout=0.1,  # rows trained unconditionally (classifier-free guidance)
        time_sampling="uniform",  # "uniform" | "logit_normal"
        time_mean=0.0, time_std=1.0,  # logit-normal: sigmoid(N(time_mean, time_std²))
        data_shift=0.0, data_scale=1.0,  # the head models (image − data_shift) / data_scale
        sample_steps=20, sampler="euler", guidance_scale=1.0,  # sampling: steps, "euler" | "heun", CFG scale
        prediction="velocity",  # the DiT's output: "velocity" x1 − x0 | "data": the clean image | "preconditioned"
        dtype="float32", param_dtype="float32", remat_policy="none", scan=True,
        attention_implementation="einsum"))

    # Mesh axis sizes (parallel/sharding.py); one may be -1 (fills the remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # pure data parallelism (parameters replicated)
        fsdp=1,  # data parallelism with parameters and optimizer state sharded
        expert=1,  # MoE experts
        tensor=1,  # tensor parallelism (heads, MLP hidden, vocab)
        # Multislice: slices each axis spans over the data-centre network (the sizes above are
        # per slice; the mesh axis is their product). All 1: one slice. E.g. dcn.data=2.
        dcn=ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))))
    config.sharding_rules = ()  # logical-axis rules; empty: the table in m2omni_jax/parallel/sharding.py

    config.tokenizer = ml_collections.ConfigDict(dict(
        path="",  # a SentencePiece .model of your own; empty: trained once on the sources' text
        vocab_size=1024,  # requested pieces (the model's embedding is model.llm.vocab_size)
        cache_dir="",  # empty: ~/.cache/m2omni_jax/tokenizer
        audio_codes=0,  # > 0: that many <audio_k> speech-code tokens after the text ids (data/audio_tokens.py)
    ))

    # Data (data/): sources -> records -> media + chat -> mixture -> packed rows.
    config.data = ml_collections.ConfigDict(dict(
        dir="~/.cache/m2omni_jax/data",  # generated data sets are written here once
        seed=0,  # generation, shuffling and packing order
        split="train",  # the split the training pipeline reads ("eval": held out)
        seq_len=256,  # tokens per packed row
        packing_bins=0,  # first-fit bins open at once; 0: max(16, local batch)
        num_workers=0,  # grain worker processes (0: in the main process)
        read_threads=2,  # threads reading + preprocessing per process
        shards=0,  # text data streams the global batch is split into (a multiple of the process
        # count; each process reads its own); 0: one per process. Fixed: same batches on any process count
        # How a sample's trained tokens weigh in the loss: "token" | "square" | "sample"
        # (data/pipeline.py LOSS_AVERAGING; "square": InternVL 2.5).
        loss_averaging="token",
        pack_pairs=(),  # modalities whose consecutive samples join into one sequence (PT1: ("image",))
    ))
    # Where records come from (data/sources/): name -> {kind, ...its fields}. Kinds: "tfds",
    # "jsonl", "array_record" (data/sources/*.py) and the built-in "text_corpus" / "shapes_world"
    # (m2omni_jax/experiments/). Each source's parts (a task, a data set) join the mixture.
    config.data.sources = ml_collections.ConfigDict(dict(
        text=dict(
            kind="text_corpus",  # the built-in text corpus, generated once under data.dir
            dir="",  # "": <data.dir>/text and <data.dir>/text_eval
            num_docs=20_000,  # training documents (held out: num_docs / 20, at least 200)
            num_shards=4,  # ArrayRecord files of the training documents
            tokenizer_docs=4000,  # the built-in tokenizer is trained on this many documents
        ),
    ))
    # Omni data (data/omni_pipeline.py), read when model.kind="omni".
    config.data.vision = ml_collections.ConfigDict(dict(
        # Bounds off the 28-multiples: smart_resize's floor() of an exact multiple can land
        # one step low in floating point (e.g. 96x96 with max 56·56 gives 28x28).
        image_min_pixels=56 * 56, image_max_pixels=115 * 115,  # square images ≤ 112x112: ≤ 16 tokens
        image_side=0,  # > 0: images squashed to image_side² (a multiple of 28), not smart_resize'd
        video_min_pixels=56 * 56, video_max_pixels=60 * 60,  # frames 56x56: 4 tokens per 2 frames
        video_src_fps=2.0,  # frame rate of the records' frames
        video_fps=2.0, video_min_frames=4, video_max_frames=8,  # sampled frames (an even count)
        patches_per_row=256,  # fixed patch pack per row (a multiple of 4): one compiled shape
        pixel_norm="clip",  # "clip" (pretrained Qwen2-VL ViT) | "clip_centered" (tower from scratch)
    ))
    # Audio clips (data/media.py), read when model.audio.enabled.
    config.data.audio = ml_collections.ConfigDict(dict(
        clips_per_row=2,  # fixed clip slots per row (each model.audio.num_audio_tokens·3 frames): one shape
        cmvn_file="",  # "": <workdir>/cmvn.json, measured on the training audio by the first run
        cmvn_samples=500,  # training audio records (round-robin over the audio parts) it is measured on
    ))
    config.data.mixture = "omni"  # omni_pipeline.MIXTURE_PRESETS name ("mm1": 45/45/10) or "custom"
    config.data.modality_weights = ml_collections.ConfigDict(dict(  # used when mixture="custom"
        text=0.25, image=0.45, video=0.15, interleaved=0.15, audio=0.0))  # audio: needs model.audio.enabled

    config.train = ml_collections.ConfigDict(dict(
        steps=200,  # optimizer steps (also the LR schedule's length)
        batch_size=16,  # global batch (sequences)
        log_every=10,  # steps between logged metrics
        z_loss_weight=0.0,  # [MM1] weight of log²Z of the output softmax; 0: off
        # Per-modality loss weights (missing modalities weigh 1).
        loss_weights=ml_collections.ConfigDict(),
        peak_flops_per_device=0.0,  # 0: from the device table (or measured on CPU)
        # A step with a non-finite loss or gradient norm is skipped (the state before it kept)
        # and counted; this many in a row stop the run with an error (training/loop.py).
        max_nonfinite_steps=10,
    ))

    # m2omni_jax/training/optimizers.py: make_optimizer.
    config.opt = ml_collections.ConfigDict(dict(
        name="adamw",  # "adamw" | "fixnorm" (FixNorm-AdamW: no weight decay)
        # A number, or "mm1": MM1's law from the LLM's parameter count sets it and weight_decay
        # (λ = 0.1·η, "schedule_only"), logged at start (run_config.resolve_lr_law).
        peak_lr=config_dict.FieldReference(3e-3, field_type=object),
        warmup_steps=20,  # 2,000 at MM1 scale; schedule length = config.train.steps
        decay="cosine",  # "cosine" | "linear" | "constant"
        final_fraction=0.1,  # the schedule ends at this fraction of peak_lr [MM1]
        b1=0.9, b2=0.95, eps=1e-8,  # Adam moments' decay rates and epsilon
        mu_dtype="",  # "": the parameter dtype; "bfloat16" at scale
        grad_clip=1.0,  # global norm; 0 disables
        weight_decay=0.1,  # decoupled (AdamW); ignored by fixnorm
        weight_decay_convention="lr_coupled",  # "schedule_only": MM1/AXLearn λ (decay = λ·lr_t/peak)
        no_decay=(r"(^|/)(scale|bias)$",),  # path regexes never decayed
        param_groups=(),  # ((path_regex, group), ...), first match wins, else "default"
        lr_multipliers={},  # {group: multiplier}
        frozen=(),  # path regexes: zero updates, no optimizer state, no backward pass
        fixnorm=dict(
            # Path regexes of weights followed by a normalisation; they depend on the connector
            # kind, so optimizers.fixnorm_preset(config) fills them in from the model config.
            scale_invariant=(),
            classifier=(r"(^|/)lm_head/kernel$",),  # the LLM's classifier
            tau=None,  # classifier norm; None keeps its initial norm
            per_channel=False,  # True: fix each output channel's norm, not the tensor's
            classifier_per_class=False,  # True: the classifier's norm per class (row), not as a whole
            # nn.scan-stacked params (LLM layers, ViT / SAN-M blocks): norms never mix layers
            stacked=(r"(^|/)layers/", r"(^|/)blocks/"),
        ),
    ))

    # m2omni_jax/evaluate.py (m2omni-eval): greedy decoding on the held-out split.
    config.eval = ml_collections.ConfigDict(dict(
        num_samples=200,  # held-out records, round-robin over the tasks
        batch_size=16,  # prompts decoded at once
        max_new_tokens=48,  # greedy decoding budget per answer
        num_speech_samples=100,  # held-out speech records (with model.audio.enabled): ASR WER, spoken QA
        prompt_len=0,  # left-padded prompt length; 0: the longest held-out prompt (one compile)
        every=0,  # > 0: m2omni-train also evaluates every this many steps (and at the end), as eval/*
        periodic_num_samples=0,  # held-out records of those evaluations; 0: num_samples
        num_tts_samples=50,  # held-out TTS sentences (parts of modality "speech_gen") spoken and scored
        tts_wavs=4,  # of them written to <workdir>/tts_wavs
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every=100,  # steps between checkpoints (and one at the end)
        keep=3,  # most recent checkpoints kept
        async_save=True,  # write in the background while training goes on
    ))
    # A previous run's workdir (stages: the previous stage's), relative to this workdir; its
    # parameters initialise this run (optimizer state starts fresh; new towers stay random).
    config.init_from = ""
    config.init_from_include = ()  # parameter path regexes to load (e.g. ("^vision/",)); empty: all that fit
    config.train.heldout_batches = 0  # >0: end with a held-out loss per balanced modality
    config.train.heldout_batch_size = 0  # sequences per held-out batch; 0: train.batch_size

    # How modalities are combined (m2omni_jax/training/balance.py, DESIGN §2).
    config.balance = ml_collections.ConfigDict(dict(
        strategy="none",  # "none" | "step" | "size_proportional" | "round_robin" | "dynamic"
        modalities=("text", "image", "video", "interleaved"),  # one single-modality micro-batch each
        step=dict(
            alpha=10.0,  # α: the weights sum to it [paper]
            calibration_file="",  # converged losses Lᵢ* (m2omni-calibrate); required unless:
            equal_weights=False),  # True: α/M each, no calibration (an explicit choice, never a fallback)
        dynamic=dict(
            window=5,  # H: validation losses per slope fit
            temperature=1.0,  # f: softmax temperature of the weights
            momentum=0.9,  # w̃ ← momentum·w̃ + (1 − momentum)·w
            eps=1e-6,  # ε of the loss normalisation
            interval_steps=500,  # K: steps between validation passes
            val_batches=2,  # Sᵢ: held-out batches per modality per pass
            val_batch_size=8),  # Bᵢ: sequences per such batch
    ))
    return config

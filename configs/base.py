"""Defaults shared by every experiment; other configs start from `get_config()`.

Not meant to be run alone; see configs/tiny.py for a runnable experiment.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Llama-3 decoder with M-RoPE (m2omni_jax/models/llm.py: LLMConfig).
    config.model = ml_collections.ConfigDict()
    config.model.kind = "llm"  # "llm": text only | "omni": + vision tower (models/omni.py)
    config.model.llm = ml_collections.ConfigDict(dict(
        vocab_size=1024, width=256, depth=4, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=704, rope_theta=500_000.0, mrope_sections=(8, 12, 12), norm_eps=1e-5,
        mrope_layout="sectioned",  # "interleaved": Qwen3-VL (models/rope.py: mrope_axis_of_pair)
        tie_embeddings=False, dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True))
    # NaViT vision tower (models/vision.py: VisionConfig) and its connector; read when kind="omni".
    config.model.vision = ml_collections.ConfigDict(dict(
        width=64, depth=2, num_heads=4, mlp_ratio=4.0, out_width=64, dtype="float32",
        param_dtype="float32", remat_policy="none", scan=True,
        layer_norm_epsilon=1e-6,  # Qwen2-VL's; a tower from scratch wants ~1 (models/vision.py)
        zero_init_residual=False,  # True: blocks start as the identity (a tower from scratch)
        conv_stem_channels=(),  # () = linear patch embedding; e.g. (32, 64): a conv stem per patch
        fractional_position_frequencies=0))  # > 0: + where each patch sits in its image (NaViT)
    # output_scale: 1 = the paper's unit-norm tokens (right for a pretrained Llama); ≈ √width
    # for an LLM trained from scratch, whose N(0, 1) token embeddings have that norm.
    config.model.connector = ml_collections.ConfigDict(dict(
        kind="linear",  # M2-omni | MM1's "avg_pool", "attn_pool", "c_abstractor"
        mlp=False, output_scale=1.0, position_frequencies=0,
        position_placement="input",  # "output": after the L2 norm, zero-initialised (models/omni.py)
        # Classes per attribute of a pre-trained region head (pretrain_tower.REGION_CLASSES), whose
        # per-token predictions join the connector input ("linear"); () = none.
        region_classes=(),
        region_words=False,  # + the tags as the LLM's embeddings of the class names (models/omni.py)
        # The pooling kinds only (ignored by "linear"):
        num_tokens=64,  # k per image / video frame-pair (a square for avg_pool, c_abstractor)
        max_segments_per_row=8,  # S: images + video frame-pairs one row's pack holds
        max_grid_side=16,  # largest merged-grid side of an image; larger images are skipped
        hidden_width=0, depth=3,  # c_abstractor ResNet width (0: model.vision.out_width), blocks per stage
        num_heads=8))  # attn_pool; must divide model.vision.out_width
    # SAN-M audio tower (models/audio.py: AudioConfig fields; its out_width is the LLM width),
    # read when kind="omni" and enabled. Each clip becomes num_audio_tokens tokens (180 ms
    # each; 48 cover the longest built-in speech clip, 8.1 s), padded with <end_of_audio>.
    config.model.audio = ml_collections.ConfigDict(dict(
        enabled=False,  # off: no audio tower, no audio batch keys (text + vision configs unchanged)
        output_scale=1.0,  # multiplies the L2-normalised audio tokens, as connector.output_scale
        width=64, depth=2, num_heads=4, mlp_dim=128, fsmn_kernel=11, fsmn_shift=0,
        layer_norm_epsilon=1e-12, frames_per_token=3, num_audio_tokens=48, projector="linear",
        dtype="float32", param_dtype="float32", remat_policy="none", scan=True))

    # Mesh axis sizes; one may be -1 (fills the remaining devices).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    # Logical-axis rules: empty means the table in m2omni_jax/parallel/sharding.py.
    config.sharding_rules = ()

    config.tokenizer = ml_collections.ConfigDict(dict(
        path="",  # a SentencePiece .model of your own; empty trains one on the built-in text
        vocab_size=1024,  # requested pieces (the model's embedding is model.llm.vocab_size)
        cache_dir="",  # empty: ~/.cache/m2omni_jax/tokenizer
        train_docs=4000,  # built-in documents the tokenizer is trained on
        train_chats=600,  # + the chats of this many shapes-world records (one-word answers)
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
        # How a sample's trained tokens weigh in the loss: "token" | "square" | "sample"
        # (data/pipeline.py LOSS_AVERAGING; "square": InternVL 2.5).
        loss_averaging="token",
    ))
    # Omni data (data/omni_pipeline.py), read when model.kind="omni".
    config.data.shapes_world = ml_collections.ConfigDict(dict(
        dir="",  # "": <data.dir>/shapes_world; written once
        num_train=20_000, num_eval=1_000,
        tasks=("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "video_motion",
               "interleaved"),
    ))
    config.data.vision = ml_collections.ConfigDict(dict(
        # Bounds off the 28-multiples: smart_resize's floor() of an exact multiple can land
        # one step low in floating point (e.g. 96x96 with max 56·56 gives 28x28).
        image_min_pixels=56 * 56, image_max_pixels=115 * 115,  # square images ≤ 112x112: ≤ 16 tokens
        image_side=0,  # > 0: images squashed to image_side² (a multiple of 28), not smart_resize'd
        video_min_pixels=56 * 56, video_max_pixels=60 * 60,  # frames 56x56: 4 tokens per 2 frames
        video_src_fps=2.0, video_fps=2.0, video_min_frames=4, video_max_frames=8,
        patches_per_row=256,  # fixed patch pack per row (a multiple of 4): one compiled shape
        pixel_norm="clip",  # "clip" (pretrained Qwen2-VL ViT) | "clip_centered" (tower from scratch)
        question_first=False,  # True: "question\n<image>" in training and evaluation (data/omni_pipeline.py)
    ))
    # Spoken shapes-world tasks (data/speech.py, eSpeak NG), modality "audio"; read when
    # model.audio.enabled.
    config.data.speech = ml_collections.ConfigDict(dict(
        dir="",  # "": <data.dir>/shapes_speech/<variant>; written once (progress bar), then reused
        num_train=20_000, num_eval=1_000,
        tasks=("asr", "spoken_vqa", "spoken_scene_qa", "spoken_caption_qa"),
        clips_per_row=2,  # fixed clip slots per row (each model.audio.num_audio_tokens·3 frames): one shape
        cmvn_file="",  # "": <workdir>/cmvn.json, measured on the training speech by the first run
        cmvn_samples=500,  # training speech records the CMVN statistics are measured on
    ))
    config.data.mixture = "omni"  # omni_pipeline.MIXTURE_PRESETS name ("mm1": 45/45/10) or "custom"
    config.data.modality_weights = ml_collections.ConfigDict(dict(  # used when mixture="custom"
        text=0.25, image=0.45, video=0.15, interleaved=0.15, audio=0.0))  # audio: needs model.audio.enabled
    # Factor per task within its modality (tasks not listed: 1).
    config.data.task_weights = ml_collections.ConfigDict(dict(
        caption=1.0, vqa_color=1.0, vqa_shape=1.0, vqa_count=1.0, vqa_position=1.0, vqa_dialog=1.0,
        vqa_locate=1.0, vqa_color_by_shape=1.0, ocr=1.0))

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
        frozen=(),  # path regexes: zero updates, no optimizer state, no backward pass
        fixnorm=dict(
            scale_invariant=(),  # path regexes of weights followed by a normalisation
            classifier=(r"(^|/)lm_head/kernel$",),  # the LLM's classifier
            tau=None,  # classifier norm; None keeps its initial norm
            per_channel=False,
            classifier_per_class=False,
            stacked=(r"(^|/)layers/",),  # nn.scan-stacked params: norms never mix layers
        ),
    ))

    # m2omni_jax/evaluate.py (m2omni-eval): greedy decoding on the held-out split.
    config.eval = ml_collections.ConfigDict(dict(
        num_samples=200,  # held-out records, round-robin over the tasks
        batch_size=16,
        max_new_tokens=48,
        num_speech_samples=100,  # held-out speech records (with model.audio.enabled): ASR WER, spoken QA
        prompt_len=0,  # left-padded prompt length; 0: the longest held-out prompt (one compile)
        every=0,  # > 0: m2omni-train also evaluates every this many steps (and at the end), as eval/*
        periodic_num_samples=0,  # held-out records of those evaluations; 0: num_samples
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every=100,
        keep=3,
        async_save=True,
    ))
    # Stages (configs/stages/): the previous stage's workdir, relative to this workdir; its
    # parameters initialise this run (optimizer state starts fresh; new towers stay random).
    # Vision-tower pre-training (m2omni_jax/pretrain_tower.py, `m2omni-pretrain-tower`): the tower of
    # config.model.vision learns to predict its caption's tokens; a run loads it with
    # init_from=<that workdir>, init_from_include=("^vision/",).
    config.tower_pretrain = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=32,  # rows per step
        images_per_row=4, patches_per_row=256,  # ≥ images_per_row × the largest image's patches
        peak_lr=3e-3, warmup_steps=50, weight_decay=0.05, log_every=10, checkpoint_every=500,
        objective="caption",  # "caption" | "regions" (each token names its object) | "caption+regions"
        pooling="mean",  # "mean" | "max": each caption word from the image's best token
        head_bias="prior", prior_batches=4,  # head biases at each token's caption frequency | "rare"
        eval_batches=1))  # at the end: the head's shape/colour accuracy on fresh scenes -> tower_eval.json
    config.init_from = ""
    config.init_from_include = ()  # parameter path regexes to load (e.g. ("^vision/",)); empty: all that fit
    config.data.split = "train"  # shapes-world split the pipeline reads ("eval": held out)
    config.train.heldout_batches = 0  # >0: end with a held-out loss per balanced modality
    config.train.heldout_batch_size = 0  # sequences per held-out batch; 0: train.batch_size

    # How modalities are combined (m2omni_jax/training/balance.py, DESIGN §2).
    config.balance = ml_collections.ConfigDict(dict(
        strategy="none",  # "none" | "step" | "size_proportional" | "round_robin" | "dynamic"
        modalities=("text", "image", "video", "interleaved"),
        step=dict(alpha=10.0, calibration_file=""),  # "": equal weights α/M
        dynamic=dict(window=5, temperature=1.0, momentum=0.9, eps=1e-6,  # H, f
                     interval_steps=500, val_batches=2, val_batch_size=8),  # K, Sᵢ, Bᵢ
    ))
    return config

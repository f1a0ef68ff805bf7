"""IT3 instruction tuning with dynamic adaptive balance, ~25% text; `+draw`: with image generation;
`+speak`: with speech output.

    m2omni-train --config=configs/stages/it3.py:tiny --workdir=/tmp/m2omni_stages/it3
    m2omni-train --config=configs/stages/it3.py:tiny+draw --workdir=/tmp/m2omni_stages/it3
    m2omni-train-speech-tokenizer --config=configs/experiments/speech_tokenizer_tiny.py --workdir=/tmp/m2omni_stages/speech_tok
    m2omni-train --config=configs/stages/it3.py:tiny+speak --workdir=/tmp/m2omni_stages/it3

Every `balance.dynamic.interval_steps` steps a validation pass per modality
updates the modality loss weights from the slopes of their recent
normalised validation losses [paper]; the weights are checkpointed and
logged to TensorBoard (balance/weight/<modality>).

`+draw` adds image generation as the paper's IT3 does: the image head (models/image_head.py,
query route; new parameters start random when the IT2 checkpoint has none) and the shapes
world's drawing requests (modality "image_gen"); the head's flow-matching loss is balanced
as modality "image_out" beside the others.

`+speak` adds speech output as the paper's model speaks: `<audio_k>` codes of the speech
tokenizer (configs/experiments/speech_tokenizer_tiny.py, trained first into SPEECH_TOKENIZER_WORKDIR;
the IT2 checkpoint's embedding and LM head grow by its codes on load), TTS records of the
built-in speech and spoken answers to its spoken VQA questions (image + speech question ->
the answer spoken by the voice "espeak"), both of modality "speech_gen", balanced beside the
others. `+draw+speak` has both.
"""
from configs.experiments import speech_tokenizer_tiny
from configs.stages import common

EXTRAS = ("draw", "speak")
SPEECH_TOKENIZER_WORKDIR = "/tmp/m2omni_stages/speech_tok"


def get_config(size="tiny"):
    size, *extras = size.split("+")
    if not set(extras) <= set(EXTRAS) or len(set(extras)) != len(extras):
        raise ValueError(f"stage config argument must be <size> with any of +draw, +speak, got {'+'.join([size, *extras])}")
    config = common.sized_config(size, "it3", previous="it2")
    common.mixture(config, image=0.35, video=0.1, interleaved=0.1, audio=0.2, text=0.25)
    config.data.sources.shapes_world.tasks = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "ocr",
                                      "video_motion", "interleaved")
    config.balance.strategy = "dynamic"
    config.data.sources.shapes_world.speech.tasks = ("asr", "spoken_vqa", "spoken_scene_qa", "spoken_caption_qa")  # + audio QA
    config.balance.modalities = ("text", "image", "video", "interleaved", "audio")
    config.balance.dynamic.interval_steps = 10 if size == "tiny" else 500
    if "draw" in extras:
        config.model.image_head.enabled = True
        config.data.sources.shapes_world.tasks += ("gen_image",)
        common.mixture(config, image=0.3, video=0.1, interleaved=0.1, audio=0.15, text=0.25, image_gen=0.1)
        config.balance.modalities += ("image_gen", "image_out")
    if "speak" in extras:
        add_speech_output(config)
    return config


def add_speech_output(config, weight: float = 0.1):
    """TTS and spoken-answer records (modality "speech_gen") at `weight` of the mixture."""
    speech = speech_tokenizer_tiny.get_config().speech_tokenizer
    speech.workdir = SPEECH_TOKENIZER_WORKDIR  # the decoder and vocoder m2omni-eval / -generate read
    config.speech_tokenizer = speech
    codes = 1
    for level in speech.tokenizer.model.levels:
        codes *= level
    config.tokenizer.audio_codes = codes
    config.model.llm.vocab_size += -(-codes // 128) * 128  # the text ids stay; the codes follow them
    encoder = dict(kind="tts", from_source="shapes_world", tokenizer_workdir=SPEECH_TOKENIZER_WORKDIR,
                   tokenizer_model=speech.tokenizer.model.to_dict(), num_train=0, num_eval=0, weight=1.0)
    config.data.sources.tts = dict(encoder, transcript_key=speech.transcript_key)
    config.data.sources.spoken_answers = dict(encoder, speak="answers", voice="espeak", parts=("spoken_vqa",))
    weights = dict(config.data.modality_weights)
    common.mixture(config, **{name: w * (1 - weight) for name, w in weights.items()}, speech_gen=weight)
    config.balance.modalities += ("speech_gen",)

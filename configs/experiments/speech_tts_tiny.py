"""The tiny omni LLM learns text-to-speech: text -> `<gen_audio>` speech codes of the trained
speech tokenizer (configs/experiments/speech_tokenizer_tiny.py, run first into /tmp/speech_tok),
decoded by its flow-matching decoder and Griffin-Lim. All three steps, timed:

    bash launch/tiny_tts.sh /tmp/m2omni_tts

or one at a time:

    m2omni-train-speech-tokenizer --config=configs/experiments/speech_tokenizer_tiny.py --workdir=/tmp/speech_tok
    m2omni-train --config=configs/experiments/speech_tts_tiny.py --workdir=/tmp/speech_tts
    m2omni-eval --config=configs/experiments/speech_tts_tiny.py --workdir=/tmp/speech_tts

50 held-out sentences after 600 steps, session 23 on 2 idle CPU cores: own-ASR WER 28.0%, CER
15.7% (eSpeak's own recordings: WER 6.5%), MCD 7.81 dB against eSpeak; WAVs in <workdir>/tts_wavs.
Training from scratch 27.7 min in all (tokenizer and decoder 21.5 min, this LLM 6.2 min); eval
74 s (benchmarks/results/tts_tiny_from_scratch.json; docs/experiments.md, "Speech output").
"""
from configs import tiny
from configs.experiments import speech_tokenizer_tiny

SPEECH_TOKENIZER_WORKDIR = "/tmp/speech_tok"


def get_config():
    config = tiny.get_config()
    speech = speech_tokenizer_tiny.get_config().speech_tokenizer
    config.speech_tokenizer = speech  # the decoder and vocoder settings m2omni-eval / -generate read
    config.speech_tokenizer.workdir = SPEECH_TOKENIZER_WORKDIR
    config.model.audio.enabled = False  # speech out only: the TTS source reads the built-in clips itself
    config.tokenizer.audio_codes = 1000  # the tokenizer's FSQ levels (8, 5, 5, 5)
    config.model.llm.vocab_size = 2048  # 1,024 text ids + 1,000 <audio_k>
    # TTS records of every built-in spoken clip (captions and questions, eSpeak voices).
    config.data.sources.tts = dict(
        kind="tts", from_source="shapes_world", transcript_key=speech.transcript_key,
        tokenizer_workdir=SPEECH_TOKENIZER_WORKDIR, tokenizer_model=speech.tokenizer.model.to_dict(),
        num_train=0, num_eval=0, weight=1.0)
    config.data.mixture = "custom"
    config.data.modality_weights = dict(text=0.0, image=0.0, video=0.0, interleaved=0.0, audio=0.0,
                                        speech_gen=1.0)
    config.data.seq_len = 320  # the longest clip: 203 codes + its text and the chat frame
    config.data.vision.patches_per_row = 4  # no images in this mixture
    config.train.steps = 600
    config.train.batch_size = 8
    config.opt.warmup_steps = 50
    config.checkpoint.every = 350
    config.eval.num_samples = 0
    config.eval.max_new_tokens = 240
    config.eval.batch_size = 8
    config.eval.num_tts_samples = 50  # held-out sentences spoken, transcribed and scored
    config.eval.tts_wavs = 4
    return config

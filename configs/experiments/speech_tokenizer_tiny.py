"""Speech tokenizer (FSQ in a SAN-M ASR encoder, 25 tokens/s, 1,000 codes) and the flow-matching
token-to-mel decoder on its codes, trained on the built-in speech (eSpeak NG) of the tiny config.

    m2omni-train-speech-tokenizer --config=configs/experiments/speech_tokenizer_tiny.py --workdir=/tmp/speech_tok

Held-out (the eval split's first 100 clips; 57 of their sentences also occur in training, spoken
in other voices, rates and pitches), session 23 on 2 idle CPU cores: tokenizer ASR CER 1.5% /
WER 6.2% after 1,500 steps (272 s); codes -> decoder (2,700 steps, 928 s) -> Griffin-Lim, own-ASR
WER 33.6%, CER 10.8%, MCD 7.3 dB; the whole command 21.5 min. Sized so that it and the TTS run
(configs/experiments/speech_tts_tiny.py) train in under 30 min together: `bash launch/tiny_tts.sh`.
Session 20's 1,500 + 3,000 steps (34.8 min): resynthesis WER 25.6%, MCD 6.9 dB.
"""
import ml_collections

from configs import tiny


def get_config():
    config = tiny.get_config()  # its data: 3,000 / 200 spoken records (4 tasks), one clip each
    config.speech_tokenizer = ml_collections.ConfigDict(dict(
        transcript_key="attributes.voices.text",  # each clip's text in the built-in speech records
        max_seconds=8.5,  # the longest built-in clip is 8.1 s
        num_train_clips=3000, num_eval_clips=100, cmvn_clips=500,
        tokenizer=dict(
            steps=1500, batch_size=16, peak_lr=2e-3, warmup_steps=100, weight_decay=0.0, grad_clip=1.0,
            log_every=50, checkpoint_every=500,
            model=dict(levels=(8, 5, 5, 5),  # 1,000 codes
                       frames_per_token=4,  # 25 tokens/s
                       width=128, num_heads=4, mlp_dim=256, encoder_depth=3, decoder_depth=1,
                       ctc_frames_per_token=2)),
        decoder=dict(
            steps=2700, batch_size=16, peak_lr=1e-3, warmup_steps=100, weight_decay=0.0, grad_clip=1.0,
            log_every=50, checkpoint_every=500,
            model=dict(width=128, num_heads=4, mlp_dim=256, encoder_depth=2, estimator_depth=3,
                       chunk_tokens=8, lookahead_tokens=3)),
        # CFG 2 (the decoder drops its condition 20% of the time in training): own-ASR WER on 30 held-out
        # clips 39% vs 58% with CFG off, after 1,500 decoder steps; 25 Euler steps gained nothing.
        eval_wavs=4, euler_steps=10, guidance_scale=2.0, griffin_lim_iters=32,
        vocoder="griffin_lim", vocoder_workdir=""))  # or "hifigan" and an m2omni-train-vocoder workdir
    return config

"""First-audio latency and real-time factor of streaming speech output (decoder + Griffin–Lim).

    python benchmarks/speech_streaming.py [--seconds=10] [--repeats=3] [--json=benchmarks/results/speech_streaming.json]

The path `models/speech_decoder.StreamDecoder` (chunk-causal flow matching, per-step
key/value caches) -> `models/vocoder.StreamingGriffinLim`, at a small decoder (width 256,
2 encoder + 4 estimator blocks, untrained: timing only), 10 Euler steps with CFG (two
copies), 25 tokens/s, chunks of 10 tokens (0.4 s of audio) after 3 look-ahead tokens.
Tokens arrive one at a time, as from an LLM that is never the bottleneck.
  first-audio latency: from the arrival of the token that completes the first chunk and
      its look-ahead to the first audio samples out of the vocoder;
  real-time factor: compute time of the whole utterance / its audio duration.
Compilation (one chunk function for every chunk) is measured apart; figures are medians
over `repeats` utterances run after it.

2 shared CPU cores, jax 0.10.2 (benchmarks/results/speech_streaming.json): first audio 0.21 s
after the 13th token; real-time factor 0.55 (decoder 0.23, Griffin–Lim 0.32) for 10 s of audio.
"""
import json
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from m2omni_jax.models import vocoder
from m2omni_jax.models.speech_decoder import SpeechDecoder, SpeechDecoderConfig, StreamDecoder

flags.DEFINE_float("seconds", 10.0, "Audio per utterance.")
flags.DEFINE_integer("repeats", 3, "Timed utterances.")
flags.DEFINE_integer("num_steps", 10, "Euler steps.")
flags.DEFINE_string("json", "benchmarks/results/speech_streaming.json", "Write the results here ('' = print only).")
FLAGS = flags.FLAGS

CONFIG = SpeechDecoderConfig(codebook_size=4096, width=256, num_heads=4, mlp_dim=1024, encoder_depth=2,
                             estimator_depth=4, chunk_tokens=10, lookahead_tokens=3)
TOKENS_PER_SECOND = 25


def run_utterance(model, params, tokens, noise):
    """Streams one utterance; -> (first-audio latency s, total compute s, audio samples, decoder s, vocoder s)."""
    decoder = StreamDecoder(model, params, noise, num_steps=FLAGS.num_steps, guidance_scale=1.5)
    voice = vocoder.StreamingGriffinLim()
    first_ready = first_audio = None
    samples, decode_s, vocode_s = 0, 0.0, 0.0
    start = time.perf_counter()
    for i in range(tokens.shape[1] + 1):
        last = i == tokens.shape[1]
        if i == CONFIG.chunk_tokens + CONFIG.lookahead_tokens - 1:
            first_ready = time.perf_counter()  # the token completing chunk 0 arrives now
        t0 = time.perf_counter()
        mels = decoder.flush() if last else decoder.push(tokens[:, i:i + 1])
        t1 = time.perf_counter()
        pieces = [voice.push(m[0]) for m in mels] + ([voice.flush()] if last else [])
        t2 = time.perf_counter()
        decode_s, vocode_s = decode_s + t1 - t0, vocode_s + t2 - t1
        samples += sum(len(p) for p in pieces)
        if first_audio is None and samples:
            first_audio = t2
    return first_audio - first_ready, time.perf_counter() - start, samples, decode_s, vocode_s


def main(_):
    model = SpeechDecoder(CONFIG)
    num_tokens = int(FLAGS.seconds * TOKENS_PER_SECOND)
    frames = num_tokens * CONFIG.token_mel_ratio
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.codebook_size, (1, num_tokens)).astype(np.int32)
    zeros = np.zeros((1,), np.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8], np.ones((1, 8), bool), zeros,
                                 np.zeros((1, 16, 80), np.float32), np.zeros((1,), np.float32),
                                 np.zeros((1, 16, 80), np.float32), np.ones((1, 16), bool), zeros, np.ones((1,), bool))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    noise = rng.standard_normal((1, frames, CONFIG.num_mels)).astype(np.float32)

    t0 = time.perf_counter()
    run_utterance(model, params, tokens[:, :CONFIG.chunk_tokens + CONFIG.lookahead_tokens], noise)  # compiles
    compile_s = time.perf_counter() - t0

    runs = [run_utterance(model, params, tokens, noise) for _ in range(FLAGS.repeats)]
    latency, total, samples, decode_s, vocode_s = (statistics.median(r[i] for r in runs) for i in range(5))
    audio_s = samples / vocoder.MEL.sample_rate
    results = {
        "config": {k: getattr(CONFIG, k) for k in ("width", "encoder_depth", "estimator_depth", "mlp_dim",
                                                   "chunk_tokens", "lookahead_tokens", "token_mel_ratio")},
        "num_params": int(num_params), "num_steps": FLAGS.num_steps, "guidance_scale": 1.5,
        "griffin_lim_iters": vocoder.MEL.griffin_lim_iters, "tokens_per_second": TOKENS_PER_SECOND,
        "chunk_audio_s": CONFIG.chunk_tokens / TOKENS_PER_SECOND, "audio_s": audio_s,
        "first_audio_latency_s": latency, "real_time_factor": total / audio_s,
        "decoder_rtf": decode_s / audio_s, "vocoder_rtf": vocode_s / audio_s,
        "compile_and_first_utterance_s": compile_s, "repeats": FLAGS.repeats,
        "backend": jax.default_backend(), "cpu_count": __import__("os").cpu_count(),
        "jax": jax.__version__, "machine": platform.machine(),
    }
    for key, value in results.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)

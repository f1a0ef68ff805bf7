#!/usr/bin/env bash
# Text-to-speech from scratch on a CPU, timed: the speech tokenizer and its token-to-mel decoder
# (configs/experiments/speech_tokenizer_tiny.py), then the tiny LLM on TTS records
# (configs/experiments/speech_tts_tiny.py), then the held-out evaluation (own-ASR WER, MCD, WAVs).
#
#   bash launch/tiny_tts.sh /tmp/m2omni_tts [extra --config.* overrides for the LLM run and its eval]
#
# The built-in speech is written first (once, cached; not part of the timed run).
set -euo pipefail
root=${1:?usage: $0 ROOT [--config.x=... ...]}
shift
tokenizer_config=configs/experiments/speech_tokenizer_tiny.py
tts_config=configs/experiments/speech_tts_tiny.py
tok_dir="$root/speech_tok"
tts=(--config="$tts_config" --workdir="$root/tts" --config.speech_tokenizer.workdir="$tok_dir"
     --config.data.sources.tts.tokenizer_workdir="$tok_dir")
mkdir -p "$root"
seconds() { date +%s; }
echo "=== data (written once, cached) ==="
m2omni-prepare-data --config="$tokenizer_config" --workdir="$root/data"
start=$(seconds)
echo "=== speech tokenizer and token-to-mel decoder ==="
m2omni-train-speech-tokenizer --config="$tokenizer_config" --workdir="$tok_dir"
tokenizer=$(seconds)
echo "=== the LLM learns to speak (TTS records) ==="
m2omni-train "${tts[@]}" "$@"
llm=$(seconds)
echo "=== held-out evaluation ==="
m2omni-eval "${tts[@]}" "$@"
echo "wall time: tokenizer + decoder $((tokenizer - start)) s, LLM $((llm - tokenizer)) s," \
     "training total $((llm - start)) s; eval $(( $(seconds) - llm )) s"

"""One-shot generation from a trained run: prints the reply as it is generated.

    m2omni-generate --config=configs/tiny.py --workdir=/tmp/m2omni_tiny --prompt="What is in the picture?"
        [--image=scene.png] [--audio=question.wav] [--system="..."] [--max_new_tokens=N]
        [--temperature=T] [--top_p=P] [--top_k=K] [--repetition_penalty=R] [--greedy] [--seed=S]
        [--out_dir=DIR]

Restores the parameters of the latest checkpoint in `workdir/checkpoints` (and, with the
audio tower, the run's `workdir/cmvn.json`). Each --image / --audio file fills one
`<image>` / `<audio>` placeholder of the prompt, in order; a prompt without placeholders
gets them in front. Sampling defaults are the paper's (temperature 0.7, top-k 100, top-p 0.8,
repetition penalty 1.05); --greedy takes the argmax. Images and speech the model's output
heads make are written to --out_dir (PNG / WAV; default `workdir/outputs`), their paths printed;
speech streamed in chunks (a `<gen_audio>` span, `inference/speech_output.py`) is one WAV per span. A missing or unreadable file, an
unsupported format or a prompt longer than the model's context (config.data.seq_len) is a
one-line error (exit 2).
"""
from __future__ import annotations

import dataclasses
import io
import os
import sys
import wave as wave_lib

import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from m2omni_jax import build, cli, faults
from m2omni_jax.data import media, records, tokenizer as tokenizer_lib
from m2omni_jax.inference.generator import Generator
from m2omni_jax.inference.sampling import GREEDY, SamplingParams
from m2omni_jax.inference.streaming import HeadSegment
from m2omni_jax.models.omni import audio_enabled
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig

_DEFAULT = SamplingParams()
DEFAULT_MAX_NEW_TOKENS = 256  # when --max_new_tokens=0, and the context has room

flags.DEFINE_string("prompt", None, "The user's message.")
flags.DEFINE_string("system", "", "An optional system message.")
flags.DEFINE_multi_string("image", [], "An image file (PNG, JPEG, ...) for an <image> placeholder; repeatable.")
flags.DEFINE_multi_string("audio", [], "An audio file (WAV; FLAC, OGG with soundfile) for an <audio> placeholder; "
                          "repeatable.")
flags.DEFINE_integer("max_new_tokens", 0, f"Most tokens generated; 0: {DEFAULT_MAX_NEW_TOKENS}, or what fits "
                     "in config.data.seq_len after the prompt.")
flags.DEFINE_float("temperature", _DEFAULT.temperature, "Sampling temperature (0: greedy).")
flags.DEFINE_float("top_p", _DEFAULT.top_p, "Nucleus sampling mass (1: off).")
flags.DEFINE_integer("top_k", _DEFAULT.top_k, "Sample among the k most likely tokens (0: off).")
flags.DEFINE_float("repetition_penalty", _DEFAULT.repetition_penalty, "CTRL repetition penalty (1: off).")
flags.DEFINE_bool("greedy", False, "Argmax decoding (ignores the sampling flags).")
flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling.")
flags.DEFINE_string("out_dir", None, "Folder for generated images (PNG) and speech (WAV); default: workdir/outputs.")
FLAGS = flags.FLAGS


def load_generator(config, workdir: str, *, mesh=None, rules=None) -> Generator:
    """A `Generator` with the parameters of the latest checkpoint in `workdir/checkpoints`
    (parameters only: no optimizer state is read), sharded by the config's mesh and rules."""
    config = RunConfig.of(config)
    rules = tuple(rules or config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    if audio_enabled(config):  # the CMVN statistics the run was trained with
        config = media.with_cmvn(config, workdir, compute=False)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    model = build.build_model(config, tokenizer)
    params, _ = build.restore_params(config, workdir, model, mesh, rules)
    return Generator(model, params, tokenizer, config, mesh=mesh, rules=rules)


def conversation(prompt: str, images=(), audio=(), system: str = "") -> dict:
    """The record of one user turn; each file is read once here, so a bad one is a
    `ConfigError` naming its flag."""
    for flag, paths, load in (("image", images, records.load_image), ("audio", audio, records.load_audio)):
        for path in paths:
            check_file(flag, path, load)
    content = prompt
    if not media.PLACEHOLDER.search(prompt):
        content = "<image>" * len(images) + "<audio>" * len(audio) + prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    # Paths, not waveforms: each audio file keeps its own sample rate.
    return {"messages": messages, "images": [records.load_image(p) for p in images], "audio": list(audio)}


def check_file(flag: str, path: str, load, label: str | None = None) -> None:
    """Raises a `ConfigError` starting with `label` (default `--flag=path`) if `load` cannot read `path`."""
    label = label or f"--{flag}={path}"
    if not os.path.isfile(path):
        raise faults.ConfigError(f"{label}: no such file")
    if not os.access(path, os.R_OK):
        raise faults.ConfigError(f"{label}: not readable (permissions)")
    try:
        load(path)
    except (OSError, ValueError, RuntimeError) as e:  # Pillow / wave / soundfile: not a format they read
        message = " ".join(str(e).split())
        raise faults.ConfigError(f"{label}: unsupported or damaged {flag} file ({message})") from e


def sampling_from_flags() -> SamplingParams:
    if FLAGS.greedy:
        return GREEDY
    try:
        return SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.repetition_penalty)
    except ValueError as e:
        raise faults.ConfigError(f"--{e}") from e  # the message starts with the field, as the flag


def generate_reply(generator: Generator, record: dict, sampling: SamplingParams, max_new_tokens: int, seed: int,
                   out=None, out_dir: str | None = None) -> str:
    """Writes the reply to `out` as it arrives and returns its text; a conversation the model
    cannot take (too long, media it cannot read) is a `ConfigError`. What an output head
    makes is saved under `out_dir` (when given) and its path written in the text's place."""
    try:
        if not max_new_tokens:  # as many as fit, up to the default
            length = len(generator.prompt(record)["ids"])
            if length > generator.max_len:
                raise ValueError(f"the prompt is {length} tokens (chat template and media placeholders included), "
                                 f"more than the model's context, config.data.seq_len={generator.max_len}: shorten it")
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, generator.max_len - length + 1)
        stream = generator.generate_stream(record, sampling, max_new_tokens=max_new_tokens, seed=seed)
    except (ValueError, OSError) as e:
        raise faults.ConfigError(str(e)) from e
    out = out or sys.stdout
    text, pieces = [], []  # pieces: a streaming head's outputs of the span still open
    for segment in stream:
        piece = segment.text
        if isinstance(segment, HeadSegment) and not segment.final:
            pieces.append(segment.output)
            continue
        if isinstance(segment, HeadSegment):
            if pieces:  # a streamed utterance: one WAV of its chunks joined
                segment = dataclasses.replace(segment, output=np.concatenate(pieces + [segment.output]))
                pieces = []
            saved = save_head_output(segment, out_dir) if out_dir else type(segment.output).__name__
            piece = f"\n[{segment.kind}: {saved}]\n"
        text.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(text)


def save_head_output(segment: HeadSegment, out_dir: str, sample_rate: int = records.DEFAULT_SAMPLE_RATE) -> str:
    """Writes an image head's (H, W, 3) uint8 array as PNG, a speech head's waveform (or
    (waveform, sample_rate)) as 16-bit WAV, to a fresh numbered file in `out_dir`; its path."""
    directory = epath.Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    index = len(list(directory.glob(f"{segment.kind}_*")))
    buffer = io.BytesIO()
    if segment.kind == "image":
        path = directory / f"image_{index:03d}.png"
        Image.fromarray(np.asarray(segment.output, np.uint8)).save(buffer, format="PNG")
    else:
        wave, rate = segment.output if isinstance(segment.output, tuple) else (segment.output, sample_rate)
        path = directory / f"audio_{index:03d}.wav"
        pcm = (np.clip(np.asarray(wave, np.float32).reshape(-1), -1, 1) * 32767).astype("<i2")
        with wave_lib.open(buffer, "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(int(rate)), f.writeframes(pcm.tobytes())
    path.write_bytes(buffer.getvalue())
    return str(path)


def generate(config, workdir: str) -> str:
    if FLAGS.prompt is None:
        raise faults.ConfigError("--prompt is required")
    sampling = sampling_from_flags()
    if FLAGS.max_new_tokens < 0:
        raise faults.ConfigError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 0 (0: as many as fit)")
    record = conversation(FLAGS.prompt, FLAGS.image, FLAGS.audio, FLAGS.system)
    generator = load_generator(config, workdir)
    out_dir = FLAGS.out_dir or str(epath.Path(workdir) / "outputs")
    return generate_reply(generator, record, sampling, FLAGS.max_new_tokens, FLAGS.seed, out_dir=out_dir)


def run():
    cli.run(generate, "m2omni-generate", quiet=True)


if __name__ == "__main__":
    run()

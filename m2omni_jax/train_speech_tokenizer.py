"""Trains the speech tokenizer (FSQ inside a SAN-M ASR encoder, CTC) and then the flow-matching
token-to-mel decoder on its codes; evaluates the resynthesis.

    m2omni-train-speech-tokenizer --config=configs/experiments/speech_tokenizer_tiny.py --workdir=/tmp/speech_tok

Data: every clip of the configured sources' audio parts (`config.data.sources`) that has a
transcript at `speech_tokenizer.transcript_key` (a dotted path into the record, mapped over
lists: "transcripts" for a per-clip list, "attributes.voices.text" for the built-in speech).
Features: `data/audio.py`'s 80-bin fbank with global CMVN (`<workdir>/cmvn.json`) for the
tokenizer; `models/vocoder.py`'s log-mel (50 frames/s) as the decoder's target.

Stages, each the one training `Loop` (training/loop.py) with its own step function and a
step-indexed batch source (batch i is a function of the seed and i, so resume is exact):
  1. `<workdir>/tokenizer`: CTC loss (models/speech_tokenizer.py); at the end its ASR on the
     held-out clips (character and word error rate) -> `tokenizer_eval.json`.
  2. `<workdir>/decoder` (when speech_tokenizer.decoder.steps > 0): conditional flow matching
     from the tokenizer's codes of each training clip to its mel (models/speech_decoder.py).
  3. `<workdir>/speech_eval.json` and `<workdir>/wavs/`: held-out clips tokenized, decoded to
     mel, Griffin-Lim, then the tokenizer's own ASR (WER) and the mel-cepstral distortion
     against the reference (`vocoder.evaluate_tts`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from m2omni_jax import cli, workdir as workdir_lib
from m2omni_jax.config_fields import dataclass_from_config, replace
from m2omni_jax.data import audio as audio_frontend, audio_tokens, pipeline, records as records_lib, sources
from m2omni_jax.models import speech_decoder as sd, vocoder
from m2omni_jax.models.speech_tokenizer import (SpeechTokenizer, SpeechTokenizerConfig, ctc_loss, greedy_ctc,
                                                normalize_text, text_to_labels)
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import loop as loop_lib, optimizers, train_step


BUCKET_SECONDS = 2  # batches are padded to a multiple of this: few shapes, little padding


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage's run: steps, batch and optimiser; `model` the model's fields."""
    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 50
    checkpoint_every: int = 1000
    model: Mapping = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SpeechTokenizerRun:
    tokenizer: StageConfig
    decoder: StageConfig
    transcript_key: str = "transcripts"
    max_seconds: float = 8.5  # clips are cut to this (and padded to it in a batch)
    num_train_clips: int = 3000
    num_eval_clips: int = 100
    cmvn_clips: int = 500
    eval_wavs: int = 4  # resynthesised held-out clips written to <workdir>/wavs
    euler_steps: int = 10
    guidance_scale: float = 1.0
    griffin_lim_iters: int = 32
    # What m2omni-generate / m2omni-eval speak through (models/vocoder.py `select`): "griffin_lim",
    # or "hifigan" with the m2omni-train-vocoder run at vocoder_workdir.
    vocoder: str = "griffin_lim"
    vocoder_workdir: str = ""

    @classmethod
    def of(cls, config) -> "SpeechTokenizerRun":
        section = dict(RunConfig.of(config).section("speech_tokenizer"))
        stages = {k: dataclass_from_config(StageConfig, section.pop(k, {}), f"speech_tokenizer.{k}")
                  for k in ("tokenizer", "decoder")}
        return dataclass_from_config(cls, section, "speech_tokenizer", **stages)


# ----------------------------------------------------------------------------- data


def transcripts_at(record: dict, key: str) -> list:
    """The values at dotted `key`, mapped over any list on the way ([] when missing)."""
    values = [record]
    for part in key.split("."):
        values = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
        values = [v[part] for v in values if isinstance(v, Mapping) and part in v]
    return [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]


def speech_clips(config, split: str, limit: int, key: str) -> list[tuple[np.ndarray, str]]:
    """Up to `limit` (16 kHz waveform, transcript) pairs from the audio parts of `split`,
    round-robin over the parts; records whose clips and transcripts do not pair are skipped."""
    found = []
    records = sources.round_robin(sources.part_records(config, split, modalities=("audio",)))
    for record in records:
        if len(found) >= limit:
            break
        if records_lib.is_bad(record):
            continue
        texts = transcripts_at(record, key)
        if len(texts) != len(record.get("audio", [])):
            continue
        for clip, text in zip(record["audio"], texts):
            wave, rate = records_lib.load_audio(clip, int(record.get("sample_rate", audio_frontend.SAMPLE_RATE)))
            found.append((audio_frontend.resample(wave, rate), str(text)))
    if not found:
        raise ValueError(f"no audio clip with a transcript at speech_tokenizer.transcript_key={key!r} in the "
                         f"{split!r} split of config.data.sources ({sorted(config.data.sources)})")
    return found[:limit]


@dataclasses.dataclass
class ClipFeatures:
    """Padded arrays of N clips: fbank (N, F, 80) + lengths, labels (N, L) + lengths, mel (N, M, 80)."""
    fbank: np.ndarray
    fbank_lengths: np.ndarray
    labels: np.ndarray
    label_lengths: np.ndarray
    mel: np.ndarray
    mel_lengths: np.ndarray
    texts: list


def clip_features(clips, run: SpeechTokenizerRun, model_cfg: SpeechTokenizerConfig, cmvn: dict) -> ClipFeatures:
    max_samples = int(run.max_seconds * audio_frontend.SAMPLE_RATE)
    waves = [w[:max_samples] for w, _ in clips]
    fbanks = [audio_frontend.apply_cmvn(audio_frontend.fbank(w), cmvn) for w in waves]
    max_frames = audio_frontend.num_fbank_frames(max_samples)
    max_frames += -max_frames % model_cfg.frames_per_token
    fbank, fbank_lengths = audio_frontend.pad_features(fbanks, max_frames)
    labels = [text_to_labels(t, model_cfg.alphabet) for _, t in clips]
    label_array, label_lengths = audio_frontend.pad_features([np.asarray(x, np.float32)[:, None] for x in labels],
                                                             max(map(len, labels)))
    mels = [vocoder.mel_spectrogram(w) for w in waves]
    mel, mel_lengths = audio_frontend.pad_features(mels, vocoder.num_frames(max_samples))
    return ClipFeatures(fbank, fbank_lengths, label_array[..., 0].astype(np.int32), label_lengths, mel, mel_lengths,
                        [t for _, t in clips])


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 8) -> list:
    """The rows of each batch of an epoch: a permutation cut into groups of `group` batches,
    each group's rows sorted by length (batches of similar clips pad less), batch order
    shuffled; a function of (seed, epoch) only. The last partial batch is dropped."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size * group):
        rows = order[start:start + batch_size * group]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches += [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def step_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, lengths: np.ndarray,
                 time_ratio: Mapping[str, int], multiple: int):
    """`data(first_step)` for the Loop: batch i is a function of (seed, i) only (`epoch_batches`);
    arrays in `time_ratio` are cut to the batch's longest row rounded up to `multiple` units
    (times their ratio: mel frames per token), so a handful of shapes compile. Each process
    takes its share of the global batch."""
    share = batch_size // jax.process_count()
    lo = jax.process_index() * share
    per_epoch = len(epoch_batches(lengths, batch_size, seed, 0))
    if per_epoch == 0:
        raise ValueError(f"speech_tokenizer: {len(lengths)} clips make no batch of {batch_size}")

    def data(first_step: int):
        epoch, cached = None, []
        for step in itertools.count(first_step):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                cached = epoch_batches(lengths, batch_size, seed, epoch)
            rows = cached[step % per_epoch]
            units = -(-int(lengths[rows].max()) // multiple) * multiple
            batch = {k: v[rows[lo:lo + share]] for k, v in arrays.items()}
            yield {k: v[:, :units * time_ratio[k]] if k in time_ratio else v for k, v in batch.items()}
    return data


# ----------------------------------------------------------------------------- stages


def _opt(config, stage: StageConfig):
    return replace(config.opt, name="adamw", peak_lr=stage.peak_lr, warmup_steps=stage.warmup_steps,
                   weight_decay=stage.weight_decay, grad_clip=stage.grad_clip, param_groups=(),
                   lr_multipliers={}, frozen=(), decay="cosine")


def train_stage(config, workdir: str, stage: StageConfig, model, loss, arrays: Mapping[str, np.ndarray],
                inputs, data, callbacks=()):
    """Runs one stage through the Loop on `data` (step_batches); -> (state, last metrics)."""
    mesh = sharding.make_mesh(config.mesh)
    if stage.batch_size % (sharding.batch_axis_size(mesh) * jax.process_count()):
        raise ValueError(f"speech_tokenizer batch_size={stage.batch_size} must divide over the "
                         f"{sharding.batch_axis_size(mesh)} batch-axis devices and {jax.process_count()} processes")
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    shapes = {k: jax.ShapeDtypeStruct((stage.batch_size,) + v.shape[1:], v.dtype) for k, v in arrays.items()}
    opt = _opt(config, stage)
    tx = optimizers.make_optimizer(opt, stage.steps, nn.unbox(train_step.abstract_boxed_params(model, shapes, inputs)))
    state, _, shardings = train_step.create_train_state(model, tx, mesh, rules, shapes, config.seed, inputs=inputs)
    options = loop_lib.LoopOptions(steps=stage.steps, log_every=stage.log_every,
                                   checkpoint_every=stage.checkpoint_every,
                                   max_nonfinite_steps=int(config.train.max_nonfinite_steps))
    loop = loop_lib.Loop(train_step.jit_loss_step(loss, mesh, rules, shardings, {k: v.ndim for k, v in arrays.items()}),
                         data, options, workdir,
                         to_global=lambda local: pipeline.make_global_batch(local, mesh),
                         schedule=optimizers.make_schedule_from_config(opt, stage.steps), callbacks=callbacks)
    return loop.run(state)


def tokenizer_arrays(feats: ClipFeatures) -> dict:
    return {"fbank": feats.fbank, "fbank_lengths": feats.fbank_lengths, "labels": feats.labels,
            "label_lengths": feats.label_lengths}


def tokenizer_inputs(batch) -> dict:
    return {"fbank": batch["fbank"], "lengths": batch["fbank_lengths"]}


def transcribe(model: SpeechTokenizer, params, fbank, lengths, batch_size: int = 16) -> list[str]:
    """The tokenizer's own ASR (greedy CTC) of CMVN'd fbank rows."""
    apply = _jitted_apply(model)
    texts = []
    for i in range(0, len(fbank), batch_size):
        out = apply(params, fbank[i:i + batch_size], lengths[i:i + batch_size])
        texts += greedy_ctc(out["logits"], out["logit_mask"], model.config.alphabet)
    return texts


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(lambda params, fbank, lengths: model.apply(params, fbank, lengths))


def asr_error_rates(references, hypotheses, alphabet: str) -> dict:
    import jiwer

    refs = [normalize_text(r, alphabet) for r in references]
    hyps = [normalize_text(h, alphabet) for h in hypotheses]
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


class TokenizerEval(loop_lib.Callback):
    """At the end: the tokenizer's ASR on held-out clips, tokens/s -> tokenizer_eval.json."""

    def __init__(self, model, feats: ClipFeatures, workdir: str):
        self.model, self.feats, self.workdir = model, feats, workdir

    def finish(self, state) -> dict:
        params = {"params": jax.device_get(state.params)}
        hyps = transcribe(self.model, params, self.feats.fbank, self.feats.fbank_lengths)
        result = dict(asr_error_rates(self.feats.texts, hyps, self.model.config.alphabet),
                      tokens_per_second=self.model.config.tokens_per_second,
                      codebook_size=self.model.config.codebook_size, num_clips=len(hyps), step=int(state.step),
                      examples=[{"reference": r, "hypothesis": h} for r, h in list(zip(self.feats.texts, hyps))[:5]])
        workdir_lib.path(self.workdir, "tokenizer_eval.json").write_text(json.dumps(result, indent=2))
        logging.info("tokenizer ASR on %d held-out clips: CER %.3f, WER %.3f", len(hyps), result["cer"], result["wer"])
        return {"tokenizer_cer": result["cer"], "tokenizer_wer": result["wer"]}


def encode_clips(model: SpeechTokenizer, params, fbank, lengths, batch_size: int = 32):
    """Codes (N, T) and token masks of CMVN'd fbank rows."""
    encode = jax.jit(lambda p, f, n: model.apply(p, f, n, method=SpeechTokenizer.encode))
    parts = [jax.device_get(encode(params, fbank[i:i + batch_size], lengths[i:i + batch_size]))
             for i in range(0, len(fbank), batch_size)]
    return np.concatenate([c for c, _ in parts]), np.concatenate([m for _, m in parts])


def decoder_arrays(codes, token_mask, mel, ratio: int) -> dict:
    """Tokens and their mel, cut or zero-padded to `ratio` frames per token."""
    frames = codes.shape[1] * ratio
    mel = np.pad(mel, ((0, 0), (0, max(0, frames - mel.shape[1])), (0, 0)))[:, :frames]
    return {"tokens": codes.astype(np.int32), "token_mask": token_mask.astype(bool), "mel": mel.astype(np.float32)}


def decoder_inputs(batch) -> dict:
    batch_size, num_frames = batch["mel"].shape[:2]
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return dict(tokens=batch["tokens"], token_mask=batch["token_mask"], token_start=zeros, x_t=batch["mel"],
                t=jnp.zeros((batch_size,)), cond=batch["mel"], frame_mask=jnp.ones((batch_size, num_frames), bool),
                frame_start=zeros, keep=jnp.ones((batch_size,), bool))


# ----------------------------------------------------------------------------- eval


def resynthesize(decoder, params, codes, token_mask, run: SpeechTokenizerRun, seed: int = 0) -> list[np.ndarray]:
    """Codes -> mel (flow matching, Euler) -> waveform (Griffin-Lim), each cut to its tokens."""
    sampler = jax.jit(lambda p, t, m, noise: sd.sample(decoder, p, t, noise, token_mask=m, num_steps=run.euler_steps,
                                                       guidance_scale=run.guidance_scale))
    ratio, waves = decoder.config.token_mel_ratio, []
    mel_cfg = dataclasses.replace(vocoder.MEL, griffin_lim_iters=run.griffin_lim_iters)
    for i in range(len(codes)):
        noise = jax.random.normal(jax.random.key(seed + i), (1, codes.shape[1] * ratio, decoder.config.num_mels))
        mel = np.asarray(sampler(params, codes[i:i + 1], token_mask[i:i + 1], noise))[0]
        waves.append(vocoder.griffin_lim(mel[:int(token_mask[i].sum()) * ratio], mel_cfg))
    return waves


def evaluate_resynthesis(tokenizer, tok_params, decoder, dec_params, feats: ClipFeatures, waves_ref, cmvn,
                         run: SpeechTokenizerRun, workdir: str) -> dict:
    codes, mask = encode_clips(tokenizer, tok_params, feats.fbank, feats.fbank_lengths)
    generated = resynthesize(decoder, dec_params, codes, mask, run)
    asr = functools.partial(_asr_waves, tokenizer, tok_params, cmvn)
    mel_cfg = dataclasses.replace(vocoder.MEL, griffin_lim_iters=run.griffin_lim_iters)
    result = vocoder.evaluate_tts(generated, waves_ref, feats.texts, asr, normalize=functools.partial(
        normalize_text, alphabet=tokenizer.config.alphabet))
    # Ceilings: the reference itself through the ASR, and its own mel through Griffin-Lim.
    ceiling = vocoder.evaluate_tts([vocoder.griffin_lim(vocoder.mel_spectrogram(w), mel_cfg) for w in waves_ref],
                                   waves_ref, feats.texts, asr, normalize=functools.partial(
                                       normalize_text, alphabet=tokenizer.config.alphabet))
    result = {"resynthesis": result, "griffin_lim_of_reference": ceiling,
              "reference_wer": asr_error_rates(feats.texts, asr(waves_ref), tokenizer.config.alphabet)["wer"],
              "num_clips": len(generated)}
    for i in range(min(run.eval_wavs, len(generated))):
        for name, wave in (("resynthesized", generated[i]), ("reference", waves_ref[i])):
            with workdir_lib.local_file(workdir_lib.path(workdir, "wavs", f"{i:02d}_{name}.wav")) as local:
                vocoder.write_wav(local, wave)
    workdir_lib.path(workdir, "speech_eval.json").write_text(json.dumps(result, indent=2))
    return result


def _asr_waves(model, params, cmvn, waves) -> list[str]:
    fbanks = [audio_frontend.apply_cmvn(audio_frontend.fbank(w), cmvn) for w in waves]
    frames = max(len(f) for f in fbanks)
    fbank, lengths = audio_frontend.pad_features(fbanks, frames + (-frames % model.config.frames_per_token))
    return transcribe(model, params, fbank, lengths)


# ----------------------------------------------------------------------------- command


def train(config, workdir: str) -> dict:
    """Both stages and the evaluation; resumes each stage from its checkpoint."""
    config = RunConfig.of(config)
    run = SpeechTokenizerRun.of(config)
    tok_cfg = SpeechTokenizerConfig.from_config(run.tokenizer.model)
    workdir_lib.prepare(workdir)  # a local path or a gs:// URL: every file below goes through epath
    train_clips = speech_clips(config, "train", run.num_train_clips, run.transcript_key)
    eval_clips = speech_clips(config, "eval", run.num_eval_clips, run.transcript_key)
    cmvn_path = workdir_lib.path(workdir, "cmvn.json")
    if not cmvn_path.exists():
        audio_frontend.save_cmvn(cmvn_path, audio_frontend.compute_cmvn_stats(
            [audio_frontend.fbank(w) for w, _ in train_clips[:run.cmvn_clips]]))
    cmvn = audio_frontend.load_cmvn(cmvn_path)
    train_feats = clip_features(train_clips, run, tok_cfg, cmvn)
    eval_feats = clip_features(eval_clips, run, tok_cfg, cmvn)
    logging.info("%d training clips, %d held-out clips", len(train_clips), len(eval_clips))

    tokenizer = SpeechTokenizer(tok_cfg)
    tok_dir = os.fspath(workdir_lib.path(workdir, "tokenizer"))
    arrays = tokenizer_arrays(train_feats)
    data = step_batches(arrays, run.tokenizer.batch_size, int(config.seed), train_feats.fbank_lengths,
                        {"fbank": 1}, multiple=BUCKET_SECONDS * 100)
    tok_state, metrics = train_stage(
        config, tok_dir, run.tokenizer, tokenizer, lambda p, b, rng: ctc_loss(tokenizer, {"params": p}, b),
        arrays, tokenizer_inputs, data, [TokenizerEval(tokenizer, eval_feats, tok_dir)])
    result = {"tokenizer": metrics}
    if run.decoder.steps <= 0:
        return result
    tok_params = {"params": jax.device_get(tok_state.params)}
    decoder = sd.SpeechDecoder(sd.SpeechDecoderConfig.from_config(dict(run.decoder.model,
                                                                       codebook_size=tok_cfg.codebook_size)))
    codes, mask = encode_clips(tokenizer, tok_params, train_feats.fbank, train_feats.fbank_lengths)
    ratio = decoder.config.token_mel_ratio
    arrays = decoder_arrays(codes, mask, train_feats.mel, ratio)
    data = step_batches(arrays, run.decoder.batch_size, int(config.seed), mask.sum(1),
                        {"tokens": 1, "token_mask": 1, "mel": ratio},
                        multiple=int(BUCKET_SECONDS * tok_cfg.tokens_per_second))
    dec_state, dec_metrics = train_stage(
        config, os.fspath(workdir_lib.path(workdir, "decoder")), run.decoder, decoder,
        lambda p, b, rng: sd.flow_matching_loss(decoder, {"params": p}, b, rng), arrays, decoder_inputs, data)
    result["decoder"] = dec_metrics
    result["eval"] = evaluate_resynthesis(tokenizer, tok_params, decoder, {"params": jax.device_get(dec_state.params)},
                                          eval_feats, [w[:int(run.max_seconds * audio_frontend.SAMPLE_RATE)]
                                                       for w, _ in eval_clips], cmvn, run, workdir)
    logging.info("resynthesis: %s", json.dumps(result["eval"]))
    return result


def load_tokenizer(workdir: str, config) -> audio_tokens.SpeechCodes:
    """The trained tokenizer of `workdir` (its latest checkpoint and cmvn.json) as a
    waveform -> codes function."""
    run = SpeechTokenizerRun.of(config)
    return audio_tokens.SpeechCodes.restore(os.fspath(workdir_lib.path(workdir, "tokenizer", "checkpoints")),
                                            SpeechTokenizerConfig.from_config(run.tokenizer.model),
                                            os.fspath(workdir_lib.path(workdir, "cmvn.json")))


def run():
    cli.run(train, "m2omni-train-speech-tokenizer")


if __name__ == "__main__":
    run()

"""Trains the HiFi-GAN vocoder (models/hifigan.py) on the configured speech; evaluates it
against Griffin-Lim.

    m2omni-train-vocoder --config=configs/experiments/hifigan_tiny.py --workdir=/tmp/hifigan

Data: every clip of the audio parts of `config.data.sources` (the built-in eSpeak speech in
the tiny configs), 16 kHz, its `vocoder.mel_spectrogram`; a batch is `batch_size` random
segments of `segment_frames` mel frames and their samples [s·hop, (s + frames)·hop), a
function of the seed and the step (resume is exact).

Step: HiFi-GAN's order. The generator's output ŷ once; the discriminators step on (y, ŷ);
then the generator steps on its loss against the updated discriminators (gradient through
ŷ by the generator's VJP). Two AdamW optimisers (the paper's β = 0.8, 0.99, learning rate
× `lr_decay` every `lr_decay_steps`), one Orbax-checkpointed state: params and optimiser
states {"generator", "discriminator"}. Until `adversarial_from` the generator trains on the
mel loss alone.

At the end: `<workdir>/vocoder_eval.json`, the mel-cepstral distortion against the
recording of held-out clips vocoded from their own mel by the generator and by Griffin-Lim,
and `<workdir>/wavs/`. `<workdir>/hifigan.json` is the model config `hifigan.load` reads.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax import cli, workdir as workdir_lib
from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.data import audio as audio_frontend, pipeline, records as records_lib, sources
from m2omni_jax.models import hifigan, vocoder
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import loop as loop_lib, train_step


@dataclasses.dataclass(frozen=True)
class VocoderRun:
    """`config.hifigan`: the run; `model` the HifiGanConfig fields."""
    steps: int
    batch_size: int
    segment_frames: int = 32  # mel frames per training segment (32: 0.64 s)
    peak_lr: float = 2e-4
    lr_decay: float = 0.999  # the learning rate × this every lr_decay_steps (the paper: per epoch)
    lr_decay_steps: int = 100
    adversarial_from: int = 0  # steps of mel-only generator training first
    num_train_clips: int = 3000
    num_eval_clips: int = 8
    eval_wavs: int = 4
    griffin_lim_iters: int = 32  # the baseline's
    log_every: int = 50
    checkpoint_every: int = 500
    model: Mapping = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, config) -> "VocoderRun":
        return dataclass_from_config(cls, RunConfig.of(config).section("hifigan"), "hifigan")


# ----------------------------------------------------------------------------- data


def speech_waves(config, split: str, limit: int) -> list[np.ndarray]:
    """Up to `limit` 16 kHz waveforms: the clips of the audio parts of `split`, round-robin."""
    found = []
    for record in sources.round_robin(sources.part_records(config, split, modalities=("audio",))):
        if len(found) >= limit:
            break
        if records_lib.is_bad(record):
            continue
        for clip in record.get("audio", []):
            wave, rate = records_lib.load_audio(clip, int(record.get("sample_rate", audio_frontend.SAMPLE_RATE)))
            found.append(audio_frontend.resample(wave, rate))
    if not found:
        raise ValueError(f"no audio clip in the {split!r} split of config.data.sources ({sorted(config.data.sources)})")
    return found[:limit]


def segment_batches(waves, mels, batch_size: int, frames: int, hop: int, seed: int):
    """`data(first_step)` for the Loop: batch i is `batch_size` random (clip, start) segments
    drawn from (seed, i) alone; clips shorter than `frames` frames are left out. Each process
    takes its share of the global batch."""
    usable = [i for i, m in enumerate(mels) if len(m) >= frames]
    if not usable:
        raise ValueError(f"hifigan.segment_frames={frames}: no clip is that long")
    share = batch_size // jax.process_count()
    lo = jax.process_index() * share

    def data(first_step: int):
        step = first_step
        while True:
            rng = np.random.default_rng([seed, step])
            rows = rng.choice(usable, batch_size)[lo:lo + share]
            starts = [int(rng.integers(0, len(mels[i]) - frames + 1)) for i in rows]
            mel = np.stack([mels[i][s:s + frames] for i, s in zip(rows, starts)])
            wave = np.stack([np.pad(waves[i], (0, len(mels[i]) * hop))[s * hop:(s + frames) * hop]
                             for i, s in zip(rows, starts)])
            yield {"mel": mel.astype(np.float32), "wave": wave.astype(np.float32)}
            step += 1
    return data


# ----------------------------------------------------------------------------- step


def two_optimizers(generator: optax.GradientTransformation,
                   discriminator: optax.GradientTransformation) -> optax.GradientTransformation:
    """One transformation over {"generator", "discriminator"} params, each part its own optimiser
    (the step below updates the parts one after the other with the halves)."""
    parts = {"generator": generator, "discriminator": discriminator}

    def init(params):
        return {k: tx.init(params[k]) for k, tx in parts.items()}

    def update(updates, state, params=None):
        out = {k: tx.update(updates[k], state[k], None if params is None else params[k]) for k, tx in parts.items()}
        return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}
    return optax.GradientTransformation(init, update)


def make_optimizer(run: VocoderRun) -> tuple[optax.GradientTransformation, ...]:
    schedule = optax.exponential_decay(run.peak_lr, run.lr_decay_steps, run.lr_decay, staircase=True)
    g, d = (optax.adamw(schedule, b1=0.8, b2=0.99, weight_decay=0.01) for _ in range(2))
    return two_optimizers(g, d), g, d, schedule


def gan_step(state: train_step.TrainState, batch, *, config: hifigan.HifiGanConfig, tx_g, tx_d,
             adversarial_from: int, mel_config=vocoder.MEL):
    """One discriminator step, then one generator step (see the module docstring)."""
    generator, discriminator = hifigan.Generator(config), hifigan.Discriminator(config)
    params, opt_state = state.params, state.opt_state
    fake, pull_back = jax.vjp(lambda g: generator.apply({"params": g}, batch["mel"]), params["generator"])

    (d_value, d_metrics), d_grads = jax.value_and_grad(hifigan.d_loss, argnums=1, has_aux=True)(
        discriminator, params["discriminator"], batch["wave"], jax.lax.stop_gradient(fake))
    d_updates, d_opt = tx_d.update(d_grads, opt_state["discriminator"], params["discriminator"])
    d_params = optax.apply_updates(params["discriminator"], d_updates)

    weight = (state.step >= adversarial_from).astype(jnp.float32)
    (g_value, g_metrics), fake_grad = jax.value_and_grad(hifigan.g_loss, argnums=3, has_aux=True)(
        discriminator, d_params, batch["wave"], fake, mel_config, weight)
    (g_grads,) = pull_back(fake_grad)
    g_updates, g_opt = tx_g.update(g_grads, opt_state["generator"], params["generator"])
    params = {"generator": optax.apply_updates(params["generator"], g_updates), "discriminator": d_params}
    metrics = dict(d_metrics, **g_metrics, loss=g_value + d_value, grad_norm=optax.global_norm((g_grads, d_grads)),
                   g_grad_norm=optax.global_norm(g_grads), d_grad_norm=optax.global_norm(d_grads))
    return state.replace(step=state.step + 1, params=params,
                         opt_state={"generator": g_opt, "discriminator": d_opt}), metrics


def jit_gan_step(step, mesh, rules, shardings):
    """`step` jitted with explicit shardings, the state donated, non-finite steps skipped."""
    in_batch = {k: sharding.batch_sharding(mesh, n) for k, n in (("mel", 3), ("wave", 2))}
    jitted = jax.jit(train_step.skip_nonfinite(step), in_shardings=(shardings, in_batch),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run


def batch_shapes(run: VocoderRun, config: hifigan.HifiGanConfig) -> dict:
    frames = run.segment_frames
    return {"mel": jax.ShapeDtypeStruct((run.batch_size, frames, config.num_mels), jnp.float32),
            "wave": jax.ShapeDtypeStruct((run.batch_size, frames * config.hop_length), jnp.float32)}


def create_state(model_config: hifigan.HifiGanConfig, run: VocoderRun, mesh, rules, seed: int):
    """(state, shardings, tx_g, tx_d, schedule): both networks initialised into their shardings."""
    tx, tx_g, tx_d, schedule = make_optimizer(run)
    state, _, shardings = train_step.create_train_state(hifigan.HifiGan(model_config), tx, mesh, rules,
                                                        batch_shapes(run, model_config), seed,
                                                        inputs=lambda b: {"mel": b["mel"], "wave": b["wave"]})
    return state, shardings, tx_g, tx_d, schedule


# ----------------------------------------------------------------------------- eval


class VocoderEval(loop_lib.Callback):
    """At the end: MCD of the generator and of Griffin-Lim on held-out clips -> vocoder_eval.json."""

    def __init__(self, config: hifigan.HifiGanConfig, waves, run: VocoderRun, workdir: str):
        self.config, self.waves, self.run, self.workdir = config, waves, run, workdir

    def finish(self, state) -> dict:
        result = evaluate(hifigan.HifiGanVocoder(self.config, jax.device_get(state.params["generator"])),
                          self.waves, self.run.griffin_lim_iters, self.run.eval_wavs, self.workdir)
        result["step"] = int(state.step)
        workdir_lib.path(self.workdir, "vocoder_eval.json").write_text(json.dumps(result, indent=2))
        logging.info("vocoder MCD on %d held-out clips: HiFi-GAN %.2f dB, Griffin-Lim %.2f dB", result["num_clips"],
                     result["hifigan_mcd_db"], result["griffin_lim_mcd_db"])
        return {"hifigan_mcd_db": result["hifigan_mcd_db"], "griffin_lim_mcd_db": result["griffin_lim_mcd_db"]}


def evaluate(generator: hifigan.HifiGanVocoder, waves, griffin_lim_iters: int, num_wavs: int, workdir: str) -> dict:
    """Each clip's mel vocoded by the generator and by Griffin-Lim, scored against the clip."""
    mel_cfg = dataclasses.replace(vocoder.MEL, griffin_lim_iters=griffin_lim_iters)
    scores = {"hifigan": [], "griffin_lim": []}
    for i, wave in enumerate(waves):
        mel = vocoder.mel_spectrogram(wave)
        made = {"hifigan": generator(mel), "griffin_lim": vocoder.griffin_lim(mel, mel_cfg)}
        for name, out in made.items():
            scores[name].append(vocoder.mel_cepstral_distortion(wave, out))
        for name, out in (list(made.items()) + [("reference", wave)] if i < num_wavs else []):
            with workdir_lib.local_file(workdir_lib.path(workdir, "wavs", f"{i:02d}_{name}.wav")) as local:
                vocoder.write_wav(local, out)
    return {"hifigan_mcd_db": float(np.mean(scores["hifigan"])),
            "griffin_lim_mcd_db": float(np.mean(scores["griffin_lim"])),
            "per_clip": {k: [round(v, 3) for v in vs] for k, vs in scores.items()},
            "num_clips": len(waves), "griffin_lim_iters": griffin_lim_iters}


# ----------------------------------------------------------------------------- command


def train(config, workdir: str) -> dict:
    """Trains (resuming from `<workdir>/checkpoints`), then evaluates."""
    config = RunConfig.of(config)
    run = VocoderRun.of(config)
    model_config = hifigan.HifiGanConfig.from_config(run.model)
    if model_config.hop_length != vocoder.MEL.hop_length or model_config.num_mels != vocoder.MEL.num_mels:
        raise ValueError(f"hifigan.model upsample_rates {model_config.upsample_rates} (hop "
                         f"{model_config.hop_length}) and num_mels {model_config.num_mels} must match the mel's hop "
                         f"{vocoder.MEL.hop_length} and {vocoder.MEL.num_mels} bins")
    workdir_lib.prepare(workdir)
    workdir_lib.path(workdir, hifigan.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_config)))
    mesh = sharding.make_mesh(config.mesh)
    if run.batch_size % (sharding.batch_axis_size(mesh) * jax.process_count()):
        raise ValueError(f"hifigan.batch_size={run.batch_size} must divide over the {sharding.batch_axis_size(mesh)} "
                         f"batch-axis devices and {jax.process_count()} processes")
    waves = speech_waves(config, "train", run.num_train_clips)
    eval_waves = speech_waves(config, "eval", run.num_eval_clips)
    logging.info("%d training clips, %d held-out clips", len(waves), len(eval_waves))
    data = segment_batches(waves, [vocoder.mel_spectrogram(w) for w in waves], run.batch_size, run.segment_frames,
                           model_config.hop_length, int(config.seed))
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    state, shardings, tx_g, tx_d, schedule = create_state(model_config, run, mesh, rules, int(config.seed))
    step = functools.partial(gan_step, config=model_config, tx_g=tx_g, tx_d=tx_d,
                             adversarial_from=run.adversarial_from)
    options = loop_lib.LoopOptions(steps=run.steps, log_every=run.log_every, checkpoint_every=run.checkpoint_every,
                                   max_nonfinite_steps=int(config.train.max_nonfinite_steps))
    loop = loop_lib.Loop(jit_gan_step(step, mesh, rules, shardings), data, options, workdir,
                         to_global=lambda local: pipeline.make_global_batch(local, mesh), schedule=schedule,
                         callbacks=[VocoderEval(model_config, eval_waves, run, workdir)])
    _, metrics = loop.run(state)
    return metrics


def run():
    cli.run(train, "m2omni-train-vocoder")


if __name__ == "__main__":
    run()

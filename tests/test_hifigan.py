import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax import train_vocoder
from m2omni_jax.config_fields import ConfigError
from m2omni_jax.models import hifigan, vocoder
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step

# Hop 16 (4·4), 16 mel bins over a 128-point STFT: the real structure at a few thousand parameters.
CONFIG = hifigan.HifiGanConfig(
    num_mels=16, upsample_rates=(4, 4), upsample_kernels=(8, 8), initial_channels=16, resblock_kernels=(3, 5),
    resblock_dilations=((1, 2), (1, 3)), periods=(2, 3), period_channels=(4, 8), num_scales=2,
    scale_channels=(8, 8, 8), scale_groups=(1, 4, 1))
MEL = vocoder.MelConfig(n_fft=128, win_length=128, hop_length=16, num_mels=16)
RUN = train_vocoder.VocoderRun(steps=1, batch_size=2, segment_frames=8, peak_lr=2e-3)


def _mel(batch, frames, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, frames, CONFIG.num_mels)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _generator_params():
    return jax.jit(hifigan.Generator(CONFIG).init)(jax.random.key(0), jnp.zeros((1, 4, CONFIG.num_mels)))


@functools.lru_cache(maxsize=None)
def _generate():
    return jax.jit(lambda p, mel: hifigan.Generator(CONFIG).apply(p, mel))


def test_generator_output_is_frames_times_hop():
    assert hifigan.HifiGanConfig().hop_length == vocoder.MEL.hop_length  # the default fits the speech mel
    wave = _generate()(_generator_params(), _mel(2, 5))
    assert wave.shape == (2, 5 * CONFIG.hop_length) and wave.dtype == jnp.float32
    assert np.abs(wave).max() <= 1.0 and np.abs(wave).max() > 0
    with pytest.raises(ValueError, match="upsample_kernels"):
        hifigan.HifiGanConfig(upsample_kernels=(21, 16, 8))  # 21 - 10 is odd: not exactly 10× longer


def test_discriminator_scores_and_feature_maps():
    length = 96
    wave = np.random.default_rng(1).uniform(-1, 1, (2, length)).astype(np.float32)
    model = hifigan.Discriminator(CONFIG)
    outputs = jax.jit(lambda w: model.apply(model.init(jax.random.key(1), w), w))(wave)
    assert len(outputs) == len(CONFIG.periods) + CONFIG.num_scales
    conv = lambda n, stride, kernel=5: (n + 2 * (kernel // 2) - kernel) // stride + 1  # noqa: E731
    for (scores, maps), period in zip(outputs, CONFIG.periods):
        rows = [-(-length // period)]
        for _ in CONFIG.period_channels:
            rows.append(conv(rows[-1], 3))
        channels = CONFIG.period_channels + (CONFIG.period_channels[-1], 1)
        rows = rows[1:] + [rows[-1], rows[-1]]
        assert [m.shape for m in maps] == [(2, r, period, c) for r, c in zip(rows, channels)]
        assert scores.shape == (2, rows[-1] * period)
    for i, (scores, maps) in enumerate(outputs[len(CONFIG.periods):]):
        n = length if i == 0 else (length + 4 - 4) // 2 + 1  # AvgPool(4, 2, pad 2)
        lengths = [conv(n, 1, 15), conv(conv(n, 1, 15), 2, 41)]
        lengths += [lengths[-1], lengths[-1]]  # the last layer (5 taps) and conv_post keep the length
        assert [m.shape for m in maps] == [(2, t, c) for t, c in zip(lengths, CONFIG.scale_channels + (1,))]
        assert scores.shape == (2, lengths[-1])


def test_log_mel_is_the_speech_mel_and_differentiable():
    t = np.arange(8000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(2).normal(size=t.shape)).astype(
        np.float32)
    got = np.asarray(hifigan.log_mel(jnp.asarray(wave)[None], vocoder.MEL))[0]
    np.testing.assert_allclose(got, vocoder.mel_spectrogram(wave), atol=2e-4)
    grad = jax.grad(lambda w: hifigan.log_mel(w, vocoder.MEL).sum())(jnp.zeros((1, 640)))
    assert np.isfinite(grad).all()  # silence: the magnitude's square root has a finite gradient


def test_losses_by_hand():
    real, fake = [jnp.array([[1.0, 0.5]])], [jnp.array([[0.0, 1.0]])]
    assert float(hifigan.discriminator_loss(real, fake)) == pytest.approx(0.125 + 0.5)
    assert float(hifigan.adversarial_loss(fake)) == pytest.approx(0.5)
    maps = [[jnp.ones((1, 2)), jnp.zeros((1, 3))]]
    assert float(hifigan.feature_matching_loss(maps, [[jnp.zeros((1, 2)), jnp.full((1, 3), 2.0)]])) == 3.0


def _batch(seed=3):
    rng = np.random.default_rng(seed)
    t = np.arange(RUN.segment_frames * CONFIG.hop_length) / 16000
    wave = np.stack([0.5 * np.sin(2 * np.pi * f * t) for f in (300.0, 1100.0)]).astype(np.float32)
    wave += 0.02 * rng.normal(size=wave.shape).astype(np.float32)
    mel = np.asarray(hifigan.log_mel(jnp.asarray(wave), MEL))[:, :RUN.segment_frames]
    return {"mel": mel, "wave": wave}


def test_gan_steps_train_both_networks_on_a_fixed_batch():
    config = dataclasses.replace(CONFIG, periods=(3,), num_scales=1)  # one of each discriminator: a faster compile
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    batch = _batch()
    # The train state as create_state makes it, without its sharded-init compiles (those run in training).
    tx, tx_g, tx_d, _ = train_vocoder.make_optimizer(RUN)
    params = nn.unbox(jax.jit(hifigan.HifiGan(config).init)(jax.random.key(0), batch["mel"], batch["wave"]))["params"]
    state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                  rng=jax.random.key_data(jax.random.key(1)), tx=tx)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)  # as the step returns it: one compile
    before = jax.device_get(state.params)
    step = train_vocoder.jit_gan_step(functools.partial(train_vocoder.gan_step, config=config, tx_g=tx_g, tx_d=tx_d,
                                                        adversarial_from=0, mel_config=MEL),
                                      mesh, sharding.LOGICAL_AXIS_RULES, shardings)
    history = []
    for _ in range(6):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    assert all(m["finite"] for m in history) and int(state.step) == 6
    assert history[-1]["mel_l1"] < 0.9 * history[0]["mel_l1"]
    assert history[-1]["d_loss"] < history[0]["d_loss"]
    after = jax.device_get(state.params)
    for name in ("generator", "discriminator"):
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before[name], after[name]))
        assert all(moved), name  # every parameter of both networks was updated


def test_every_param_has_known_logical_axes():
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    variables = jax.eval_shape(hifigan.HifiGan(CONFIG).init, jax.random.key(0), jnp.zeros((1, 4, 16)),
                               jnp.zeros((1, 64)))
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_sharded_generator_matches_single_device():
    params, mel = _generator_params(), _mel(4, 6, seed=4)
    expected = _generate()(nn.unbox(params), mel)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.logical_to_mesh_sharding(params, mesh)
    with sharding.activate(mesh):
        sharded = jax.device_put(params, shardings)
        got = _generate()(sharded, jax.device_put(mel, sharding.batch_sharding(mesh, 3)))
    kernel = sharded["params"]["upsample_0"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_streamed_chunks_join_to_the_one_shot_waveform():
    voc = hifigan.HifiGanVocoder(CONFIG, nn.unbox(_generator_params())["params"])
    mel = _mel(1, 40, seed=5)[0]
    one_shot = voc(mel)
    assert len(one_shot) == (len(mel) - 1) * CONFIG.hop_length  # as griffin_lim
    stream = voc.stream()
    assert stream.push(mel[:hifigan.receptive_frames(CONFIG)]).size == 0  # no frame has its look-ahead yet
    pieces = [stream.push(mel[i:i + 7]) for i in range(hifigan.receptive_frames(CONFIG), len(mel), 7)]
    joined = np.concatenate(pieces + [stream.flush()])
    np.testing.assert_allclose(joined, one_shot, atol=1e-5)


def test_select_by_config(tmp_path):
    assert isinstance(vocoder.select({}), vocoder.GriffinLimVocoder)
    assert vocoder.select({"griffin_lim_iters": 4}).config.griffin_lim_iters == 4
    with pytest.raises(ConfigError, match="config.speech_tokenizer.vocoder_workdir"):
        vocoder.select({"vocoder": "hifigan"})
    with pytest.raises(ConfigError, match="'wavenet' is not one of"):
        vocoder.select({"vocoder": "wavenet"})

    # A run's workdir: its model config and a checkpoint of the train state's params (here the generator's).
    params = nn.unbox(_generator_params())["params"]
    (tmp_path / hifigan.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(CONFIG)))
    with checkpointing.Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, {"step": np.int32(1), "params": {"generator": params}}, force=True)
    chosen = vocoder.select({"vocoder": "hifigan", "vocoder_workdir": str(tmp_path)})
    assert isinstance(chosen, hifigan.HifiGanVocoder) and chosen.config == CONFIG
    mel = _mel(1, 6)[0]
    np.testing.assert_allclose(chosen.generate(mel), _generate()({"params": params}, mel[None])[0], atol=1e-6)

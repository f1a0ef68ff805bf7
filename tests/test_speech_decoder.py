import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.models import vocoder
from m2omni_jax.models.speech_decoder import (SpeechDecoder, SpeechDecoderConfig, StreamDecoder, euler,
                                              flow_matching_loss, flow_matching_target, sample, stream)
from m2omni_jax.parallel import sharding

CONFIG = SpeechDecoderConfig(codebook_size=32, width=32, num_heads=2, mlp_dim=64, encoder_depth=1,
                             estimator_depth=2, chunk_tokens=4, lookahead_tokens=2)
R = CONFIG.token_mel_ratio


def _tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.codebook_size, (batch, length)).astype(np.int32)


def _init(model, batch, length):
    frames = length * model.config.token_mel_ratio
    zeros_b = jnp.zeros((batch,), jnp.int32)
    return model.init(jax.random.key(0), jnp.asarray(_tokens(batch, length)), jnp.ones((batch, length), bool),
                      zeros_b, jnp.zeros((batch, frames, 80)), jnp.zeros((batch,)), jnp.zeros((batch, frames, 80)),
                      jnp.ones((batch, frames), bool), zeros_b, jnp.ones((batch,), bool))


@pytest.fixture(scope="module")
def model_and_params():
    model = SpeechDecoder(CONFIG)
    return model, jax.jit(_init, static_argnums=(0, 1, 2))(model, 4, 6)


@pytest.fixture(scope="module")
def sampler(model_and_params):
    model, _ = model_and_params
    return jax.jit(lambda params, tokens, noise, prompt, scale: sample(
        model, params, tokens, noise, prompt_mel=prompt, num_steps=4, guidance_scale=scale))


def test_flow_matching_target_and_loss_on_a_hand_example(model_and_params):
    # One number by hand: x_t = (1 - 0.9·0.25)·1 + 0.25·2 = 1.275, u = 2 - 0.9·1 = 1.1.
    x_t, u = flow_matching_target(jnp.full((1, 1, 1), 2.0), jnp.ones((1, 1, 1)), jnp.array([0.25]), 0.1)
    np.testing.assert_allclose([x_t.item(), u.item()], [1.275, 1.1], rtol=1e-6)

    _, params = model_and_params
    model = SpeechDecoder(dataclasses.replace(CONFIG, cfg_dropout=0.0, prompt_prob=0.0))
    rng = np.random.default_rng(1)
    tokens, mask = _tokens(2, 6), np.arange(6)[None] < np.array([[6], [4]])
    mel, noise = rng.normal(size=(2, 2, 12, 80)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    loss, _ = flow_matching_loss(model, params, {"tokens": tokens, "token_mask": mask, "mel": mel},
                                 jax.random.key(0), t=jnp.asarray(t), noise=jnp.asarray(noise))
    x_t = (1 - (1 - CONFIG.sigma_min) * t[:, None, None]) * noise + t[:, None, None] * mel
    target = mel - (1 - CONFIG.sigma_min) * noise
    frame_mask = np.repeat(mask, R, axis=1)
    v = model.apply(params, tokens, mask, np.zeros(2, np.int32), x_t, t, np.zeros_like(mel), frame_mask,
                    np.zeros(2, np.int32), np.ones(2, bool))
    expected = ((np.asarray(v) - target) ** 2)[frame_mask].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_euler_matches_closed_form(schedule):
    a, b, steps = -1.5, 2.0, 7
    x, _ = euler(lambda x, t, i, aux: (a * x + b * t, aux), jnp.ones(3), steps, schedule)
    grid = np.linspace(0, 1, steps + 1)
    grid = 1 - np.cos(np.pi / 2 * grid) if schedule == "cosine" else grid
    ref = np.ones(3)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        ref = ref + (t1 - t0) * (a * ref + b * t0)
    np.testing.assert_allclose(x, ref, rtol=1e-5)
    fine, _ = euler(lambda x, t, i, aux: (a * x + b * t, aux), jnp.ones(()), 4000, schedule)
    exact = np.exp(a) + b * (np.exp(a) - 1 - a) / a ** 2  # x' = a x + b t, x(0) = 1
    np.testing.assert_allclose(fine, exact, rtol=2e-3)


def test_guidance_scale_one_is_conditional_and_zero_ignores_tokens(model_and_params, sampler):
    model, params = model_and_params
    tokens, prompt = _tokens(1, 6), np.random.default_rng(2).normal(size=(1, 3, 80)).astype(np.float32)
    noise = jax.random.normal(jax.random.key(3), (1, 3 + 6 * R, 80))
    conditional = sample(model, params, tokens, noise, prompt_mel=prompt, num_steps=4, guidance_scale=None)
    np.testing.assert_allclose(sampler(params, tokens, noise, prompt, 1.0), conditional, atol=1e-5)
    assert np.abs(sampler(params, tokens, noise, prompt, 2.0) - conditional).max() > 1e-2
    unconditional = sampler(params, tokens, noise, prompt, 0.0)
    np.testing.assert_allclose(sampler(params, _tokens(1, 6, seed=9), noise, prompt, 0.0), unconditional, atol=1e-5)


def test_stream_joined_equals_one_shot_and_waits_for_lookahead(model_and_params, sampler):
    model, params = model_and_params
    tokens = _tokens(1, 11)  # 2 whole chunks of 4 and a last one of 3
    prompt = np.random.default_rng(4).normal(size=(1, 5, 80)).astype(np.float32)
    noise = np.asarray(jax.random.normal(jax.random.key(5), (1, 5 + 16 * R, 80)))  # room for 16 tokens
    one_shot = np.asarray(sampler(params, tokens, noise[:, :5 + 11 * R], prompt, 1.5))

    decoder = StreamDecoder(model, params, noise, prompt_mel=prompt, num_steps=4, guidance_scale=1.5)
    assert decoder.push(tokens[:, :5]) == []  # chunk 0 needs 4 tokens + 2 of look-ahead
    chunks = decoder.push(tokens[:, 5:6])
    assert [c.shape for c in chunks] == [(1, 4 * R, 80)]
    chunks += decoder.push(tokens[:, 6:9]) + decoder.push(tokens[:, 9:]) + decoder.flush()
    assert [c.shape[1] for c in chunks] == [4 * R, 4 * R, 3 * R]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), one_shot, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(list(stream(
        model, params, [tokens[:, :2], tokens[:, 2:]], noise, prompt_mel=prompt, num_steps=4, guidance_scale=1.5)),
        axis=1), one_shot, atol=1e-4)

    # Chunk-causal with look-ahead 2: tokens from 6 on do not change chunk 0's frames.
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % CONFIG.codebook_size
    other = np.asarray(sampler(params, changed, noise[:, :5 + 11 * R], prompt, 1.5))
    np.testing.assert_allclose(other[:, :4 * R], one_shot[:, :4 * R], atol=1e-5)
    assert np.abs(other[:, 4 * R:] - one_shot[:, 4 * R:]).max() > 1e-3


def test_every_param_has_known_logical_axes(model_and_params):
    _, params = model_and_params
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_sharded_loss_and_grads_match_single_device(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(6)
    batch = {"tokens": _tokens(4, 6), "token_mask": np.arange(6)[None] < np.array([[6], [5], [6], [3]]),
             "mel": rng.normal(size=(4, 12, 80)).astype(np.float32)}
    loss_and_grads = jax.jit(jax.value_and_grad(
        lambda p, b: flow_matching_loss(model, p, b, jax.random.key(7))[0]))
    expected_loss, expected_grads = loss_and_grads(params, batch)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.logical_to_mesh_sharding(params, mesh)  # outside `activate`, as create_train_state
    with sharding.activate(mesh):
        sharded = jax.device_put(params, shardings)
        sharded_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        loss, grads = loss_and_grads(sharded, sharded_batch)
    kernel = sharded["params"]["estimator"]["stack"]["blocks"]["query"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(nn.unbox(grads)), jax.tree.leaves(nn.unbox(expected_grads))):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown fields"):
        SpeechDecoderConfig.from_config({"width": 32, "bogus": 1})
    with pytest.raises(ValueError, match="time_schedule"):
        SpeechDecoderConfig(time_schedule="sigmoid")
    with pytest.raises(ValueError, match="head_dim"):
        SpeechDecoderConfig(width=36, num_heads=4)
    with pytest.raises(ValueError, match="chunk_tokens >= 1"):
        StreamDecoder(SpeechDecoder(SpeechDecoderConfig(chunk_tokens=0)), {}, np.zeros((1, 8, 80)))
    assert SpeechDecoderConfig.from_config({"chunk_tokens": 5}).chunk_frames == 5 * R
    assert vocoder.MEL.frames_per_second == 25 * R  # 25 tokens/s -> the mel's frame rate


def _glide(seconds=1.5, sample_rate=16_000):
    """A harmonic tone gliding 180 -> 270 Hz with 0.1 s fades."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * np.cumsum(180 + 60 * t) / sample_rate
    envelope = np.minimum(1, 10 * t) * np.minimum(1, 10 * (seconds - t))
    return (envelope * sum(a * np.sin(k * phase) for k, a in [(1, .3), (2, .15), (3, .1), (5, .05)])).astype(np.float32)


def _spectral_distance(log_mel, wave):
    """Relative L2 distance of the magnitude mels; the waveform's mel is recomputed."""
    reference, got = np.exp(log_mel), np.exp(vocoder.mel_spectrogram(wave))
    return np.linalg.norm(got - reference) / np.linalg.norm(reference)


def test_mel_griffin_lim_round_trip_of_a_tone():
    wave = _glide()
    log_mel = vocoder.mel_spectrogram(wave)
    assert log_mel.shape == (vocoder.num_frames(len(wave)), 80)
    assert log_mel.min() >= np.log(vocoder.MEL.log_floor) - 1e-6
    rebuilt = vocoder.griffin_lim(log_mel)
    assert rebuilt.shape == wave.shape
    assert _spectral_distance(log_mel, rebuilt) < 0.1  # 0.07 measured (32 iterations)

    def streamed(**kwargs):  # chunks of 16 frames
        streamer = vocoder.StreamingGriffinLim(**kwargs)
        pieces = [streamer.push(log_mel[i:i + 16]) for i in range(0, len(log_mel), 16)] + [streamer.flush()]
        assert len(pieces[0]) > 0
        return np.concatenate(pieces)

    crossfaded, cut = streamed(), streamed(context_frames=0, fade_samples=0)
    assert crossfaded.shape == cut.shape == wave.shape
    # 0.12 measured; joining chunks inverted apart with a plain cut: 0.15.
    assert _spectral_distance(log_mel, crossfaded) < 0.14 < _spectral_distance(log_mel, cut)


@pytest.mark.slow
def test_decoder_overfits_one_utterance():
    config = SpeechDecoderConfig(codebook_size=32, width=64, num_heads=4, mlp_dim=128, encoder_depth=1,
                                 estimator_depth=2, chunk_tokens=8, cfg_dropout=0.0, prompt_prob=0.0)
    model = SpeechDecoder(config)
    log_mel = vocoder.mel_spectrogram(_glide(1.0))[None, :50]  # 25 tokens at 2 frames each
    tokens = np.arange(25, dtype=np.int32)[None] % 32
    batch = {"tokens": np.repeat(tokens, 8, 0), "token_mask": np.ones((8, 25), bool), "mel": np.repeat(log_mel, 8, 0)}
    params = _init(model, 8, 25)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, 1500))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, key):
        loss, grads = jax.value_and_grad(lambda p: flow_matching_loss(model, p, batch, key)[0])(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    decode = jax.jit(lambda p, noise: sample(model, p, tokens, noise, num_steps=10, guidance_scale=None))
    noise = jax.random.normal(jax.random.key(1), (1, 50, 80))
    before = np.abs(decode(params, noise) - log_mel).mean()
    for i in range(1500):
        params, state, loss = step(params, state, jax.random.key(i))
    after = np.abs(decode(params, noise) - log_mel).mean()
    # Mean |error| in nats over a log-mel spanning [-11.5, 1.2]: ~8.7 untrained, ~0.55 measured.
    assert after < 0.75 and after < before / 8, (before, after, loss)

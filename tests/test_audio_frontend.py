import numpy as np
import pytest

from m2omni_jax.data import audio

def _knf_fbank(waveform: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank (a test-only dependency) with the options of FunASR's Paraformer front end."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = audio.SAMPLE_RATE
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hamming"
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = audio.NUM_MEL_BINS
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(audio.SAMPLE_RATE, (waveform * audio.INT16_SCALE).tolist())
    fbank.input_finished()
    return np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).reshape(-1, audio.NUM_MEL_BINS)


@pytest.fixture(scope="module")
def sentence():
    pytest.importorskip("espeakng_loader")
    from m2omni_jax.experiments.shapes_world import speech

    voice = speech.Voice("en-us", "Hugo", rate=170, pitch=50)
    return speech.synthesize("The quick brown fox jumps over the lazy dog near the river bank.", voice)


def test_fbank_matches_kaldi_native_fbank_on_speech(sentence):
    ours, reference = audio.fbank(sentence), _knf_fbank(sentence)
    assert ours.shape == reference.shape and ours.shape[0] > 200
    # knf computes in float32; ours in float64, so only round-off differs.
    assert np.abs(ours - reference).max() < 1e-3


@pytest.mark.parametrize("num_samples", [399, 400, 559, 560, 561, 16_000])
def test_frame_count_matches_kaldi_snip_edges(num_samples):
    waveform = np.random.default_rng(num_samples).uniform(-0.5, 0.5, num_samples).astype(np.float32)
    ours, reference = audio.fbank(waveform), _knf_fbank(waveform)
    assert ours.shape == reference.shape == (audio.num_fbank_frames(num_samples), audio.NUM_MEL_BINS)
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_dither_is_reproducible_and_off_by_default(sentence):
    clean = audio.fbank(sentence)
    noisy = audio.fbank(sentence, dither=1.0, rng=np.random.default_rng(0))
    again = audio.fbank(sentence, dither=1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(noisy, again)
    assert 0 < np.abs(noisy - clean).mean() < 1.0
    np.testing.assert_array_equal(audio.fbank(sentence), clean)


@pytest.mark.parametrize("num_frames", [1, 5, 6, 7, 13, 100])
def test_lfr_shape(num_frames):
    feats = np.random.default_rng(0).normal(size=(num_frames, 80)).astype(np.float32)
    assert audio.lfr(feats).shape == (-(-num_frames // 6), 560)


def test_lfr_frames_are_the_right_seven_fbank_frames():
    feats = np.arange(20 * 80, dtype=np.float32).reshape(20, 80)  # frame t holds 80t..80t+79
    stacked = audio.lfr(feats)
    assert stacked.shape == (4, 560)
    # Frame 0 repeats the first frame for its 3 frames of left context.
    np.testing.assert_array_equal(stacked[0], np.concatenate([feats[i] for i in (0, 0, 0, 0, 1, 2, 3)]))
    np.testing.assert_array_equal(stacked[2], np.concatenate([feats[i] for i in range(9, 16)]))
    # The last window runs past the end and repeats the last frame.
    np.testing.assert_array_equal(stacked[3], np.concatenate([feats[i] for i in (15, 16, 17, 18, 19, 19, 19)]))


def test_cmvn_normalises_training_data_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.normal(3.0, 2.5, size=(int(n), 560)).astype(np.float32) for n in (30, 7, 51)]
    stats = audio.compute_cmvn_stats(feats)
    normalised = np.concatenate([audio.apply_cmvn(f, stats) for f in feats])
    np.testing.assert_allclose(normalised.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalised.var(axis=0), 1.0, atol=1e-4)
    path = str(tmp_path / "cmvn.json")
    audio.save_cmvn(path, stats)
    loaded = audio.load_cmvn(path)
    np.testing.assert_array_equal(loaded["mean"], stats["mean"])
    np.testing.assert_array_equal(loaded["std"], stats["std"])
    assert loaded["count"] == 88


def test_resample_keeps_duration_and_pitch():
    rate, seconds, freq = 22_050, 1.0, 440.0
    tone = np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    resampled = audio.resample(tone, rate)
    assert resampled.dtype == np.float32 and abs(len(resampled) - 16_000) <= 1
    spectrum = np.abs(np.fft.rfft(resampled))
    assert abs(np.argmax(spectrum) * 16_000 / len(resampled) - freq) < 2.0


def test_audio_features_and_padding(sentence):
    feats = audio.audio_features(sentence)
    assert feats.shape == (-(-audio.num_fbank_frames(len(sentence)) // 6), audio.FEATURE_DIM)
    batch, lengths = audio.pad_features([feats, feats[:10]], max_frames=40)
    assert batch.shape == (2, 40, 560)
    np.testing.assert_array_equal(lengths, [min(len(feats), 40), 10])
    assert np.all(batch[1, 10:] == 0)

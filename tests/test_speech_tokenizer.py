import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from m2omni_jax import train_speech_tokenizer as tst
from m2omni_jax.data import audio as af, audio_tokens
from m2omni_jax.data.audio_tokens import AudioTokenizer, AudioTokens, extend_llm_vocab
from m2omni_jax.data.tokenizer import Tokenizer, train_tokenizer
from m2omni_jax.models import vocoder
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.models.speech_tokenizer import (SpeechTokenizer, SpeechTokenizerConfig, codes_to_values, ctc_loss,
                                                fsq, greedy_ctc, normalize_text, spell_number, text_to_labels)
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig

CONFIG = SpeechTokenizerConfig(levels=(8, 5, 3), width=32, num_heads=2, mlp_dim=64, encoder_depth=2,
                               decoder_depth=1, alphabet=" abc")


# ----------------------------------------------------------------------------- FSQ


def _input_for(values, levels):
    """An FSQ input whose bounded value is exactly the quantised integer (inverts tanh)."""
    levels = np.asarray(levels, np.float64)
    half_l, offset = (levels - 1) * (1 + 1e-3) / 2, np.where(levels % 2 == 0, 0.5, 0.0)
    digits = np.asarray(values, np.float64) * (levels // 2)
    return np.arctanh((digits + offset) / half_l) - np.arctanh(offset / half_l)


def test_fsq_round_trip_over_the_whole_codebook():
    levels = CONFIG.levels
    codes = np.arange(CONFIG.codebook_size)
    values = np.asarray(codes_to_values(codes, levels))
    assert values.min() == -1.0 and values.max() <= 1.0 and CONFIG.codebook_size == 120
    quantised, again = fsq(jnp.asarray(_input_for(values, levels), jnp.float32), levels)
    np.testing.assert_array_equal(again, codes)  # every code is reachable and round-trips
    np.testing.assert_allclose(quantised, values, atol=1e-6)
    # By hand, levels (8, 5, 3): digit ranges -4..3, -2..2, -1..1; code = d0 + 8·d1 + 40·d2 of
    # the shifted digits. Values (-1, 0, 1) are digits (-4, 0, 1) -> shifted (0, 2, 2) -> 96.
    assert int(fsq(jnp.asarray(_input_for([[-1.0, 0.0, 1.0]], levels), jnp.float32), levels)[1][0]) == 96


def test_fsq_large_inputs_saturate_inside_the_codebook():
    z = jnp.asarray(np.random.default_rng(0).normal(0, 30, (2000, 3)), jnp.float32)
    values, codes = fsq(z, CONFIG.levels)
    assert int(codes.min()) >= 0 and int(codes.max()) < CONFIG.codebook_size
    np.testing.assert_allclose(codes_to_values(codes, CONFIG.levels), values, atol=1e-6)


def test_fsq_gradient_is_straight_through_the_rounding():
    levels = CONFIG.levels
    z = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)
    grad = jax.grad(lambda z: jnp.sum(fsq(z, levels)[0] * weights))(z)
    # The rounding counts as the identity: d/dz of tanh(z + shift)·half_l / (L // 2).
    lv = np.asarray(levels, np.float64)
    half_l, offset = (lv - 1) * (1 + 1e-3) / 2, np.where(lv % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    expected = np.asarray(weights) * (1 - np.tanh(np.asarray(z) + shift) ** 2) * half_l / (lv // 2)
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    assert np.all(np.abs(grad) > 0)


# ----------------------------------------------------------------------------- model


def _batch(batch=4, frames=48, seed=0):
    rng = np.random.default_rng(seed)
    fbank = rng.normal(size=(batch, frames, 80)).astype(np.float32)
    lengths = np.array([frames, frames - 9, frames // 2, 13][:batch], np.int32)
    labels = rng.integers(1, CONFIG.num_labels, (batch, 6)).astype(np.int32)
    return {"fbank": fbank, "fbank_lengths": lengths, "labels": labels,
            "label_lengths": np.array([6, 5, 4, 3][:batch], np.int32)}


@pytest.fixture(scope="module")
def model_and_params():
    model = SpeechTokenizer(CONFIG)
    batch = _batch()
    return model, jax.jit(model.init)(jax.random.key(0), batch["fbank"], batch["fbank_lengths"])


def test_shapes_token_rate_and_padding_independence(model_and_params):
    model, params = model_and_params
    apply = jax.jit(model.apply)
    batch = _batch()
    out = apply(params, batch["fbank"], batch["fbank_lengths"])
    assert out["codes"].shape == (4, 12) and out["logits"].shape == (4, 24, CONFIG.num_labels)
    np.testing.assert_array_equal(out["token_mask"].sum(1), [12, 10, 6, 4])  # ceil(frames / 4)
    assert CONFIG.tokens_per_second == 25.0
    # Frames past a clip's length (39: inside its last, partial token) change none of its
    # codes or logits.
    noisy = batch["fbank"].copy()
    noisy[1, 39:] = 100.0
    again = apply(params, noisy, batch["fbank_lengths"])
    np.testing.assert_array_equal(again["codes"][1, :10], out["codes"][1, :10])
    np.testing.assert_allclose(again["logits"][1, :20], out["logits"][1, :20], atol=1e-5)
    codes, mask = jax.jit(lambda p, f, n: model.apply(p, f, n, method=SpeechTokenizer.encode))(
        params, batch["fbank"], batch["fbank_lengths"])
    np.testing.assert_array_equal(codes, np.where(mask, out["codes"], 0))
    # The head reads the codes alone: decoding the codes gives the training logits.
    decoded = jax.jit(lambda p, c, m: model.apply(p, c, m, method=SpeechTokenizer.decode_codes))(params, codes, mask)
    valid = np.asarray(out["logit_mask"])
    np.testing.assert_allclose(np.asarray(decoded)[valid], np.asarray(out["logits"])[valid], atol=1e-5)


def test_every_param_has_known_logical_axes(model_and_params):
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    boxes = jax.tree.leaves(model_and_params[1], is_leaf=lambda x: hasattr(x, "names"))
    assert boxes and all(set(b.names) <= known for b in boxes)


def test_sharded_outputs_and_loss_equal_one_device(model_and_params):
    model, params = model_and_params
    batch = _batch(batch=4, frames=24)
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 8 rows, one per device
    batch["fbank_lengths"] = np.minimum(batch["fbank_lengths"], 24)

    def run(p, b):
        return model.apply(p, b["fbank"], b["fbank_lengths"]), ctc_loss(model, p, b)[0]
    (out_1, loss_1) = jax.jit(run)(params, batch)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    init_args = (jax.random.key(0), _batch()["fbank"], _batch()["fbank_lengths"])
    shardings = sharding.logical_to_mesh_sharding(jax.eval_shape(model.init, *init_args), mesh)
    with sharding.activate(mesh):
        sharded = jax.jit(model.init, out_shardings=shardings)(*init_args)
        placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        out_8, loss_8 = jax.jit(run)(sharded, placed)
    assert len(out_8["logits"].sharding.device_set) == 8
    np.testing.assert_array_equal(out_8["codes"], out_1["codes"])
    np.testing.assert_allclose(out_8["logits"], out_1["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)


def test_ctc_text_and_greedy_decoding():
    assert normalize_text("A  cab, ABC!", " abc") == "a cab abc"
    alphabet = " abcdefghijklmnopqrstuvwxyz'"  # no digits: numbers are read out as words
    assert normalize_text("2", alphabet) == "two" and normalize_text("3 stars, 15!", alphabet) == "three stars fifteen"
    assert [spell_number(n) for n in (0, 20, 42, 100, 305, 1234)] == [
        "zero", "twenty", "forty two", "one hundred", "three hundred five", "one two three four"]
    assert normalize_text("A2", " a2") == "a2"  # an alphabet with digits keeps them
    assert text_to_labels("Cab a", " abc") == [4, 2, 3, 1, 2]  # blank 0, then " abc"
    # frames: c c blank a b b blank b -> "cabb" (a blank splits the repeated b)
    logits = jax.nn.one_hot(np.array([[4, 4, 0, 2, 3, 3, 0, 3]]), 5) * 10
    assert greedy_ctc(logits, np.ones((1, 8), bool), " abc") == ["cabb"]


def test_config_validation():
    with pytest.raises(ValueError, match="levels"):
        SpeechTokenizerConfig(levels=(8, 1))
    with pytest.raises(ValueError, match="alphabet"):
        SpeechTokenizerConfig(alphabet="aab")
    assert SpeechTokenizerConfig(levels=(8, 8, 8, 8)).codebook_size == 4096


# ------------------------------------------------------------------- <audio_k> tokens


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    texts = ["a small red square at the top left", "what is said in this recording?"] * 50
    return Tokenizer(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "m"), 320))


def test_codes_to_audio_ids_round_trip_through_the_tokenizer(text_tokenizer):
    tok = AudioTokenizer(text_tokenizer, 120)
    base = text_tokenizer.vocab_size
    assert tok.vocab_size == base + 120
    codes = np.array([0, 7, 119, 7])
    ids = tok.audio.codes_to_ids(codes)
    np.testing.assert_array_equal(ids, base + codes)
    np.testing.assert_array_equal(tok.audio.ids_to_codes(ids), codes)
    text = "say: " + "".join(f"<audio_{c}>" for c in codes) + " done"
    encoded = tok.encode(text)
    assert encoded == text_tokenizer.encode("say: ") + ids.tolist() + text_tokenizer.encode(" done")
    assert tok.decode(encoded) == text
    assert tok.special_id("<audio_7>") == base + 7 and tok.special_id("<gen_audio>") == \
        text_tokenizer.special_id("<gen_audio>")
    assert AudioTokens(base, 120).names()[:2] == ["<audio_0>", "<audio_1>"]
    with pytest.raises(ValueError, match="not <audio_k> ids"):
        tok.audio.ids_to_codes([3])
    with pytest.raises(ValueError, match=r"\[0, 120\)"):
        tok.audio.codes_to_ids([120])


def test_vocab_resize_keeps_old_rows_and_logits():
    cfg = LLMConfig(vocab_size=64, width=32, depth=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    mrope_sections=(1, 1, 2))
    tokens = np.array([[1, 5, 63, 2]], np.int32)
    params = jax.device_get(LLM(cfg).init(jax.random.key(0), tokens)["params"])
    params = jax.tree.map(np.asarray, nn.unbox(params))
    omni = {"llm": params, "audio": {"w": np.ones(3)}}
    grown, new_cfg = extend_llm_vocab(omni, cfg, 64 + 120)
    assert new_cfg.vocab_size == 184 and grown["audio"] is omni["audio"]
    emb, head = grown["llm"]["embedding"], grown["llm"]["lm_head"]["kernel"]
    assert emb.shape == (184, 32) and head.shape == (32, 184)
    np.testing.assert_array_equal(emb[:64], params["embedding"])
    np.testing.assert_array_equal(head[:, :64], params["lm_head"]["kernel"])
    old = LLM(cfg).apply({"params": params}, tokens)
    new = LLM(new_cfg).apply({"params": grown["llm"]}, np.concatenate([tokens, [[64 + 119]]], 1))
    np.testing.assert_allclose(new[:, :4, :64], old, rtol=1e-5, atol=1e-5)  # old ids, old rows: same logits


# ----------------------------------------------------------------------------- training


def test_transcripts_at_walks_lists():
    record = {"attributes": {"voices": [{"text": "a"}, {"text": "b"}]}, "transcripts": ["x"]}
    assert tst.transcripts_at(record, "attributes.voices.text") == ["a", "b"]
    assert tst.transcripts_at(record, "transcripts") == ["x"]
    assert tst.transcripts_at(record, "missing.key") == []


def test_step_batches_are_a_function_of_the_step():
    lengths = np.random.default_rng(0).integers(10, 400, 50)
    arrays = {"x": np.arange(50 * 400).reshape(50, 400), "n": lengths}
    data = tst.step_batches(arrays, 8, 3, lengths, {"x": 1}, multiple=100)
    first = [next(it) for it in [data(0)] for _ in range(9)]
    resumed = data(7)
    for want in first[7:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["x"], want["x"])
    for batch in first:
        assert batch["x"].shape[1] % 100 == 0 and batch["x"].shape[1] >= batch["n"].max()
    rows = np.concatenate([b["x"][:, 0] // 400 for b in first[:6]])  # epoch 0: 6 batches of 8 of 50 rows
    assert len(set(rows.tolist())) == 48
    np.testing.assert_array_equal(np.concatenate([b["n"] for b in first[:6]]), lengths[rows])


def _learnable_clips(num, rng):
    """Features that spell their transcript: each character a fixed random 4-frame pattern."""
    patterns = rng.normal(size=(len(CONFIG.alphabet) + 1, 4, 80)).astype(np.float32)
    fbank, lengths, labels, label_lengths = [], [], [], []
    for _ in range(num):
        text = rng.integers(1, CONFIG.num_labels, rng.integers(3, 7))
        frames = np.concatenate([patterns[c] for c in text]) + 0.1 * rng.normal(size=(4 * len(text), 80))
        fbank.append(np.pad(frames, ((0, 28 - len(frames)), (0, 0))))
        lengths.append(len(frames))
        labels.append(np.pad(text, (0, 6 - len(text))))
        label_lengths.append(len(text))
    return {"fbank": np.stack(fbank).astype(np.float32), "fbank_lengths": np.array(lengths, np.int32),
            "labels": np.stack(labels).astype(np.int32), "label_lengths": np.array(label_lengths, np.int32)}


@pytest.mark.slow  # ~30 s alone on 2 CPU cores (compiles two batch shapes, one Loop run)
def test_a_short_training_run_lowers_the_ctc_loss(tmp_path):
    config = RunConfig.of(base.get_config())  # mesh: every device on the batch
    model = SpeechTokenizer(dataclasses.replace(CONFIG, ctc_frames_per_token=2))
    arrays = _learnable_clips(64, np.random.default_rng(0))
    stage = tst.StageConfig(steps=60, batch_size=16, peak_lr=3e-3, warmup_steps=5, log_every=10,
                            checkpoint_every=60)
    data = tst.step_batches(arrays, 16, 0, arrays["fbank_lengths"], {"fbank": 1}, multiple=28)
    first = ctc_loss(model, model.init(jax.random.key(0), arrays["fbank"][:16], arrays["fbank_lengths"][:16]),
                     next(data(0)))[0]
    state, last = tst.train_stage(config, str(tmp_path), stage, model,
                                  lambda p, b, rng: ctc_loss(model, {"params": p}, b), arrays,
                                  tst.tokenizer_inputs, data)
    losses = (float(first), last["loss"])
    assert int(state.step) == 60 and (tmp_path / "checkpoints" / "60").exists()
    assert losses[1] < 0.5 * losses[0], losses
    # The checkpoint read back as a waveform -> codes function gives the trained model's codes.
    stats = {"mean": np.zeros(80, np.float32), "std": np.full(80, 4.0, np.float32)}
    af.save_cmvn(str(tmp_path / "cmvn.json"), stats)
    codes_fn = audio_tokens.SpeechCodes.restore(str(tmp_path / "checkpoints"), model.config, str(tmp_path / "cmvn.json"))
    wave = np.sin(np.arange(8000) * 0.05).astype(np.float32) * 0.3
    fbank = af.apply_cmvn(af.fbank(wave), stats)[None]
    codes, mask = model.apply({"params": jax.device_get(state.params)}, fbank, np.array([fbank.shape[1]]),
                              method=SpeechTokenizer.encode)
    np.testing.assert_array_equal(codes_fn(wave), np.asarray(codes)[0][np.asarray(mask)[0]])
    assert len(codes_fn(wave)) == -(-af.num_fbank_frames(8000) // 4)


# ----------------------------------------------------------------------------- evaluation


def test_mel_cepstral_distortion_and_tts_eval(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    other = (0.3 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)
    assert vocoder.mel_cepstral_distortion(tone, tone) == pytest.approx(0.0, abs=1e-9)
    slightly = tone + 0.003 * rng.normal(size=tone.shape).astype(np.float32)
    assert vocoder.mel_cepstral_distortion(tone, slightly) < vocoder.mel_cepstral_distortion(tone, other)
    # A constant log-mel has no cepstrum past c0.
    np.testing.assert_allclose(vocoder.mel_cepstrum(np.full((3, 80), -2.0)), 0.0, atol=1e-12)
    result = vocoder.evaluate_tts([tone, other], [tone, tone], ["a b", "c d"], lambda waves: ["a b", "c x"])
    assert result["wer"] == 0.25 and result["mcd_db"] > 0
    vocoder.write_wav(str(tmp_path / "x.wav"), tone)
    import wave

    with wave.open(str(tmp_path / "x.wav")) as f:
        assert (f.getframerate(), f.getnframes(), f.getsampwidth()) == (16000, 16000, 2)


def test_tts_record_ids_and_loss_mask_by_hand(text_tokenizer):
    tok = AudioTokenizer(text_tokenizer, 120)
    base, special = text_tokenizer.vocab_size, text_tokenizer.special_id
    record = audio_tokens.tts_record("a red square", [3, 1, 119], prompt="Say it.")
    assert record["messages"][1]["content"] == "<gen_audio><audio_3><audio_1><audio_119></gen_audio>"
    ids, mask = tok.apply_chat_template(record["messages"])

    def header(role):
        return [special("<|start_header_id|>")] + text_tokenizer.encode(role) + \
            [special("<|end_header_id|>")] + text_tokenizer.encode("\n\n")
    user = header("user") + text_tokenizer.encode("Say it.\na red square") + [special("<|eot_id|>")]
    answer = [special("<gen_audio>"), base + 3, base + 1, base + 119, special("</gen_audio>"), special("<|eot_id|>")]
    assert ids == [text_tokenizer.bos_id] + user + header("assistant") + answer
    assert mask == [0] * (1 + len(user) + len(header("assistant"))) + [1] * len(answer)
    # Text without audio tokens: the same ids and mask as the base template.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a red square"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        text_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert tok.decode(answer[:-1]) == record["messages"][1]["content"]

"""Speech output in the LLM: `<audio_k>` tokens from the config, the vocabulary grown on
init_from, TTS records tagged "speech_gen", and `<gen_audio>` spans spoken while generating
(streamed chunks joined = one-shot decoding)."""
import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax import build
from m2omni_jax.config_fields import replace
from m2omni_jax.data import audio_tokens, tokenizer as tokenizer_lib
from m2omni_jax.data.audio_tokens import AudioTokenizer
from m2omni_jax.inference import speech_output
from m2omni_jax.inference.generator import Generator
from m2omni_jax.inference.sampling import GREEDY
from m2omni_jax.inference.streaming import HeadSegment, SegmentStream, TextSegment
from m2omni_jax.modalities import MODALITY_ID
from m2omni_jax.models import speech_decoder as sd, vocoder
from m2omni_jax.parallel import sharding
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import checkpointing, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base  # noqa: E402

TEXTS = ["a large green star at the bottom center", "what color is the square at the center?",
         "read this aloud", "a small red diamond at the top left"] * 20
NUM_CODES = 40


@pytest.fixture(scope="module")
def text_model_path(tmp_path_factory):
    return tokenizer_lib.train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tok"), 400)


def test_get_tokenizer_adds_audio_codes_from_the_config(text_model_path):
    config = base.get_config()
    config.tokenizer.path = text_model_path
    plain = tokenizer_lib.get_tokenizer(config)
    assert not isinstance(plain, AudioTokenizer)
    config.tokenizer.audio_codes = NUM_CODES
    tok = tokenizer_lib.get_tokenizer(config)
    assert isinstance(tok, AudioTokenizer) and tok.vocab_size == plain.vocab_size + NUM_CODES
    ids = tok.encode("<gen_audio><audio_0><audio_39></gen_audio>")
    assert ids == [plain.special_id("<gen_audio>"), plain.vocab_size, plain.vocab_size + 39,
                   plain.special_id("</gen_audio>")]
    assert tok.encode("read this aloud") == plain.encode("read this aloud")
    config.tokenizer.audio_codes = -1
    with pytest.raises(Exception, match="tokenizer.audio_codes=-1"):
        RunConfig.of(config)


def test_llm_vocab_must_hold_the_audio_codes():
    config = base.get_config()
    config.tokenizer.audio_codes = 1
    with pytest.raises(Exception, match="audio_codes=1 exceeds config.model.llm.vocab_size"):
        build.validate_config(config, 1, 1)


def _state(params):
    tx = optax.sgd(0.1)
    return train_step.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                                 rng=jnp.zeros(2, jnp.uint32), tx=tx)


def test_init_from_grows_embedding_and_lm_head_keeping_old_rows(tmp_path):
    rng = np.random.default_rng(0)
    old = {"llm": {"embedding": rng.normal(size=(10, 4)).astype(np.float32),
                   "lm_head": {"kernel": rng.normal(size=(4, 10)).astype(np.float32)},
                   "final_norm": {"scale": rng.normal(size=(4,)).astype(np.float32)}}}
    ckpt = checkpointing.Checkpointer(tmp_path / "prev" / "checkpoints", save_every=1, keep=1)
    ckpt.save(5, _state(jax.tree.map(jnp.asarray, old)), force=True)
    ckpt.close()

    fresh = {"llm": {"embedding": jnp.zeros((13, 4)), "lm_head": {"kernel": jnp.zeros((4, 13))},
                     "final_norm": {"scale": jnp.zeros(4)}}}
    state = _state(fresh)
    mesh = sharding.make_mesh(RunConfig.of(base.get_config()).mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: rep, jax.eval_shape(lambda: state))
    config = RunConfig.of(base.get_config())
    config = replace(config, init_from="prev")
    grown = build.init_from_previous_stage(config, str(tmp_path), state, jax.eval_shape(lambda: state), shardings)
    emb, head = np.asarray(grown.params["llm"]["embedding"]), np.asarray(grown.params["llm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(emb[:10], old["llm"]["embedding"])  # bit for bit
    np.testing.assert_array_equal(head[:, :10], old["llm"]["lm_head"]["kernel"])
    np.testing.assert_allclose(emb[10:], np.repeat(old["llm"]["embedding"].mean(0, keepdims=True), 3, 0), rtol=1e-6)
    np.testing.assert_allclose(head[:, 10:], np.repeat(old["llm"]["lm_head"]["kernel"].mean(1, keepdims=True), 3, 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(grown.params["llm"]["final_norm"]["scale"], old["llm"]["final_norm"]["scale"])
    # Fewer rows than saved is not a resize: those leaves stay fresh (and are named missing).
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            {"llm": {"embedding": jnp.zeros((8, 4))}})
    loaded, missing = checkpointing.load_params(str(tmp_path / "prev"), abstract)
    assert audio_tokens.grow_vocab_on_load(str(tmp_path / "prev"), abstract, loaded, missing) == ({}, ["llm/embedding"])


def test_tts_records_of_a_speech_record_are_speech_gen_with_their_codes(text_model_path):
    clips = [np.sin(np.arange(1600) / 7.0).astype(np.float32) * 0.5, np.zeros(800, np.float32)]
    record = {"id": "train/3", "audio": clips, "sample_rate": 16000,
              "attributes": {"voices": [{"text": "a red square"}, {"text": "read this aloud"}]}}
    codes_of = lambda wave, rate: np.arange(len(wave) // 400) % NUM_CODES  # noqa: E731
    out = audio_tokens.tts_records_of(record, "attributes.voices.text", codes_of)
    assert [r["answer"] for r in out] == ["a red square", "read this aloud"]
    assert [r["modality"] for r in out] == ["speech_gen"] * 2 and out[1]["id"] == "train/3#1"
    assert out[0]["messages"][1]["content"] == "<gen_audio><audio_0><audio_1><audio_2><audio_3></gen_audio>"
    np.testing.assert_allclose(audio_tokens.records_lib.decode_pcm16(out[0]["reference_audio"]), clips[0], atol=1 / 32768)
    tok = AudioTokenizer(tokenizer_lib.Tokenizer(text_model_path), NUM_CODES)
    ids, mask = tok.apply_chat_template(out[1]["messages"])
    span = ids[ids.index(tok.special_id("<gen_audio>")):]
    assert span[1:3] == [tok.audio.base_vocab_size, tok.audio.base_vocab_size + 1] and all(mask[-len(span):])
    assert MODALITY_ID[out[0]["modality"]] == MODALITY_ID["speech_gen"]
    with pytest.raises(ValueError, match="2 clips but 1 transcripts"):
        audio_tokens.tts_records_of({**record, "attributes": {"voices": [{"text": "x"}]}},
                                    "attributes.voices.text", codes_of)


# ----------------------------------------------------------------------------- speaking


DECODER = sd.SpeechDecoderConfig(codebook_size=NUM_CODES, width=32, num_heads=2, mlp_dim=64, encoder_depth=1,
                                 estimator_depth=1, chunk_tokens=8, lookahead_tokens=3)


@pytest.fixture(scope="module")
def speech_head(text_model_path):
    tok = AudioTokenizer(tokenizer_lib.Tokenizer(text_model_path), NUM_CODES)
    model = sd.SpeechDecoder(DECODER)
    tokens = np.zeros((1, 8), np.int32)
    mel = np.zeros((1, 16, DECODER.num_mels), np.float32)
    zeros = np.zeros((1,), np.int32)
    params = nn.unbox(model.init(jax.random.key(1), tokens, np.ones((1, 8), bool), zeros, mel, np.zeros((1,)), mel,
                                 np.ones((1, 16), bool), zeros, np.ones((1,), bool)))
    head = speech_output.SpeechOutputHead(model, params, tok.audio, max_tokens=64, num_steps=4, guidance_scale=1.5,
                                          griffin_lim_iters=8)
    return tok, head


CODES = [(7 * i + 3) % NUM_CODES for i in range(30)]  # 30 distinct codes: 3 chunks of 8 + a last of 6


def test_gen_audio_span_streams_audio_that_joins_to_the_one_shot_decoding(speech_head):
    tok, head = speech_head
    stream = SegmentStream(tok, {"audio": head})
    ids = tok.encode("hi <gen_audio>" + "".join(f"<audio_{c}>" for c in CODES) + "</gen_audio>")
    per_token = [stream.push(i) for i in ids] + [stream.finish()]
    segments = [s for pushed in per_token for s in pushed]
    audio = [s for s in segments if isinstance(s, HeadSegment)]
    assert isinstance(segments[0], TextSegment) and all(s.kind == "audio" for s in audio)
    assert [s.final for s in audio] == [False] * (len(audio) - 1) + [True]
    # Streaming: the first chunk's audio arrives with the 8 + 3rd code, long before the span closes.
    first = next(i for i, pushed in enumerate(per_token) if any(isinstance(s, HeadSegment) for s in pushed))
    assert ids[first] == tok.audio.codes_to_ids([CODES[10]])[0]
    assert sum(len(s.token_ids) for s in audio) == len(CODES)
    # The mel chunks joined = one-shot flow matching of all the codes (same noise), within 1e-4.
    session = head.open()
    for i in tok.audio.codes_to_ids(CODES):
        session.push(i)
    session.close()
    one_shot = head.mel(CODES)
    np.testing.assert_allclose(np.concatenate(session.mels)[:len(one_shot)], one_shot, atol=1e-4)
    # The waveform joined = the streaming vocoder on the one-shot mel in the same chunks, within 1e-3.
    gl = vocoder.StreamingGriffinLim(head.vocoder.config, num_iters=8)
    cuts = np.cumsum([len(m) for m in session.mels])[:-1]
    expected = np.concatenate([gl.push(m) for m in np.split(one_shot, cuts)] + [gl.flush()])
    wave = np.concatenate([s.output for s in audio])
    assert len(wave) == len(expected) == (len(one_shot) - 1) * vocoder.MEL.hop_length
    np.testing.assert_allclose(wave, expected, atol=1e-3)
    assert np.abs(wave).max() > 0
    # The whole span at once (the non-streaming call): the same length of speech.
    assert len(head(ids[2:-1], "")) == len(wave)


def _chain_llm(tok, chain, width=64):
    """A tiny LLM whose greedy continuation of chain[i] is chain[i+1]: every block's output
    projection zeroed (the last hidden state is the token's embedding), orthonormal embedding
    rows for the chain's tokens, LM head columns pointing back at them."""
    config = base.get_config()
    config.model.kind = "llm"
    config.model.llm.update(dict(vocab_size=tok.vocab_size, width=width, depth=1, num_heads=2, num_kv_heads=1,
                                 head_dim=16, mlp_dim=64, mrope_sections=(2, 3, 3)))
    config.tokenizer.audio_codes = NUM_CODES
    config.data.seq_len = 96
    config.train.batch_size = 8
    model = build.build_model(config, tok)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(np.array, params)
    params["decoder"]["layers"]["attention"]["out"]["kernel"][:] = 0
    params["decoder"]["layers"]["mlp"]["down"]["kernel"][:] = 0
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(width, width)))[0].T
    params["lm_head"]["kernel"][:] = 0
    for k, (a, b) in enumerate(zip(chain, chain[1:])):
        params["embedding"][a] = basis[k] * np.sqrt(width)
        params["lm_head"]["kernel"][:, b] += 20 * basis[k]
    return RunConfig.of(config), model, jax.tree.map(jnp.asarray, params)


@pytest.mark.slow
def test_generator_speaks_the_gen_audio_span_while_generating(speech_head):
    tok, head = speech_head
    last = tok.encode("\n\n")[-1]  # the open assistant header ends with it
    span = [tok.special_id("<gen_audio>"), *tok.audio.codes_to_ids(CODES).tolist(), tok.special_id("</gen_audio>")]
    config, model, params = _chain_llm(tok, [last, *span, tok.special_id("<|eot_id|>")])
    generator = Generator(model, params, tok, config, heads={"audio": head})
    segments = list(generator.generate_stream("read this aloud", GREEDY, max_new_tokens=40))
    audio = [s for s in segments if isinstance(s, HeadSegment)]
    assert len(audio) >= 3 and audio[-1].final and not any(s.final for s in audio[:-1])
    assert [i for s in audio for i in s.token_ids] == span[1:-1]
    replay = SegmentStream(tok, {"audio": head})
    expected = [s for i in span for s in replay.push(i)]
    np.testing.assert_allclose(np.concatenate([s.output for s in audio]),
                               np.concatenate([s.output for s in expected]), atol=1e-5)
    [reply] = generator.generate(["read this aloud"], GREEDY, max_new_tokens=40)
    assert reply.token_ids == tuple(span) and reply.finish_reason == "stop"


@pytest.mark.slow
def test_m2omni_generate_writes_one_wav_per_streamed_utterance(speech_head, tmp_path):
    import io
    import wave as wave_lib

    from m2omni_jax import generate as generate_lib

    tok, head = speech_head
    last = tok.encode("\n\n")[-1]
    span = [tok.special_id("<gen_audio>"), *tok.audio.codes_to_ids(CODES).tolist(), tok.special_id("</gen_audio>")]
    config, model, params = _chain_llm(tok, [last, *span, tok.special_id("<|eot_id|>")])
    generator = Generator(model, params, tok, config, heads={"audio": head})
    text = generate_lib.generate_reply(generator, {"messages": [{"role": "user", "content": "read this aloud"}]},
                                       GREEDY, 40, 0, out=io.StringIO(), out_dir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["audio_000.wav"] and "audio_000.wav" in text
    with wave_lib.open(str(tmp_path / "audio_000.wav")) as f:
        assert f.getnframes() == (len(CODES) * DECODER.token_mel_ratio - 1) * vocoder.MEL.hop_length


# ----------------------------------------------------------------------------- TTS data and evaluation


SPEECH_TOKENIZER = dict(levels=(5, 8), width=32, num_heads=2, mlp_dim=64, encoder_depth=1, decoder_depth=1)


def _speech_run(workdir, clips):
    """A speech-tokenizer run's files (random tokenizer and decoder, CMVN of `clips`), as
    m2omni-train-speech-tokenizer leaves them."""
    from m2omni_jax.data import audio as audio_frontend
    from m2omni_jax.models.speech_tokenizer import SpeechTokenizer, SpeechTokenizerConfig

    tokenizer = SpeechTokenizer(SpeechTokenizerConfig(**SPEECH_TOKENIZER))
    params = nn.unbox(tokenizer.init(jax.random.key(0), np.zeros((1, 16, 80), np.float32), np.ones((1,), np.int32)))
    decoder = sd.SpeechDecoder(DECODER)
    tokens, mel, zeros = np.zeros((1, 8), np.int32), np.zeros((1, 16, DECODER.num_mels), np.float32), np.zeros(1, np.int32)
    dec_params = nn.unbox(decoder.init(jax.random.key(1), tokens, np.ones((1, 8), bool), zeros, mel, np.zeros((1,)),
                                       mel, np.ones((1, 16), bool), zeros, np.ones((1,), bool)))
    for name, tree in (("tokenizer", params), ("decoder", dec_params)):
        ckpt = checkpointing.Checkpointer(workdir / name / "checkpoints", save_every=1, keep=1)
        ckpt.save(1, _state(tree["params"]), force=True)
        ckpt.close()
    audio_frontend.save_cmvn(str(workdir / "cmvn.json"),
                             audio_frontend.compute_cmvn_stats([audio_frontend.fbank(c) for c in clips]))
    return dec_params


class _SpeechRecords(audio_tokens.sources.Source):
    """A source kind of the test: one audio part of spoken records with a transcript each."""
    CLIPS = [np.sin(np.arange(n) * f).astype(np.float32) * 0.3 for n, f in ((9000, 0.05), (12000, 0.11), (7000, 0.2))]

    def parts(self, split):
        import grain

        records = [{"id": f"{split}/{i}", "messages": [{"role": "user", "content": "<audio>"}], "audio": [clip],
                    "transcripts": [f"sentence {i}"]} for i, clip in enumerate(self.CLIPS)]
        return {"speech": audio_tokens.sources.Part(self.name, "audio", lambda: grain.MapDataset.source(records))}


audio_tokens.sources.register_source("test_speech_records", _SpeechRecords)


@pytest.mark.slow
def test_tts_source_encodes_the_clips_and_speech_scores_by_hand(tmp_path, text_model_path):
    from m2omni_jax import evaluate

    dec_params = _speech_run(tmp_path / "speech", _SpeechRecords.CLIPS)
    config = base.get_config()
    config.data.sources = dict(
        spoken=dict(kind="test_speech_records"),
        tts=dict(kind="tts", from_source="spoken", transcript_key="transcripts", tokenizer_workdir=str(tmp_path / "speech"),
                 tokenizer_model=SPEECH_TOKENIZER, dir=str(tmp_path / "tts"), num_eval=2))
    decoder_fields = {k: v for k, v in dataclasses.asdict(DECODER).items() if k != "codebook_size"}
    config.speech_tokenizer = dict(workdir=str(tmp_path / "speech"), tokenizer=dict(model=SPEECH_TOKENIZER),
                                   decoder=dict(model=decoder_fields), euler_steps=3)
    config = RunConfig.of(config)
    # The run's decoder speaks the <audio_k> codes of a tokenizer with as many codes.
    tok = AudioTokenizer(tokenizer_lib.Tokenizer(text_model_path), NUM_CODES)
    assert speech_output.configured(config, tok) and not speech_output.configured(config, tok.base)
    head = speech_output.load_speech_head(config, tok.audio)
    assert head.num_steps == 3 and isinstance(head.vocoder, vocoder.GriffinLimVocoder)
    jax.tree.map(np.testing.assert_array_equal, head.params, dec_params)
    with pytest.raises(ValueError, match="audio_codes=7 but the speech tokenizer has 40 codes"):
        speech_output.load_speech_head(config, audio_tokens.AudioTokens(400, 7))
    part = audio_tokens.sources.parts(config, "eval")["tts"]
    assert part.modality == "speech_gen"
    records = [part.records()[i] for i in range(len(part.records()))]
    assert len(records) == 2 and [r["answer"] for r in records] == ["sentence 0", "sentence 1"]
    codes = audio_tokens.SpeechCodes.of_run(str(tmp_path / "speech"), SPEECH_TOKENIZER)
    for record, clip in zip(records, _SpeechRecords.CLIPS):
        spoken = "".join(f"<audio_{c}>" for c in codes(clip))
        assert record["messages"][1]["content"] == f"<gen_audio>{spoken}</gen_audio>"
    # Speech scored against itself: the ASR's error rates equal the reference's, MCD 0.
    references = [audio_tokens.records_lib.decode_pcm16(r["reference_audio"]) for r in records]
    result = evaluate.score_speech(config, records, ["", ""], references)
    assert result["wer"] == result["reference_wer"] and result["mcd_db"] == 0.0 and result["spoken_fraction"] == 1.0
    result = evaluate.score_speech(config, records, ["", ""], [references[0], np.zeros(0, np.float32)])
    assert result["spoken_fraction"] == 0.5 and result["examples"][1]["heard"] == ""
    evaluate.write_speech(str(tmp_path / "run"), records, references, 1)
    assert sorted(p.name for p in (tmp_path / "run" / "tts_wavs").iterdir()) == ["00_generated.wav", "00_reference.wav"]


# ----------------------------------------------------------------------------- spoken answers


def test_spoken_answer_record_by_hand():
    image, clip = np.zeros((4, 4, 3), np.uint8), np.full(160, 0.25, np.float32)
    record = {"id": "eval/3", "task": "spoken_vqa", "modality": "audio", "images": [image], "audio": [clip],
              "messages": [{"role": "user", "content": "<image>\n<audio>"}, {"role": "assistant", "content": "red"}]}
    spoken = audio_tokens.spoken_answer_record(record, np.array([[7], [0], [7]]), np.full(80, 0.5, np.float32))
    assert spoken["messages"] == [{"role": "system", "content": "Answer in speech."},
                                  {"role": "user", "content": "<image>\n<audio>"},
                                  {"role": "assistant", "content": "<gen_audio><audio_7><audio_0><audio_7></gen_audio>"}]
    assert (spoken["modality"], spoken["task"], spoken["answer_task"], spoken["answer"]) == (
        "speech_gen", "spoken_answer", "spoken_vqa", "red")
    assert spoken["images"][0] is image and spoken["audio"][0] is clip  # the question's media stay
    np.testing.assert_array_equal(audio_tokens.records_lib.decode_pcm16(spoken["reference_audio"]), 0.5)
    assert record["messages"][1]["content"] == "red"  # the input is not changed
    # A record's own system turn gets the instruction; none when the instruction is empty.
    with_system = dict(record, messages=[{"role": "system", "content": "Be brief."}, *record["messages"]])
    assert audio_tokens.spoken_answer_record(with_system, [1], clip)["messages"][0] == {
        "role": "system", "content": "Be brief.\nAnswer in speech."}
    assert audio_tokens.spoken_answer_record(record, [1], clip, instruction="")["messages"][0]["role"] == "user"
    with pytest.raises(ValueError, match="'eval/3': no assistant reply to speak"):
        audio_tokens.spoken_answer_record(dict(record, messages=record["messages"][:1]), [1], clip)


class _SpokenQuestions(audio_tokens.sources.Source):
    """A source kind of the test: spoken questions with text answers (one audio part)."""
    ANSWERS = ("red", "blue square")

    def parts(self, split):
        import grain

        records = [{"id": f"{split}/{i}", "task": "spoken_vqa", "audio": [_SpeechRecords.CLIPS[i]],
                    "messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": answer}]}
                   for i, answer in enumerate(self.ANSWERS)]
        return {"spoken_vqa": audio_tokens.sources.Part(self.name, "audio", lambda: grain.MapDataset.source(records))}


audio_tokens.sources.register_source("test_spoken_questions", _SpokenQuestions)
# A test voice: a tone whose pitch and length follow the text, the same for the same text.
audio_tokens.register_voice("test_tone", lambda text, key: (0.3 * np.sin(np.arange(4000 + 400 * len(text))
                                                                          * (0.02 + 0.01 * len(text)))).astype(np.float32))


@pytest.mark.slow
def test_a_tts_source_speaks_the_answers_of_spoken_questions(tmp_path):
    _speech_run(tmp_path / "speech", _SpeechRecords.CLIPS)
    config = base.get_config()
    config.model.audio.enabled = True
    config.data.sources = dict(
        questions=dict(kind="test_spoken_questions"),
        answers=dict(kind="tts", speak="answers", voice="test_tone", from_source="questions",
                     tokenizer_workdir=str(tmp_path / "speech"), tokenizer_model=SPEECH_TOKENIZER,
                     dir=str(tmp_path / "answers")))
    part = audio_tokens.sources.parts(RunConfig.of(config), "eval")["answers"]
    records = [part.records()[i] for i in range(len(part.records()))]
    codes = audio_tokens.SpeechCodes.of_run(str(tmp_path / "speech"), SPEECH_TOKENIZER)
    voice = audio_tokens.get_voice("test_tone", "test")
    assert part.modality == "speech_gen" and [r["answer"] for r in records] == list(_SpokenQuestions.ANSWERS)
    for i, record in enumerate(records):
        spoken = voice(record["answer"], "")
        assert record["messages"] == [{"role": "system", "content": "Answer in speech."},
                                      {"role": "user", "content": "<audio>"},
                                      {"role": "assistant", "content": audio_tokens.gen_audio_text(codes(spoken))}]
        np.testing.assert_array_equal(record["audio"][0], audio_tokens.records_lib.decode_pcm16(
            audio_tokens.records_lib.pcm16_bytes(_SpeechRecords.CLIPS[i])))  # the question, kept
        np.testing.assert_array_equal(audio_tokens.records_lib.decode_pcm16(record["reference_audio"]),
                                      audio_tokens.records_lib.decode_pcm16(audio_tokens.records_lib.pcm16_bytes(spoken)))
    # A spoken question needs the audio tower; an unknown voice or mode is named.
    for field, value, match in (("model.audio.enabled", False, "asks its question in speech, but "
                                 "config.model.audio.enabled=False"),
                                ("data.sources.answers.voice", "nobody", "voice='nobody' is not a registered voice"),
                                ("data.sources.answers.speak", "songs", "speak='songs': one of")):
        bad = base.get_config()
        bad.update_from_flattened_dict({"model.audio.enabled": True})
        bad.data.sources = config.data.sources.to_dict()
        bad.data.sources.answers.dir = str(tmp_path / f"bad_{value}")
        bad.update_from_flattened_dict({field: value})
        with pytest.raises(ValueError, match=match):
            audio_tokens.sources.parts(RunConfig.of(bad), "eval")["answers"].records()

"""Inference: the sampling processors, the Generator against evaluate's greedy decoder, seeds,
streaming, stop tokens, output-head dispatch, and m2omni-generate on a 2-step checkpoint."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from m2omni_jax import build, evaluate, generate as generate_lib
from m2omni_jax.data import tokenizer as tokenizer_lib
from m2omni_jax.inference import decoding, sampling
from m2omni_jax.inference.generator import Generator
from m2omni_jax.inference.sampling import GREEDY, SamplingParams
from m2omni_jax.inference.streaming import HeadSegment, SegmentStream, TextSegment
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base  # noqa: E402

TINY_LLM = dict(vocab_size=512, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                mrope_sections=(2, 3, 3))
TINY_VISION = dict(width=16, depth=1, num_heads=2, out_width=16)
TEXTS = ["the red square is left of the blue circle", "what colour is the small triangle?",
         "a green star sits in the top right corner", "hello there, how are you today?"] * 20


# ----------------------------------------------------------------------------- sampling


def test_paper_defaults_and_checked_fields():
    assert SamplingParams() == SamplingParams(temperature=0.7, top_k=100, top_p=0.8, repetition_penalty=1.05)
    assert GREEDY.is_greedy and not SamplingParams().is_greedy
    with pytest.raises(Exception):
        SamplingParams().temperature = 1.0  # frozen
    for field, value in (("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                         ("repetition_penalty", 0.0)):
        with pytest.raises(ValueError, match=f"{field}={value}"):
            SamplingParams(**{field: value})


def test_top_k_keeps_exactly_the_k_largest():
    logits = jax.random.normal(jax.random.key(0), (3, 50))
    for k in (1, 7, 50):
        mask = np.asarray(sampling.top_k_mask(logits, k))
        assert (mask.sum(-1) == k).all()
        kth = np.sort(np.asarray(logits), -1)[:, -k][:, None]
        np.testing.assert_array_equal(mask, np.asarray(logits) >= kth)
    assert np.asarray(sampling.top_k_mask(logits, 0)).all()
    tied = jnp.zeros((1, 10))
    assert int(sampling.top_k_mask(tied, 3).sum()) == 3  # exactly k, ties or not


def test_top_p_keeps_the_smallest_set_with_mass_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: set(np.flatnonzero(np.asarray(sampling.top_p_mask(logits, p))[0]))  # noqa: E731
    assert kept(0.4) == {1} and kept(0.75) == {1, 3} and kept(0.9) == {1, 2, 3} and kept(1.0) == {0, 1, 2, 3}
    quarters = jnp.zeros((1, 4))  # probabilities of exactly 1/4: mass 1/2 is reached with two tokens
    assert int(sampling.top_p_mask(quarters, 0.5).sum()) == 2 and int(sampling.top_p_mask(quarters, 0.51).sum()) == 3
    rows = jax.random.normal(jax.random.key(1), (16, 40)) * 2
    probs = np.asarray(jax.nn.softmax(rows, -1))
    for p in (0.3, 0.8, 0.95):
        mask = np.asarray(sampling.top_p_mask(rows, p))
        for row, m in zip(probs, mask):
            assert row[m].sum() >= p - 1e-6
            assert row[m].sum() - row[m].min() < p  # without its least likely token: below p
            assert row[m].min() >= row[~m].max(initial=0)  # the most probable tokens


def test_temperature_to_zero_is_greedy():
    logits = jax.random.normal(jax.random.key(2), (8, 100))
    argmax = np.asarray(jnp.argmax(logits, -1))
    for seed in range(5):
        for temperature in (0.0, 1e-4):
            drawn = sampling.sample(jax.random.key(seed), logits, temperature, 0, 1.0)
            np.testing.assert_array_equal(drawn, argmax)
    hot = [sampling.sample(jax.random.key(s), logits, 1.0, 0, 1.0) for s in range(5)]
    assert any((np.asarray(h) != argmax).any() for h in hot)


def test_samples_stay_within_top_k_and_top_p():
    logits = jax.random.normal(jax.random.key(3), (4, 30))
    allowed = np.asarray(sampling.top_k_mask(logits, 3))
    for seed in range(20):
        drawn = np.asarray(sampling.sample(jax.random.key(seed), logits, 1.0, 3, 1.0))
        assert allowed[np.arange(4), drawn].all()
    nucleus = np.asarray(sampling.top_p_mask(logits, 0.5))
    for seed in range(20):
        drawn = np.asarray(sampling.sample(jax.random.key(seed), logits, 1.0, 0, 0.5))
        assert nucleus[np.arange(4), drawn].all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(sampling.apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0, -1.0]])
    tokens, segments = jnp.array([[0, 0, 5, 2]]), jnp.array([[0, 0, 1, 1]])
    np.testing.assert_array_equal(np.flatnonzero(sampling.seen_tokens(tokens, segments, 8)[0]), [2, 5])


# ----------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, model, params, tokenizer): a tiny omni model (no audio) with a real tokenizer."""
    root = tmp_path_factory.mktemp("inference")
    tokenizer = tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(TEXTS, str(root / "tok"), 512))
    config = base.get_config()
    config.model.kind = "omni"
    config.model.llm.update(TINY_LLM)
    # Every id decodable: the Generator's argmax leaves out the embedding's padding rows, evaluate's does not.
    config.model.llm.vocab_size = config.tokenizer.vocab_size = tokenizer.vocab_size
    config.model.vision.update(TINY_VISION)
    config.model.audio.enabled = False
    config.data.seq_len = 64
    config.data.vision.patches_per_row = 64
    config.train.batch_size = 8
    model = build.build_model(config, tokenizer)
    inputs = train_step.example_inputs(build.example_batch_shapes(config))
    params = nn.unbox(jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs))
    # Sharper logits than at init, so argmax ties cannot flip between two computations.
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 30
    return config, model, params, tokenizer


def image_record(seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    return {"messages": [{"role": "user", "content": "<image>what colour is the small triangle?"}], "images": [pixels]}


@pytest.fixture(scope="module")
def generator(tiny):
    config, model, params, tokenizer = tiny
    return Generator(model, params, tokenizer, config, stop_ids=())  # every reply runs its full length


def test_greedy_generator_equals_evaluates_greedy_decoder(tiny, generator):
    config, model, params, tokenizer = tiny
    records = [image_record(0), "hello there", image_record(1)]
    num_new = 12
    got = generator.generate(records, GREEDY, max_new_tokens=num_new)

    prompts = [generator.prompt(r) for r in records]
    prompt_len = max(len(p["ids"]) for p in prompts)
    padded = prompts + [prompts[0]] * (8 - len(prompts))
    inputs, next_position = decoding.prompt_inputs(config, padded, prompt_len, generator.vision_opts, None)
    with sharding.activate(generator.mesh, generator.rules):
        want = evaluate.make_greedy_decoder(model, prompt_len + num_new)(params, inputs, next_position, num_new)
    for g, w in zip(got, want):
        assert g.token_ids == tuple(w) and g.finish_reason == "length"
        assert g.text == tokenizer.decode(w)
    assert got[0].token_ids != got[1].token_ids  # the prompts matter


def test_the_same_seed_gives_the_same_sample_and_other_seeds_differ(generator):
    hot = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0)
    run = lambda seed, p=hot: generator.generate(["hello there"], p, max_new_tokens=10, seed=seed)[0].token_ids  # noqa: E731
    first = run(0)
    assert run(0) == first and run(jax.random.key(0)) == first
    assert len({run(s) for s in (1, 2, 3)} | {first}) > 1
    greedy = generator.generate(["hello there"], GREEDY, max_new_tokens=10)[0].token_ids
    assert run(5, SamplingParams(temperature=0.0, repetition_penalty=1.0, top_k=7)) == greedy


def test_streaming_concatenates_to_the_non_streamed_reply_and_is_only_text(tiny, generator):
    tokenizer = tiny[3]
    for params_, seed in ((GREEDY, 0), (SamplingParams(), 4)):
        reply = generator.generate([image_record(2)], params_, max_new_tokens=16, seed=seed)[0]
        pieces = list(generator.generate_stream(image_record(2), params_, max_new_tokens=16, seed=seed))
        assert all(isinstance(p, TextSegment) for p in pieces) and len(pieces) > 1
        assert "".join(p.text for p in pieces) == reply.text == tokenizer.decode(reply.token_ids)


def test_stop_tokens_end_generation(tiny, generator):
    config, model, params, tokenizer = tiny
    assert Generator(model, params, tokenizer, config).stop_ids == (tokenizer.special_id("<|eot_id|>"),
                                                                    tokenizer.eos_id)
    records = ["hello there", image_record(0)]
    free = generator.generate(records, GREEDY, max_new_tokens=10)
    stop = free[0].token_ids[3]
    stopped = generator.generate(records, GREEDY, max_new_tokens=10, stop_ids=(stop,))
    assert stopped[0].token_ids == free[0].token_ids[:free[0].token_ids.index(stop)]
    assert stopped[0].finish_reason == "stop"
    expected = free[1].token_ids[:free[1].token_ids.index(stop)] if stop in free[1].token_ids else free[1].token_ids
    assert stopped[1].token_ids == expected  # each row stops on its own
    streamed = generator.generate_stream("hello there", GREEDY, max_new_tokens=10, stop_ids=(stop,))
    assert "".join(s.text for s in streamed) == stopped[0].text
    # The decoder stops stepping once every row has stopped: here at its first token.
    steps = decoding.make_decoder(model, 64)
    inputs, next_position = decoding.prompt_inputs(config, [generator.prompt("hello")] * 8, 32,
                                                   generator.vision_opts, None)
    with sharding.activate(generator.mesh, generator.rules):
        assert len(list(steps(params, inputs, next_position, 10, stop_ids=range(512)))) == 1


def test_over_long_prompts_and_unmatched_media_are_clear_errors(tiny):
    config, model, params, tokenizer = tiny
    generator = Generator(model, params, tokenizer, config)
    with pytest.raises(ValueError, match=r"config.data.seq_len=64"):
        generator.generate_stream("hello there " * 40, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image"):
        generator.generate([{"messages": [{"role": "user", "content": "<image>hi"}]}])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generator.generate(["hi"], max_new_tokens=0)


def test_gen_spans_go_to_a_registered_head_and_flow_as_text_without_one(tiny):
    tokenizer = tiny[3]
    words, caption = tokenizer.encode("a picture: "), tokenizer.encode("red square")
    ids = words + [tokenizer.special_id("<gen_image>")] + caption + [tokenizer.special_id("</gen_image>")] + words
    made = []

    def head(token_ids, text):
        made.append(text)
        return np.zeros((4, 4, 3))

    stream = SegmentStream(tokenizer, {"image": head})
    segments = [s for t in ids for s in stream.push(t)] + stream.finish()
    heads = [s for s in segments if isinstance(s, HeadSegment)]
    assert made == ["red square"] and len(heads) == 1 and heads[0].token_ids == tuple(caption)
    assert heads[0].kind == "image" and heads[0].output.shape == (4, 4, 3)
    assert "".join(s.text for s in segments if isinstance(s, TextSegment)) == "a picture: a picture: "
    plain = SegmentStream(tokenizer, {})
    text = "".join(s.text for t in ids for s in plain.push(t)) + "".join(s.text for s in plain.finish())
    assert text == tokenizer.decode(ids) and "<gen_image>red square</gen_image>" in text
    with pytest.raises(ValueError, match="kind"):
        SegmentStream(tokenizer, {"video": head})


# ----------------------------------------------------------------------------- m2omni-generate


def test_generate_reply_with_an_image_from_a_checkpoint(tiny, tmp_path):
    """The CLI's path in-process: restore params only from a train-state checkpoint, an image file."""
    config, _, _, tokenizer = tiny
    config = config.copy_and_resolve_references()
    config.tokenizer.path = tokenizer.path
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    mesh = sharding.make_mesh(config.mesh)
    state, _, _ = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES, shapes, seed=0)
    with checkpointing.Checkpointer(tmp_path / "checkpoints", save_every=10, keep=1, async_save=False) as ckpt:
        ckpt.save(2, state, force=True)
    image = tmp_path / "scene.png"
    Image.fromarray(image_record()["images"][0]).save(image)

    generator = generate_lib.load_generator(config, str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, generator.params, state.params)
    record = generate_lib.conversation("what colour?", images=[str(image)])
    assert record["messages"][0]["content"] == "<image>what colour?"
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        reply = generate_lib.generate_reply(generator, record, GREEDY, 6, 0, out=f)
    want = generator.generate([record], GREEDY, max_new_tokens=6)[0].text
    assert reply == want and out.read_text() == want + "\n"
    with pytest.raises(generate_lib.faults.ConfigError, match=r"--image=.*nothing.png: no such file"):
        generate_lib.conversation("hi", images=[str(tmp_path / "nothing.png")])
    with pytest.raises(generate_lib.faults.ConfigError, match=r"--image=.*out.txt: unsupported or damaged image"):
        generate_lib.conversation("hi", images=[str(out)])
    with pytest.raises(generate_lib.faults.RunError, match="no checkpoint"):
        generate_lib.load_generator(config, str(tmp_path / "elsewhere"))


SMALL_LLM = ["--config.model.llm.width=32", "--config.model.llm.depth=2", "--config.model.llm.num_heads=2",
             "--config.model.llm.num_kv_heads=1", "--config.model.llm.head_dim=16",
             "--config.model.llm.mrope_sections=(2,3,3)", "--config.model.llm.mlp_dim=64",
             "--config.model.llm.vocab_size=512", "--config.tokenizer.vocab_size=512",
             "--config.data.sources.text.num_docs=200", "--config.data.sources.text.tokenizer_docs=200",
             "--config.data.seq_len=64", "--config.train.batch_size=8"]


def test_m2omni_generate_on_a_two_step_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    common = [f"--config={REPO}/configs/base.py", f"--workdir={tmp_path / 'run'}",
              f"--config.data.dir={tmp_path / 'data'}", f"--config.tokenizer.cache_dir={tmp_path / 'tok'}", *SMALL_LLM]

    def run(module, *args):
        return subprocess.run([sys.executable, "-m", module, *common, *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=REPO)

    trained = run("m2omni_jax.main", "--config.train.steps=2", "--config.checkpoint.every=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    greedy = run("m2omni_jax.generate", "--prompt=hello there", "--greedy", "--max_new_tokens=5")
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    assert greedy.stdout.endswith("\n") and len(greedy.stdout) > 1
    again = run("m2omni_jax.generate", "--prompt=hello there", "--greedy", "--max_new_tokens=5")
    assert again.stdout == greedy.stdout
    for args, message in ((["--prompt=hi", f"--image={tmp_path / 'missing.png'}"], "missing.png: no such file"),
                          (["--prompt=" + "hello there " * 40], "config.data.seq_len=64"),
                          (["--prompt=hi", "--top_p=2"], "--top_p=2.0 must be in"),
                          (["--prompt=hi", f"--image={REPO}/setup.py"], "setup.py: unsupported or damaged image")):
        failed = run("m2omni_jax.generate", *args)
        last = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode == 2 and last.startswith("m2omni-generate: ") and message in last, failed.stderr[-2000:]


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_decoding_equals_one_step_per_call(tiny, generator, chunk):
    """Steps scanned on the device in chunks (and a 7-step tail of 4+2+1) give the tokens of
    one step per call, greedy and sampled (the PRNG key and seen tokens carried through)."""
    config, model, params, tokenizer = tiny
    inputs, next_position = decoding.prompt_inputs(config, [generator.prompt("hello there")] * 8, 32,
                                                   generator.vision_opts, None)
    hot = SamplingParams(temperature=1.5, top_k=0, top_p=0.9)
    for select, carry in ((decoding.greedy_select, None),
                          (sampling.make_sampled_select(tokenizer.vocab_size),
                           {"key": jax.random.key(3), "seen": sampling.seen_tokens(
                               inputs["tokens"], inputs["segment_ids"], tokenizer.vocab_size), **hot.arrays()})):
        with sharding.activate(generator.mesh, generator.rules):
            one = np.stack(list(decoding.make_decoder(model, 64, select)(params, inputs, next_position, 8 + 8, (), carry)))
            many = np.stack(list(decoding.make_decoder(model, 64, select, chunk=chunk)(
                params, inputs, next_position, 8 + 8, (), carry)))
        np.testing.assert_array_equal(many, one)
    with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
        decoding.make_decoder(model, 64, chunk=0)

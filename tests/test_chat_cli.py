"""m2omni-chat: the chat loop on stdin-like input (turns, /image, /reset, /quit, errors that
name the file or field and let the chat go on), saving head outputs, and the command itself."""
import io
import os
import subprocess
import sys
import wave

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from m2omni_jax import build, chat_cli, generate as generate_lib
from m2omni_jax.data import tokenizer as tokenizer_lib
from m2omni_jax.inference.generator import Generator
from m2omni_jax.inference.sampling import GREEDY
from m2omni_jax.inference.streaming import HeadSegment
from m2omni_jax.training import train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base  # noqa: E402

TEXTS = ["the red square is left of the blue circle", "what colour is the small triangle?",
         "a green star sits in the top right corner", "hello there, how are you today?"] * 20


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(TEXTS, str(root / "tok"), 512))
    config = base.get_config()
    config.model.kind = "omni"
    config.model.llm.update(vocab_size=tokenizer.vocab_size, width=32, depth=2, num_heads=2, num_kv_heads=1,
                            head_dim=16, mlp_dim=64, mrope_sections=(2, 3, 3))
    config.tokenizer.vocab_size = tokenizer.vocab_size
    config.model.vision.update(width=16, depth=1, num_heads=2, out_width=16)
    config.model.audio.enabled = False
    config.data.seq_len = 96
    config.data.vision.patches_per_row = 64
    model = build.build_model(config, tokenizer)
    inputs = train_step.example_inputs(build.example_batch_shapes(config))
    params = nn.unbox(jax.jit(lambda x: model.init(jax.random.key(0), **x)["params"])(inputs))
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 30  # no argmax ties
    return Generator(model, params, tokenizer, config, stop_ids=())


def chat(generator, text, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    replies = chat_cli.chat_loop(generator, GREEDY, io.StringIO(text), out, err, max_new_tokens=4, **kwargs)
    return replies, out.getvalue(), err.getvalue().splitlines()


def test_turns_carry_the_history_and_the_attached_image(generator, tmp_path):
    image = tmp_path / "scene.png"
    pixels = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    replies, out, err = chat(generator, f"/image {image}\nwhat colour?\nand the star?\n/quit\nnot read\n")
    assert replies == 2 and err == []
    first = {"messages": [{"role": "user", "content": "<image>what colour?"}], "images": [pixels]}
    [one] = generator.generate([first], GREEDY, max_new_tokens=4)
    second = {"messages": first["messages"] + [{"role": "assistant", "content": one.text},
                                               {"role": "user", "content": "and the star?"}], "images": [pixels]}
    [two] = generator.generate([second], GREEDY, max_new_tokens=4)
    assert out == f"[attached image {image} to the next turn]\n{one.text}\n{two.text}\n"


def test_reset_forgets_the_conversation(generator):
    replies, out, err = chat(generator, "hello there\n/reset\nhello there\n")
    lines = out.splitlines()
    assert replies == 2 and err == [] and lines[1] == "[conversation reset]" and lines[0] == lines[2]


def test_errors_name_the_file_or_field_and_the_chat_goes_on(generator, tmp_path):
    text = (f"/image {tmp_path / 'missing.png'}\n/audio {REPO}/setup.py\n/image\n/draw x\n"
            + "hello there " * 40 + "\nhello there\n")
    replies, out, err = chat(generator, text)
    assert replies == 1 and len(err) == 5, err
    assert err[0] == f"m2omni-chat: /image {tmp_path / 'missing.png'}: no such file"
    assert err[1].startswith(f"m2omni-chat: /audio {REPO}/setup.py: unsupported or damaged audio file")
    assert err[2] == "m2omni-chat: /image needs a file: /image PATH"
    assert err[3].startswith("m2omni-chat: unknown command '/draw'")
    assert "config.data.seq_len=96" in err[4]
    [want] = generator.generate(["hello there"], GREEDY, max_new_tokens=4)
    assert out == want.text + "\n"  # the failed turn left no trace in the history


def test_head_outputs_are_written_as_png_and_wav(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    first = generate_lib.save_head_output(HeadSegment("image", pixels, (), ""), str(tmp_path / "out"))
    second = generate_lib.save_head_output(HeadSegment("image", pixels, (), ""), str(tmp_path / "out"))
    assert (first, second) == (str(tmp_path / "out/image_000.png"), str(tmp_path / "out/image_001.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(first)), pixels)
    tone = 0.5 * np.sin(np.linspace(0, 100, 800))
    path = generate_lib.save_head_output(HeadSegment("audio", (tone, 8000), (), ""), str(tmp_path / "out"))
    with wave.open(path) as f:
        assert (f.getframerate(), f.getnframes(), f.getsampwidth()) == (8000, 800, 2)
        pcm = np.frombuffer(f.readframes(800), "<i2") / 32767
    np.testing.assert_allclose(pcm, tone, atol=1e-4)


@pytest.mark.slow
def test_m2omni_chat_reads_turns_from_stdin(tmp_path):
    """A 2-step run, then the command with turns and a bad attachment on stdin (~40 s)."""
    from test_inference import SMALL_LLM
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    common = [f"--config={REPO}/configs/base.py", f"--workdir={tmp_path / 'run'}",
              f"--config.data.dir={tmp_path / 'data'}", f"--config.tokenizer.cache_dir={tmp_path / 'tok'}", *SMALL_LLM]
    trained = subprocess.run([sys.executable, "-m", "m2omni_jax.main", *common, "--config.train.steps=2",
                              "--config.checkpoint.every=2"], capture_output=True, text=True, env=env, cwd=REPO)
    assert trained.returncode == 0, trained.stderr[-2000:]
    turns = f"hello there\n/image {tmp_path / 'nothing.png'}\nhow are you?\n/quit\n"
    chat = subprocess.run([sys.executable, "-m", "m2omni_jax.chat_cli", *common, "--greedy", "--max_new_tokens=3"],
                          input=turns, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert len(chat.stdout.splitlines()) == 2 and not chat.stdout.startswith("> ")
    assert f"m2omni-chat: /image {tmp_path / 'nothing.png'}: no such file" in chat.stderr

"""Hugging Face import/export (interop/): logits, vision features and greedy continuations
equal `transformers`' on small random models built here (no download)."""
import json
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m2omni_jax.config_fields import ConfigError  # noqa: E402
from m2omni_jax.data.tokenizer import SPECIAL_TOKENS  # noqa: E402
from m2omni_jax.inference import decoding  # noqa: E402
from m2omni_jax.interop import convert, hf, safetensors_io  # noqa: E402
from m2omni_jax.interop.hf_tokenizer import HFTokenizer  # noqa: E402
from m2omni_jax.models.llm import LLM, LLMConfig  # noqa: E402
from m2omni_jax.models.vision import VisionEncoder  # noqa: E402
from m2omni_jax.training import checkpointing  # noqa: E402
from test_workdir import bucket  # noqa: F401,E402  (the in-memory gs:// fixture)

TOL = 1e-4  # max |logit diff|, fp32
VOCAB = 96
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
             initializer_range=0.1)  # large enough weights that attention is far from uniform


def _save(model_cls, config, folder):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    return model


def _llama(folder, rope_scaling=None, vocab_size=VOCAB):
    config = transformers.LlamaConfig(vocab_size=vocab_size, rope_theta=10_000.0, rope_scaling=rope_scaling, **SMALL)
    return _save(transformers.LlamaForCausalLM, config, folder)


def _qwen2(folder, tie=True):
    config = transformers.Qwen2Config(vocab_size=VOCAB, rope_theta=1_000_000.0, tie_word_embeddings=tie, **SMALL)
    return _save(transformers.Qwen2ForCausalLM, config, folder)


def _tokens(batch=2, length=40, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _hf_logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.numpy()


def _our_logits(cfg, params, tokens, positions=None):
    return np.asarray(LLM(cfg).apply({"params": params}, jnp.asarray(tokens), positions))


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE], ids=["plain", "llama3"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_llama_logits_match(tmp_path, rope_scaling, scan_layers):
    model = _llama(tmp_path, rope_scaling)
    imported = hf.load_hf(str(tmp_path), scan_layers=scan_layers)
    assert imported.architecture == hf.LLAMA and imported.kind == "llm"
    assert imported.llm.rope_scaling == ("llama3" if rope_scaling else "none")
    tokens = _tokens()  # 40 positions: past the 16 the llama3 scaling keeps as they are
    ref = _hf_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # logits that would show a wrong weight
    assert np.abs(_our_logits(imported.llm, imported.params, tokens) - ref).max() <= TOL
    if rope_scaling:  # the scaling matters at these positions: leaving it out breaks parity
        plain = dataclasses.replace(imported.llm, rope_scaling="none")
        assert np.abs(_our_logits(plain, imported.params, tokens) - ref).max() > 1e-2


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_qwen2_logits_match(tmp_path, tie):
    model = _qwen2(tmp_path, tie)
    imported = hf.load_hf(str(tmp_path))
    assert imported.llm.qkv_bias and imported.llm.tie_embeddings == tie
    assert ("lm_head" in imported.params) == (not tie)
    tokens = _tokens()
    assert np.abs(_our_logits(imported.llm, imported.params, tokens) - _hf_logits(model, tokens)).max() <= TOL


def test_text_mrope_is_plain_rope(tmp_path):
    """Sectioned M-RoPE with t = h = w (from an offset) equals the 1-D RoPE Llama was trained with."""
    model = _llama(tmp_path, LLAMA3_ROPE)
    imported = hf.load_hf(str(tmp_path))
    assert imported.llm.mrope_layout == "sectioned" and len(set(imported.llm.mrope_sections)) > 1
    tokens = _tokens()
    ids = np.broadcast_to(np.arange(7, 7 + tokens.shape[1]), tokens.shape)
    ours = _our_logits(imported.llm, imported.params, tokens, jnp.asarray(np.stack([ids] * 3)))
    ref = _hf_logits(model, tokens, position_ids=torch.tensor(ids))
    assert np.abs(ours - ref).max() <= TOL


def _qwen2vl(folder):
    text = dict(vocab_size=VOCAB, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **SMALL)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=4, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, initializer_range=0.1)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    return _save(transformers.Qwen2VLForConditionalGeneration, config, folder)


def _vision_inputs(grids, patch_dim, merge=2, padding=8):
    """HF's (pixel_values, grid_thw) and our packed (patches, segment ids, hw positions) of
    the same images: one segment per temporal frame, (row, col) in merge-block order."""
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(sum(t * h * w for t, h, w in grids), patch_dim)).astype(np.float32)
    segments, rows, cols, segment = [], [], [], 0
    for t, h, w in grids:
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        order = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()  # noqa: E731
        for _ in range(t):
            segment += 1
            segments += [segment] * (h * w)
            rows.append(order(r))
            cols.append(order(c))
    patches = np.concatenate([pixels, np.zeros((padding, patch_dim), np.float32)])[None]
    segment_ids = np.array(segments + [0] * padding)[None]
    hw = np.stack([np.concatenate(rows + [np.zeros(padding, int)]), np.concatenate(cols + [np.zeros(padding, int)])])
    return (torch.tensor(pixels), torch.tensor(grids)), (patches, segment_ids, hw[None])


def test_qwen2vl_vision_tower_and_mrope_llm_match(tmp_path):
    model = _qwen2vl(tmp_path)
    imported = hf.load_hf(str(tmp_path))
    assert imported.architecture == hf.QWEN2_VL and imported.kind == "omni"
    assert imported.llm.mrope_sections == (2, 3, 3) and imported.llm.qkv_bias

    grids = [[1, 4, 6], [2, 2, 4]]  # an image, and a 2-frame video
    hf_inputs, ours = _vision_inputs(grids, imported.vision.patch_dim)
    with torch.no_grad():
        ref = model.model.visual(*hf_inputs).pooler_output.numpy()
    features, merged_ids = VisionEncoder(imported.vision).apply({"params": imported.params["vision"]},
                                                                *map(jnp.asarray, ours))
    features = np.asarray(features)[0]
    assert np.abs(ref).max() > 0.1
    assert np.abs(features[:len(ref)] - ref).max() <= TOL
    assert not features[len(ref):].any()  # padding patches give zero features

    # The language model under genuinely 3-D M-RoPE ids (an image grid's t/h/w).
    tokens = _tokens(length=24)
    rng = np.random.default_rng(1)
    positions = np.sort(rng.integers(0, 30, (3, 2, 24)), axis=-1)
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions))
        ref = model.lm_head(hidden.last_hidden_state).numpy()
    ours = _our_logits(imported.llm, imported.params["llm"], tokens, jnp.asarray(positions))
    assert np.abs(ours - ref).max() <= TOL


def test_greedy_continuation_matches_generate(tmp_path):
    model = _llama(tmp_path, LLAMA3_ROPE)
    imported = hf.load_hf(str(tmp_path))
    prompt, num_new = _tokens(length=12, seed=3), 8
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt), max_new_tokens=num_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0).numpy()[:, prompt.shape[1]:]
    decode = decoding.make_greedy_decoder(LLM(imported.llm), max_len=32)
    positions = np.broadcast_to(np.arange(prompt.shape[1]), prompt.shape)
    inputs = {"tokens": jnp.asarray(prompt), "positions": jnp.asarray(np.stack([positions] * 3)),
              "segment_ids": jnp.ones(prompt.shape, jnp.int32)}
    ours = decode(imported.params, inputs, np.full(prompt.shape[0], prompt.shape[1]), num_new)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, True)], ids=["llama", "qwen2"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, qkv_bias, tie):
    scaling = {} if qkv_bias else dict(rope_scaling="llama3", rope_scaling_factor=4.0, rope_original_max_len=16)
    cfg = LLMConfig(vocab_size=VOCAB, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                    mrope_sections=(2, 3, 3), rope_theta=10_000.0, qkv_bias=qkv_bias, tie_embeddings=tie,
                    norm_eps=1e-5, **scaling)
    params = nn.unbox(LLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    if qkv_bias:  # biases start at 0; make them count
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.5 if jax.tree_util.keystr(p).endswith("['bias']") else x, params)
    files = hf.export_hf(params, cfg, str(tmp_path), max_shard_bytes=100_000)  # sharded, with an index
    assert safetensors_io.INDEX_FILE in files
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(model).__name__ == (hf.QWEN2 if qkv_bias else hf.LLAMA)
    tokens = _tokens()
    assert np.abs(_our_logits(cfg, params, tokens) - _hf_logits(model, tokens)).max() <= TOL
    back = hf.load_hf(str(tmp_path))  # and round-trips through our reader
    assert back.llm == dataclasses.replace(cfg, mrope_sections=back.llm.mrope_sections)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), params, back.params))


def _tokenizer_folder(folder, vocab_size):
    """A byte-level BPE tokenizer.json trained here, with a tokenizer_config.json naming bos/eos."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park", "hello world"] * 20, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}, f)
    return tok.get_vocab_size()


def test_tokenizer_adapter(tmp_path):
    base = _tokenizer_folder(tmp_path, 300)
    tok = HFTokenizer(str(tmp_path))
    assert tok.vocab_size == base + len(SPECIAL_TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert len({tok.special_id(t) for t in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)
    text = "<image>the cat<|eot_id|> sat"
    ids = tok.encode(text)
    assert ids[0] == tok.special_id("<image>") and tok.special_id("<|eot_id|>") in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(text) == ids and again.eos_id == tok.eos_id
    chat, mask = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    header = lambda role: ([tok.special_id("<|start_header_id|>")] + tok.encode(role)  # noqa: E731
                           + [tok.special_id("<|end_header_id|>")] + tok.encode("\n\n"))
    eot = tok.special_id("<|eot_id|>")
    assert chat == ([tok.bos_id] + header("user") + tok.encode("hi") + [eot]
                    + header("assistant") + tok.encode("yo") + [eot])
    assert sum(mask) == len(tok.encode("yo")) + 1
    saved = tmp_path / "saved"
    tok.save(str(saved))
    assert HFTokenizer(str(saved)).encode(text) == ids  # special ids kept, roles read back
    assert transformers.AutoTokenizer.from_pretrained(str(saved)).eos_token_id == tok.eos_id


def test_tokenizer_is_written_to_and_read_from_a_bucket(tmp_path, bucket):  # noqa: F811
    _tokenizer_folder(tmp_path, 300)
    tok = HFTokenizer(str(tmp_path))
    tok.save("gs://bucket/import")  # m2omni-import --out=gs://...
    assert json.loads(bucket["/bucket/import/tokenizer_config.json"].getvalue())["eos_token"] == "</s>"
    again = HFTokenizer("gs://bucket/import/tokenizer.json")
    assert again.encode("<image>the cat") == tok.encode("<image>the cat") and again.pad_id == tok.pad_id


def test_import_command_end_to_end(tmp_path):
    """m2omni-import writes a checkpoint load_params (config.init_from) restores; the embedding
    grows for the tokenizer's new special tokens; --export gives transformers the same logits."""
    hf_dir, out, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    vocab = _tokenizer_folder(hf_dir, 300)
    model = _llama(hf_dir, LLAMA3_ROPE, vocab_size=vocab)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "m2omni_jax.import_hf"]
    done = subprocess.run(cmd + [f"--hf={hf_dir}", f"--out={out}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    written = json.loads((out / convert.MODEL_CONFIG).read_text())
    assert written["model"]["kind"] == "llm" and written["tokenizer"]["vocab_size"] == vocab + len(SPECIAL_TOKENS)
    cfg = convert.read_llm_config(str(out / convert.MODEL_CONFIG))
    assert cfg.vocab_size == 384 and cfg.rope_scaling == "llama3"  # 300 + 19 rounded up to 128s

    # What build.init_from_previous_stage does: abstract params with shardings -> load_params.
    boxed = jax.eval_shape(lambda: LLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.unbox(boxed))
    params, missing = checkpointing.load_params(str(out), abstract)
    assert missing == []
    tokens = _tokens(vocab=vocab)
    ref = _hf_logits(model, tokens)
    assert np.abs(_our_logits(cfg, params, tokens)[..., :vocab] - ref).max() <= TOL

    done = subprocess.run(cmd + ["--export", f"--ckpt={out}", f"--out={back}"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(back)).eval()
    assert np.abs(_hf_logits(exported, tokens)[..., :vocab] - ref).max() <= TOL
    assert transformers.AutoTokenizer.from_pretrained(str(back)).convert_tokens_to_ids("<image>") >= vocab

    done = subprocess.run(cmd + [f"--hf={hf_dir}", f"--out={out}"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "holds checkpoints already" in done.stderr.strip().splitlines()[-1]


def test_qwen2vl_import_restores_both_towers_and_exports_its_llm(tmp_path):
    """An omni import ({"llm", "vision"}, as OmniModel's tree) restores through load_params, and
    its LLM tower exports as a Qwen2ForCausalLM that reads text as Qwen2-VL's own LM does."""
    model = _qwen2vl(tmp_path / "hf")
    written = convert.import_folder(str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert written["model"]["kind"] == "omni" and written["model"]["vision"]["width"] == 32
    imported = hf.load_hf(str(tmp_path / "hf"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), imported.params)
    params, missing = checkpointing.load_params(str(tmp_path / "ours"), abstract)
    assert missing == [] and np.array_equal(params["vision"]["patch_embed"]["kernel"],
                                            imported.params["vision"]["patch_embed"]["kernel"])
    convert.export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "back"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert type(exported).__name__ == hf.QWEN2
    tokens = _tokens(length=24)
    with torch.no_grad():
        ref = model.lm_head(model.model.language_model(input_ids=torch.tensor(tokens)).last_hidden_state).numpy()
    assert np.abs(_hf_logits(exported, tokens) - ref).max() <= TOL


def _config_folder(folder, **changes):
    _llama(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("changes,named", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
])
def test_unsupported_checkpoints_are_named(tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        hf.load_hf(_config_folder(tmp_path, **changes))


def test_missing_and_unmapped_tensors_are_named(tmp_path):
    folder = _config_folder(tmp_path, num_hidden_layers=3)  # one layer more than the weights hold
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight is missing"):
        hf.load_hf(folder)
    folder = _config_folder(tmp_path / "fewer", num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"no place .*model\.layers\.1\."):
        hf.load_hf(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf(str(tmp_path / "nowhere"))

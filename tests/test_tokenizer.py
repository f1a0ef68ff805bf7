import os
import pickle

import ml_collections
import pytest
import sentencepiece as spm

from m2omni_jax.experiments.shapes_world import world as shapes_world, text_corpus
from m2omni_jax.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer,
                                       get_tokenizer, train_tokenizer, training_text)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = map(training_text, text_corpus.iter_documents(800, seed=0))
    return Tokenizer(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "m"), 1024))


def _config(tmp_path, train_docs=300, train_chats=50, **tokenizer):
    """The built-in tokenizer's sources: the text corpus's documents, then shapes-world chats."""
    return ml_collections.ConfigDict({
        "data": {"seed": 0, "dir": str(tmp_path), "sources": {
            "text": {"kind": "text_corpus", "num_docs": 10, "tokenizer_docs": train_docs},
            "shapes_world": {"kind": "shapes_world", "tasks": ("caption",), "tokenizer_chats": train_chats}}},
        "tokenizer": {"path": "", "cache_dir": str(tmp_path), "vocab_size": 512, **tokenizer}})


def test_reserved_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 2, 3)
    assert tok._sp.unk_id() == UNK_ID == 1
    assert 300 < tok.vocab_size <= 1024


def test_special_tokens_are_single_ids_and_round_trip(tok):
    ids = [tok.special_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and min(ids) > EOS_ID
    for t, i in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(t) == [i]
        assert tok.decode([i]) == t
    text = "a <image><imagePatch><imagePatch></image> b <gen_audio><gen_audioPatch></gen_audio>"
    encoded = tok.encode(text)
    assert encoded.count(tok.special_id("<imagePatch>")) == 2
    assert tok.decode(encoded) == text
    with pytest.raises(KeyError):
        tok.special_id("<nope>")


@pytest.mark.parametrize("text", [
    "",
    "The small red circle is left of the blue square.",
    "  two  spaces, a\ttab and\nnew\n\nlines ",
    "Unicode: héllo wörld — 日本語 🙂 ∑ ß",
    "digits 12345 and symbols {}[]<>|\\~`",
    "<image> looks like a tag but <image is not",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("日本")
    assert UNK_ID not in ids
    assert all(tok._sp.id_to_piece(i).startswith("<0x") for i in ids)


def test_chat_template_mask(tok):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What color is the star?"},
        {"role": "assistant", "content": "The star is red."},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": "At the top."},
    ]
    ids, mask = tok.apply_chat_template(messages)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    assert tok.decode(ids) == "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "The star is red.<|eot_id|>At the top.<|eot_id|>"
    eot = tok.special_id("<|eot_id|>")
    # every assistant turn's closing eot is trained, other turns' are not
    assert [m for i, m in zip(ids, mask) if i == eot] == [0, 0, 1, 0, 1]

    ids, mask = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not any(mask)


def test_chat_template_names_a_bad_role_and_a_late_system_turn(tok):
    with pytest.raises(ValueError, match=r"messages\[1\]\.role='bot' must be one of"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}])
    with pytest.raises(ValueError, match=r"messages\[1\]\.role='system': a system turn may only come first"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}])


def test_eval_prompt_keeps_a_records_system_turn(tok):
    from m2omni_jax.data import chat, media
    record = {"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "What color is the star?"},
                           {"role": "assistant", "content": "Red."}]}
    prompt = chat.eval_prompt(record, tok, media.VisionOptions())
    assert tok.decode(prompt["ids"]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat color is the star?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a blue star <audio>") == tok.encode("a blue star <audio>")


def test_train_from_corpus_path(tmp_path):
    corpus = tmp_path / "corpus"
    text_corpus.write_text_corpus(str(corpus), 200, seed=1, num_shards=2)
    model = Tokenizer(train_tokenizer(str(corpus), str(tmp_path / "m"), 400))
    assert model.decode(model.encode("The picture shows two shapes.")) == "The picture shows two shapes."


def test_get_tokenizer_trains_once_and_caches(tmp_path):
    config = _config(tmp_path)
    first = get_tokenizer(config)
    mtime = os.path.getmtime(first.path)
    second = get_tokenizer(config)
    assert second.path == first.path and os.path.getmtime(second.path) == mtime
    assert second.encode("a red circle") == first.encode("a red circle")


def test_builtin_tokenizer_has_one_token_per_one_word_answer(tmp_path):
    """VQA answers open the assistant turn with no space before them; each must be one
    token, and colour names must not share a first token (blue/black, cyan/circle)."""
    tok = get_tokenizer(_config(tmp_path, vocab_size=1024, train_docs=1000, train_chats=600))
    answers = list(shapes_world.COLORS) + list(shapes_world.SHAPES)
    for answer in answers:
        ids, mask = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat color is it?"},
                                             {"role": "assistant", "content": answer}])
        answer_ids = [i for i, m in zip(ids, mask) if m][:-1]  # without <|eot_id|>
        assert len(answer_ids) == 1, (answer, [tok.decode([i]) for i in answer_ids])
    assert len({tuple(tok.encode(a)) for a in answers}) == len(answers)


def test_get_tokenizer_user_path(tmp_path, tok):
    assert get_tokenizer(_config(tmp_path, path=tok.path)).vocab_size == tok.vocab_size
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        get_tokenizer(_config(tmp_path, path=missing))


def test_user_model_without_special_tokens_is_rejected(tmp_path):
    texts = map(training_text, text_corpus.iter_documents(200, seed=0))
    spm.SentencePieceTrainer.train(sentence_iterator=texts, model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="plain.model.*<image>"):
        get_tokenizer(_config(tmp_path, path=str(tmp_path / "plain.model")))


def _hf_tokenizer_json(folder):
    """A small byte-level BPE tokenizer.json (a Hugging Face checkpoint's tokenizer)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "hello world"] * 20, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return os.path.join(folder, "tokenizer.json")


def test_get_tokenizer_reads_a_hugging_face_tokenizer_json(tmp_path, tok):
    from m2omni_jax.interop.hf_tokenizer import HFTokenizer  # registers the tokenizer.json reader
    file = _hf_tokenizer_json(tmp_path / "hf")
    for path in (file, str(tmp_path / "hf")):  # the file or its folder
        got = get_tokenizer(_config(tmp_path, path=path))
        assert type(got) is HFTokenizer and got.encode("<image>the cat")[0] == got.special_id("<image>")
    assert type(get_tokenizer(_config(tmp_path, path=tok.path))) is Tokenizer  # SentencePiece stays the default
    with pytest.raises(ValueError, match="empty.*is a folder without a tokenizer file"):
        os.makedirs(tmp_path / "empty")
        get_tokenizer(_config(tmp_path, path=str(tmp_path / "empty")))

"""SentencePiece tokenizer with M2-omni's special tokens and a Llama-3 chat template.

Ids: pad 0, unk 1, bos 2, eos 3, then the special tokens in `SPECIAL_TOKENS`
order (each a `user_defined_symbols` entry, so it is one id wherever it
appears in text). Byte fallback makes every string round-trip; normalisation
is off (identity, no dummy prefix, whitespace kept) so that pieces encoded
separately concatenate to the same text.
"""
from __future__ import annotations

import glob
import hashlib
import os
import uuid
from typing import Callable, Iterable, Sequence

import sentencepiece as spm

from m2omni_jax import faults
from m2omni_jax.data import records as records_lib
from m2omni_jax.data import sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

MODALITY_TOKENS = (
    "<image>", "</image>", "<imagePatch>",
    "<video>", "</video>", "<videoPatch>",
    "<audio>", "</audio>", "<audioPatch>", "<end_of_audio>",
    "<gen_image>", "</gen_image>", "<gen_imagePatch>",
    "<gen_audio>", "</gen_audio>", "<gen_audioPatch>",
)
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIAL_TOKENS = MODALITY_TOKENS + CHAT_TOKENS

DEFAULT_VOCAB_SIZE = 1024
DEFAULT_CACHE_DIR = "~/.cache/m2omni_jax/tokenizer"


class Tokenizer:
    """Wraps a `SentencePieceProcessor`; picklable (for grain worker processes)."""

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            if not model_path or not os.path.exists(model_path):
                raise FileNotFoundError(f"SentencePiece model not found: {model_path!r}")
            with open(model_path, "rb") as f:
                model_proto = f.read()
        self.path = model_path
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's message names neither the file nor the problem
            raise faults.RunError(f"tokenizer {model_path or '<proto>'} is not a SentencePiece model "
                                  f"({' '.join(str(e).split())})") from e
        missing = [t for t in SPECIAL_TOKENS if not self._is_single_piece(t)]
        if missing:
            raise ValueError(
                f"SentencePiece model {model_path or '<proto>'} lacks special tokens {missing}; "
                "train it with them as user_defined_symbols (see train_tokenizer)")
        self._special = {t: self._sp.piece_to_id(t) for t in SPECIAL_TOKENS}

    def _is_single_piece(self, token: str) -> bool:
        i = self._sp.piece_to_id(token)
        return i != self._sp.unk_id() and self._sp.id_to_piece(i) == token

    def __getstate__(self):
        return {"path": self.path, "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.__init__(state["path"], model_proto=state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special[name]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos); special tokens in it become single ids."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad/bos/eos are dropped, special tokens kept as text."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False
                            ) -> tuple[list[int], list[int]]:
        """Llama-3 chat format; returns (ids, mask) with mask 1 on assistant content + its <|eot_id|>.

        `<bos><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...`, ending
        with an open assistant header when `add_generation_prompt`.
        """
        check_roles(messages)
        ids, mask = [self.bos_id], [0]
        eot = self._special["<|eot_id|>"]
        for m in messages:
            role, content = m["role"], m["content"]
            header = self._header(role)
            body = self.encode(content) + [eot]
            train = 1 if role == "assistant" else 0
            ids += header + body
            mask += [0] * len(header) + [train] * len(body)
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            mask += [0] * len(header)
        return ids, mask

    def _header(self, role: str) -> list[int]:
        return ([self._special["<|start_header_id|>"]] + self.encode(role)
                + [self._special["<|end_header_id|>"]] + self.encode("\n\n"))


CHAT_ROLES = ("system", "user", "assistant")


def check_roles(messages: Sequence[dict]) -> None:
    """Roles the template knows, a system turn only first (Llama-3's template, as the paper's)."""
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r} must be one of {CHAT_ROLES}")
        if role == "system" and i:
            raise ValueError(f"messages[{i}].role='system': a system turn may only come first")


training_text = records_lib.training_text  # a record as tokenizer-training text


def _corpus_texts(path: str) -> Iterable[str]:
    """Texts of a corpus directory (its *.array_record files) or one ArrayRecord file."""
    files = sorted(glob.glob(os.path.join(path, "*.array_record"))) if os.path.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"no *.array_record files in {path!r}")
    source = sources.ArrayRecordFiles(files)  # a damaged record reads as b"", skipped below
    for i in range(len(source)):
        try:
            yield training_text(records_lib.decode_record(source[i]))
        except (ValueError, KeyError, TypeError):
            continue


def train_tokenizer(texts_or_corpus_path: Iterable[str] | str | os.PathLike, model_prefix: str,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, *, model_type: str = "bpe") -> str:
    """Trains a SentencePiece model; returns the path `model_prefix + '.model'`.

    `texts_or_corpus_path` is an iterable of strings, or a corpus directory /
    ArrayRecord file of text records (`records.py`). The model is written
    under a temporary name and renamed, so readers never see a partial file.
    """
    if isinstance(texts_or_corpus_path, (str, os.PathLike)):
        texts = _corpus_texts(os.fspath(texts_or_corpus_path))
    else:
        texts = texts_or_corpus_path
    model_prefix = os.path.expanduser(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp-{uuid.uuid4().hex}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=tmp_prefix,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        user_defined_symbols=list(SPECIAL_TOKENS),
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        num_threads=1,  # determinism across hosts that each train their own copy
        minloglevel=2,
    )
    os.replace(tmp_prefix + ".model", model_prefix + ".model")
    os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
    return model_prefix + ".model"


def _get(cfg, key, default):
    value = getattr(cfg, key, default) if cfg is not None else default
    return default if value is None else value


# File name -> reader, for tokenizers of other formats: interop/hf_tokenizer.py registers
# "tokenizer.json" (a Hugging Face checkpoint's); the commands import it at start-up (cli.py).
_FILE_READERS: dict[str, Callable[[str], Tokenizer]] = {}
HF_TOKENIZER_FILE = "tokenizer.json"


def register_reader(file_name: str, reader: Callable[[str], Tokenizer]) -> None:
    _FILE_READERS[file_name] = reader


def read_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece model, or a registered format's file (or a folder holding one)."""
    folder, name = (path, None) if os.path.isdir(path) else os.path.split(path)
    if name is None:
        name = next((n for n in (*_FILE_READERS, HF_TOKENIZER_FILE) if os.path.exists(os.path.join(folder, n))), "")
    if name in _FILE_READERS:
        return _FILE_READERS[name](path)
    if name == HF_TOKENIZER_FILE:
        raise ValueError(f"config.tokenizer.path = {path!r} is a Hugging Face {HF_TOKENIZER_FILE}: import "
                         "m2omni_jax.interop.hf_tokenizer first to read it")
    if os.path.isdir(path):
        raise ValueError(f"config.tokenizer.path = {path!r} is a folder without a tokenizer file "
                         f"({', '.join(_FILE_READERS) or HF_TOKENIZER_FILE}); name the SentencePiece .model")
    return Tokenizer(path)


def get_tokenizer(config) -> Tokenizer:
    """The user's model (`config.tokenizer.path`: SentencePiece, or a Hugging Face
    tokenizer.json, `read_tokenizer`), or the built-in one, trained once and cached.

    The built-in model is trained on the texts the configured sources give
    (`sources.tokenizer_texts`: e.g. a corpus's first documents and a data set's chats,
    in config order) into `config.tokenizer.cache_dir`, under a name that hashes them.
    With `config.tokenizer.audio_codes` > 0 either is wrapped with that many `<audio_k>` tokens.
    """
    tok_cfg = getattr(config, "tokenizer", None)
    path = _get(tok_cfg, "path", "")
    if path:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.tokenizer.path = {path!r} does not exist")
        return with_audio_codes(read_tokenizer(path), tok_cfg)
    vocab_size = int(_get(tok_cfg, "vocab_size", DEFAULT_VOCAB_SIZE))
    key, texts = sources.tokenizer_texts(config)
    cache_dir = os.path.expanduser(_get(tok_cfg, "cache_dir", "") or DEFAULT_CACHE_DIR)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    prefix = os.path.join(cache_dir, f"bpe{vocab_size}-{digest}")
    if not os.path.exists(prefix + ".model"):
        train_tokenizer(texts, prefix, vocab_size)
    return with_audio_codes(Tokenizer(prefix + ".model"), tok_cfg)


def with_audio_codes(tokenizer, tok_cfg):
    """`tokenizer` wrapped with `tokenizer.audio_codes` `<audio_k>` tokens (`AudioTokenizer`) when > 0."""
    num_codes = int(_get(tok_cfg, "audio_codes", 0))
    if num_codes <= 0:
        return tokenizer
    from m2omni_jax.data.audio_tokens import AudioTokenizer  # jax-free users of this module skip its imports

    return AudioTokenizer(tokenizer, num_codes)

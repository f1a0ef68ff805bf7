"""A Hugging Face `tokenizer.json` behind our tokenizer interface (data/tokenizer.py).

    tokenizer = HFTokenizer("/models/Llama-3.1-8B")   # the folder, or its tokenizer.json
    tokenizer.encode("<image>Hi"), tokenizer.special_id("<|eot_id|>"), tokenizer.apply_chat_template(...)

Our special tokens (`SPECIAL_TOKENS`: modality markers, Llama-3 chat headers) are added
as special tokens: one id each wherever they appear in text. Those the vocabulary has
already (Llama-3's `<|eot_id|>`, ...) keep their ids; the others get new ids after it, so
a model's embedding may need rows for them (`hf.resize_vocab`, done by m2omni-import).
bos / eos / pad are the ones `tokenizer_config.json` names, else the usual names, else
eos (Qwen2 has no bos). The chat template is ours (Llama-3 style), whatever the
checkpoint's own template is.
"""
from __future__ import annotations

import json
from typing import Sequence

import tokenizers
from etils import epath

from m2omni_jax.data import tokenizer as tokenizer_lib
from m2omni_jax.data.tokenizer import SPECIAL_TOKENS

TOKENIZER_FILE, TOKENIZER_CONFIG = tokenizer_lib.HF_TOKENIZER_FILE, "tokenizer_config.json"
_USUAL = {"bos": ("<|begin_of_text|>", "<s>", "<bos>"),
          "eos": ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>"),
          "pad": ("<pad>", "<|finetune_right_pad_id|>")}


class HFTokenizer(tokenizer_lib.Tokenizer):
    """`tokenizers.Tokenizer` with the interface of `data.tokenizer.Tokenizer` (which it
    subclasses for the chat template); picklable, for grain worker processes."""

    def __init__(self, path: str, *, tokenizer_json: str | None = None, roles: dict | None = None):
        """path: a folder holding tokenizer.json (and tokenizer_config.json), or the file.
        tokenizer_json / roles: the serialised tokenizer and {bos, eos, pad: token} (unpickling)."""
        self.path = path
        file = epath.Path(path) / TOKENIZER_FILE if epath.Path(path).is_dir() else epath.Path(path)
        if tokenizer_json is None:
            if not file.exists():
                raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}")
            self._tok = tokenizers.Tokenizer.from_str(file.read_text())
        else:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                      for t in SPECIAL_TOKENS])
        self._special = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self._roles = dict(roles) if roles is not None else _roles(file.parent, self._tok)
        self._ids = {role: self._tok.token_to_id(token) for role, token in self._roles.items()}

    def __getstate__(self):
        return {"path": self.path, "json": self._tok.to_str(), "roles": self._roles}

    def __setstate__(self, state):
        self.__init__(state["path"], tokenizer_json=state["json"], roles=state["roles"])

    def save(self, folder: str) -> list[str]:
        """Writes tokenizer.json (our special tokens added) and a tokenizer_config.json naming
        bos / eos / pad, which this class and `transformers.AutoTokenizer` both read."""
        folder = epath.Path(folder)  # local or a bucket
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(self._tok.to_str(pretty=True))
        config = {f"{role}_token": token for role, token in self._roles.items()}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))
        return [TOKENIZER_FILE, TOKENIZER_CONFIG]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos); special tokens in it become single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad/bos/eos are dropped, special tokens kept as text."""
        drop = set(self._ids.values())
        return self._tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)


def _roles(folder: epath.Path, tok: tokenizers.Tokenizer) -> dict[str, str]:
    """{bos, eos, pad: token text}: tokenizer_config.json's, else a usual name the vocabulary has."""
    config = folder / TOKENIZER_CONFIG
    named = json.loads(config.read_text()) if config.exists() else {}
    roles = {}
    for role in ("bos", "eos", "pad"):
        token = named.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is None or tok.token_to_id(token) is None:
            token = next((t for t in _USUAL[role] if tok.token_to_id(t) is not None), None)
        roles[role] = token
    if roles["eos"] is None:
        raise ValueError(f"the tokenizer in {folder} has no eos token ({TOKENIZER_CONFIG} names none and it has "
                         f"none of {_USUAL['eos']})")
    roles["bos"] = roles["bos"] or roles["eos"]
    roles["pad"] = roles["pad"] or roles["eos"]
    return roles


tokenizer_lib.register_reader(TOKENIZER_FILE, HFTokenizer)  # config.tokenizer.path may name one

"""Source kind `jsonl`: LLaVA-style conversations, one JSON object a line, media as files.

    {"id": "0", "image": "coco/0001.jpg" (or a list), "audio": "clips/0001.wav" (or a list),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Image paths are relative to `image_root`, audio paths to `audio_root` (absolute paths stay).
A record with an image (audio) but no `<image>` (`<audio>`) placeholder gets one at the
start of its first human turn, as LLaVA's loader does. Roles: human/user -> user,
gpt/assistant -> assistant, system -> system. A line that does not parse is a bad record.

    config.data.sources.llava = dict(kind="jsonl", modality="image", train_file="/data/llava.jsonl",
                                     eval_file="", image_root="/data/images", audio_root="")
"""
from __future__ import annotations

import json
import os

import grain

from m2omni_jax.data.sources.base import Part, SafeDecode, Source, register_source

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _paths(value, root: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [os.path.join(os.path.expanduser(root), p) if root else p for p in items]


class LlavaRecord:
    """One JSON line -> an omni record (`records.py`); media stay file paths until read."""

    def __init__(self, modality: str, image_root: str, audio_root: str):
        self.modality, self.image_root, self.audio_root = modality, image_root, audio_root

    def __call__(self, line: str) -> dict:
        raw = json.loads(line)
        messages = [{"role": ROLES[turn["from"]], "content": str(turn["value"])} for turn in raw["conversations"]]
        record = {"id": str(raw.get("id", "")), "modality": self.modality, "messages": messages}
        for kind, key, root in (("image", "images", self.image_root), ("audio", "audio", self.audio_root)):
            if raw.get(kind):
                record[key] = _paths(raw[kind], root)
                first_user = next(m for m in messages if m["role"] == "user")
                if f"<{kind}>" not in "".join(m["content"] for m in messages):
                    first_user["content"] = f"<{kind}>\n" * len(record[key]) + first_user["content"]
        if messages and messages[-1]["role"] == "assistant":
            record["answer"] = messages[-1]["content"]
        return record


class JsonlSource(Source):
    """Fields: modality, train_file, eval_file (empty: no such split), image_root, audio_root,
    weight (factor within the modality), tokenizer_records."""

    def parts(self, split: str) -> dict[str, Part]:
        path = self.cfg.get(f"{split}_file", "")
        if not path:
            return {}
        convert = LlavaRecord(self.field("modality"), self.cfg.get("image_root", ""), self.cfg.get("audio_root", ""))

        def records():
            with open(os.path.expanduser(path)) as f:
                lines = [line for line in f if line.strip()]
            return grain.MapDataset.source(lines).map(SafeDecode(convert))
        return self.single_part(split, records)


register_source("jsonl", JsonlSource)

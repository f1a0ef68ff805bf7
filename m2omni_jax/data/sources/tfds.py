"""Source kind `tfds`: any TFDS data set by name (`tfds.data_source`, no TensorFlow needed to
read ArrayRecord-prepared data), turned into omni records by a field mapping.

`fields` names the features (a "/" path into nested features; a list feature gives its
first element): `image`, `audio` (the media of the user turn), `question` (the user's text;
empty: `prompt`), `answer` (the assistant's text), or `text` alone for a text corpus.

    # image-caption: "<image>\\nDescribe the image." -> the first caption
    config.data.sources.coco = dict(kind="tfds", name="coco_captions", modality="image",
        fields=dict(image="image", answer="captions/text"), prompt="Describe the image.")
    # VQA
    config.data.sources.vqa = dict(kind="tfds", name="vqav2", modality="image",
        fields=dict(image="image", question="question", answer="answers/answer"))
    # ASR: "<audio>\\nTranscribe the audio." -> the transcript
    config.data.sources.libri = dict(kind="tfds", name="librispeech", modality="audio",
        fields=dict(audio="speech", answer="text"), prompt="Transcribe the audio.",
        sample_rate=16000, eval_split="validation")
    # pure text
    config.data.sources.c4 = dict(kind="tfds", name="c4/en", modality="text", fields=dict(text="text"))
"""
from __future__ import annotations

import numpy as np

import grain

from m2omni_jax.data.sources.base import Part, SafeDecode, Source, register_source

FIELDS = ("image", "audio", "question", "answer", "text")


def feature(example, path: str):
    """The value at a "/" path of a (nested) example; a sequence gives its first element."""
    value = example
    for key in path.split("/"):
        value = value[key]
    texts = isinstance(value, np.ndarray) and value.dtype.kind in "OSU" and value.ndim > 0  # a text sequence
    if isinstance(value, (list, tuple)) or texts:
        value = value[0]
    return value


def as_text(value) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"a text feature is {type(value).__name__}, not str/bytes")
    return value


class ExampleToRecord:
    """A TFDS example -> an omni record (`records.py`) by the field mapping."""

    def __init__(self, modality: str, fields: dict, prompt: str, sample_rate: int):
        self.modality, self.fields, self.prompt, self.sample_rate = modality, fields, prompt, sample_rate

    def __call__(self, example) -> dict:
        get = lambda key: feature(example, self.fields[key])  # noqa: E731
        if self.fields.get("text"):
            return {"modality": self.modality, "text": as_text(get("text"))}
        record, placeholders = {"modality": self.modality}, ""
        if self.fields.get("image"):
            record["images"] = [np.asarray(get("image"))]
            placeholders += "<image>\n"
        if self.fields.get("audio"):
            record["audio"], record["sample_rate"] = [np.asarray(get("audio"))], self.sample_rate
            placeholders += "<audio>\n"
        question = as_text(get("question")) if self.fields.get("question") else self.prompt
        answer = as_text(get("answer"))
        record["messages"] = [{"role": "user", "content": placeholders + question},
                              {"role": "assistant", "content": answer}]
        record["answer"] = answer
        return record


class TfdsSource(Source):
    """Fields: name (e.g. "coco_captions/2014"), data_dir ("": TFDS's default), modality,
    train_split, eval_split (TFDS split names; empty: no such split), fields (see above),
    prompt, sample_rate (Hz of the audio feature), weight, tokenizer_records."""

    def parts(self, split: str) -> dict[str, Part]:
        tfds_split = self.cfg.get(f"{split}_split", "")
        if not tfds_split:
            return {}
        fields = {k: v for k, v in dict(self.field("fields")).items() if v}
        unknown = set(fields) - set(FIELDS)
        if unknown or not ("answer" in fields or "text" in fields):
            raise ValueError(f"config.data.sources.{self.name}.fields={fields}: known fields are {FIELDS}, "
                             "and 'answer' (or 'text' for a text corpus) is required")
        if "question" not in fields and "text" not in fields and not self.cfg.get("prompt"):
            raise ValueError(f"config.data.sources.{self.name}: set fields.question or prompt (the user's text)")
        convert = ExampleToRecord(self.field("modality"), fields, self.cfg.get("prompt", ""),
                                  int(self.cfg.get("sample_rate", 16_000)))
        name, data_dir = self.field("name"), self.cfg.get("data_dir", "") or None

        def records():
            import tensorflow_datasets as tfds

            source = tfds.data_source(name, split=tfds_split, data_dir=data_dir)
            return grain.MapDataset.source(source).map(SafeDecode(convert))
        return self.single_part(split, records)


register_source("tfds", TfdsSource)

"""The shapes world as data sources: kinds `shapes_world` (its tasks, and with the audio tower
its spoken tasks) and `text_corpus` (the built-in text corpus), registered on import, with
the voice "espeak" that speaks answers for a "tts" source with speak="answers".

Each task is a part of its own (named after the task); the records of a split live in one
ArrayRecord file, tasks round-robin (record i is task i mod the split's tasks), written once
per variant under `data.dir`. `default_config()` gives the `shapes_world` source's fields.

    config.data.sources.shapes_world = source.default_config()   # configs/tiny.py
    config.data.sources.shapes_world.tasks = ("caption", "ocr")
"""
from __future__ import annotations

import os

import grain
import ml_collections

from m2omni_jax.data import audio_tokens, mirror
from m2omni_jax.data import records as records_lib
from m2omni_jax.data import sources
from m2omni_jax.experiments.shapes_world import speech, text_corpus
from m2omni_jax.experiments.shapes_world import world as sw
from m2omni_jax.experiments.shapes_world import writer
from m2omni_jax.models import omni

HELDOUT_SEED_OFFSET = 7919  # the held-out text corpus is generated from another seed


def default_config() -> ml_collections.ConfigDict:
    """The `shapes_world` source's fields, each commented."""
    return ml_collections.ConfigDict(dict(
        kind="shapes_world",
        dir="",  # "": <data.dir>/shapes_world/<variant>; written once
        num_train=20_000, num_eval=1_000,  # records per split (tasks round-robin)
        tasks=("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "video_motion",
               "interleaved"),  # world.TASKS; train-only tasks (world.TRAIN_ONLY_TASKS) have no eval records
        # Factor per task within its modality (tasks not listed: 1).
        task_weights=ml_collections.ConfigDict({t: 1.0 for t in sw.TASKS if t != "gen_image"}),
        tokenizer_chats=600,  # the built-in tokenizer also sees the chats of this many records (one-word answers)
        # Spoken tasks (speech.py, eSpeak NG), modality "audio"; read when model.audio.enabled.
        speech=ml_collections.ConfigDict(dict(
            dir="",  # "": <data.dir>/shapes_speech/<variant>; written once (progress bar), then reused
            num_train=20_000, num_eval=1_000,
            tasks=("asr", "spoken_vqa", "spoken_scene_qa", "spoken_caption_qa"),
        )),
    ))


def text_corpus_config() -> ml_collections.ConfigDict:
    """The `text_corpus` source's fields (configs/base.py holds the same)."""
    return ml_collections.ConfigDict(dict(kind="text_corpus", dir="", num_docs=20_000, num_shards=4,
                                          tokenizer_docs=4000))


# ----------------------------------------------------------------------------- files


def shapes_world_dir(config, cfg) -> str:
    """cfg.dir, or a directory of its own per variant under data.dir."""
    key = writer.dataset_key(int(config.data.seed), int(cfg.num_train), int(cfg.num_eval), tuple(cfg.tasks))
    return cfg.dir or os.path.join(config.data.dir, "shapes_world", key)


def write_builtin_shapes_world(config, cfg, progress: bool = False) -> tuple[str, tuple[str, ...]]:
    """Writes (once) the shapes-world splits; returns (the local dir, the tasks in file order)."""
    with mirror.mirrored(shapes_world_dir(config, cfg)) as out_dir:
        manifest = writer.write_shapes_world(out_dir, seed=int(config.data.seed), num_train=int(cfg.num_train),
                                             num_eval=int(cfg.num_eval), tasks=tuple(cfg.tasks), progress=progress)
    return out_dir, tuple(manifest["tasks"])


def speech_dir(config, cfg) -> str:
    """cfg.speech.dir, or a directory of its own per variant under data.dir."""
    key = writer.dataset_key(int(config.data.seed), int(cfg.speech.num_train), int(cfg.speech.num_eval),
                             tuple(cfg.speech.tasks))
    return cfg.speech.dir or os.path.join(config.data.dir, "shapes_speech", key)


def write_builtin_speech(config, cfg, progress: bool = True) -> tuple[str, tuple[str, ...]]:
    """Writes (once, with a progress bar) the speech splits; returns (dir, the tasks in file order)."""
    with mirror.mirrored(speech_dir(config, cfg)) as out_dir:
        manifest = speech.write_speech_world(out_dir, seed=int(config.data.seed),
                                             num_train=int(cfg.speech.num_train), num_eval=int(cfg.speech.num_eval),
                                             tasks=tuple(cfg.speech.tasks), progress=progress)
    return out_dir, tuple(manifest["tasks"])


def task_file(config, cfg, task: str, split: str) -> tuple[str, tuple[str, ...]]:
    """(the ArrayRecord file holding `task`'s records of `split`, that file's tasks in order)."""
    if task in speech.TASKS:
        out_dir, tasks = write_builtin_speech(config, cfg)
        return speech.speech_split_path(out_dir, split), tasks
    out_dir, tasks = write_builtin_shapes_world(config, cfg)
    return writer.split_path(out_dir, split), sw.split_tasks(tasks, split)


class WorldDrawing:
    """A stored gen_image record (request -> `<image>`, the render in `images`) as the omni
    record's drawing (`records.py`): the assistant writes `<gen_image>caption</gen_image>` and
    draws the render (`gen_images`). Done on reading, so the stored records, and the tokenizer
    trained on their chats, stay as they were."""

    def __call__(self, record: dict) -> dict:
        if records_lib.is_bad(record):
            return record
        caption = sw.caption_text(record["attributes"])
        open_, close = records_lib.GEN_IMAGE_SPAN
        return {**record, "images": [], "gen_images": list(record["images"]), "answer": caption,
                "messages": [record["messages"][0], {"role": "assistant", "content": f"{open_}{caption}{close}"}]}


class TaskRecords:
    """Opens one task's records of a split: every n-th record of its file (written on first use)."""

    def __init__(self, config, cfg, task: str, split: str):
        self.config, self.cfg, self.task, self.split = config, cfg, task, split

    def __call__(self) -> grain.MapDataset:
        path, tasks = task_file(self.config, self.cfg, self.task, self.split)
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
        ds = ds[tasks.index(self.task)::len(tasks)].map(sources.SafeDecode(records_lib.decode_record))
        return ds.map(WorldDrawing()) if self.task == "gen_image" else ds


# ----------------------------------------------------------------------------- sources


class ShapesWorldSource(sources.Source):
    """Parts: the configured tasks (file order), then with the audio tower the spoken tasks."""

    def __init__(self, name, cfg, config):
        super().__init__(name, cfg, config)
        known = sw.TASKS + speech.TASKS
        unknown = set(cfg.get("task_weights", {})) - set(known)
        if unknown:
            raise ValueError(f"config.data.sources.{name}.task_weights names unknown tasks {sorted(unknown)}; "
                             f"known: {known}")

    def speech_tasks(self) -> tuple[str, ...]:
        """The spoken tasks in file order; () without the audio tower."""
        return tuple(self.cfg.speech.tasks) if omni.audio_enabled(self.config) else ()

    def parts(self, split: str) -> dict[str, sources.Part]:
        factors = dict(self.cfg.get("task_weights", {}) or {})
        tasks = [(t, sw.TASK_MODALITY[t]) for t in sw.split_tasks(tuple(self.cfg.tasks), split)]
        tasks += [(t, "audio") for t in self.speech_tasks()]
        return {t: sources.Part(self.name, modality, TaskRecords(self.config, self.cfg, t, split),
                                float(factors.get(t, 1.0))) for t, modality in tasks}

    def prepare(self, progress: bool = True) -> dict[str, str]:
        written = {self.name: write_builtin_shapes_world(self.config, self.cfg, progress)[0]}
        if self.speech_tasks():
            written[f"{self.name}/speech"] = write_builtin_speech(self.config, self.cfg, progress)[0]
        return written

    def tokenizer_texts(self):
        """The chats of the first `tokenizer_chats` training records (all tasks): one-word answers
        ("yellow", "2") open an assistant turn with no space before them, a form the text corpus
        never has. Without these the built-in tokenizer splits them ("y" + "ellow", "bl" + "ue" /
        "bl" + "ack"), so VQA answers share no tokens with the captions' " yellow"."""
        num, seed = int(self.cfg.get("tokenizer_chats", 0)), int(self.config.data.seed)
        if num <= 0:
            return None
        texts = (records_lib.training_text({"messages": sw.make_record(seed, "train", i)["messages"]})
                 for i in range(num))
        return f"shapes_world-v{sw.DATA_VERSION}-seed{seed}-chats{num}", texts


def text_corpus_files(config, cfg, split: str = "train") -> list[str]:
    """Writes (once) and returns the built-in corpus files of `split` ("train" or "eval")."""
    root = cfg.get("dir", "") or config.data.dir
    seed, num_docs = int(config.data.seed), int(cfg.num_docs)
    if split == "eval":
        folder, args = "text_eval", (max(num_docs // 20, 200), seed + HELDOUT_SEED_OFFSET, 1)
    else:
        folder, args = "text", (num_docs, seed, int(cfg.get("num_shards", 4)))
    with mirror.mirrored(os.path.join(root, folder)) as out_dir:
        return text_corpus.write_text_corpus(out_dir, *args)


class CorpusRecords:
    def __init__(self, config, cfg, split: str):
        self.config, self.cfg, self.split = config, cfg, split

    def __call__(self) -> grain.MapDataset:
        files = text_corpus_files(self.config, self.cfg, self.split)
        source = sources.ArrayRecordFiles(files)
        return grain.MapDataset.source(source).map(sources.SafeDecode(records_lib.decode_record))


class TextCorpusSource(sources.Source):
    """One part, modality "text": the generated corpus (text_corpus.py)."""

    def parts(self, split: str) -> dict[str, sources.Part]:
        return {self.name: sources.Part(self.name, "text", CorpusRecords(self.config, self.cfg, split),
                                        float(self.cfg.get("weight", 1.0)))}

    def prepare(self, progress: bool = True) -> dict[str, str]:
        return {f"{self.name}/{split}": ", ".join(text_corpus_files(self.config, self.cfg, split))
                for split in sources.SPLITS}

    def tokenizer_texts(self):
        num, seed = int(self.cfg.get("tokenizer_docs", 0)), int(self.config.data.seed)
        if num <= 0:
            return None
        texts = map(records_lib.training_text, text_corpus.iter_documents(num, seed))
        return f"text_corpus-v{text_corpus.VERSION}-seed{seed}-docs{num}", texts


sources.register_source("shapes_world", ShapesWorldSource)
sources.register_source("text_corpus", TextCorpusSource)
audio_tokens.register_voice("espeak", speech.speak_answer)  # spoken answers (a "tts" source, speak="answers")


# ----------------------------------------------------------------------------- for the experiment's tools


def world_source_config(config):
    """The config of the first `shapes_world` source (the tower pre-training, m2omni-prepare-data)."""
    for cfg in config.data.sources.values():
        if cfg.get("kind") == "shapes_world":
            return cfg
    raise ValueError(f"config.data.sources ({sorted(config.data.sources)}) have no kind='shapes_world' source")

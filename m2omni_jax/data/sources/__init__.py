"""Data sources: where omni records (`data/records.py`) come from.

`config.data.sources` maps a name to `{kind, ...fields}`; a kind is registered with
`register_source(kind, factory)`. Built-in kinds: `tfds` (any TFDS data set with a field
mapping), `jsonl` (LLaVA-style conversations with image / audio files), `array_record`
(ArrayRecord files of serialised records). The built-in data set and its text corpus register
their kinds from `m2omni_jax/experiments/` (imported by every command at start-up).

    parts(config, split)            {part name: Part(source, modality, records(), weight)}
    eval_records(config, n, ...)    the first n held-out records, round-robin over the parts
    tokenizer_texts(config)         the texts the built-in tokenizer trains on

Everything past a source (media, chat assembly, packing) sees only records.
"""
from m2omni_jax.data.sources.base import (SPLITS, Part, SafeDecode, Source, eval_records, make_sources,  # noqa: F401
                                          part_records, parts, register_source, round_robin, source_kinds,
                                          tokenizer_texts, validation_records)
from m2omni_jax.data.sources import array_record, jsonl, tfds  # noqa: F401,E402  (register the built-in kinds)
from m2omni_jax.data.sources.array_record import ArrayRecordFiles  # noqa: F401,E402

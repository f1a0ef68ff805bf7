"""Frozen config dataclasses built from `ml_collections` sections, with clear errors."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field's value is unusable; the message names `config.<field>=<value>`."""


def dataclass_from_config(cls: type[T], cfg: Any, name: str, **converted: Any) -> T:
    """`cls(**cfg)`, naming `config.<name>`'s unknown fields; `converted` overrides values."""
    values = dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**{**values, **converted})

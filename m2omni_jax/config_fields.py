"""The bottom layer of the typed config: errors naming `config.<field>=<value>`, building
frozen dataclasses from `ml_collections` sections, a frozen free-form `Section`, and
`replace` by dotted path (run_config.py builds the whole run's config with these)."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field's value is unusable; the message names `config.<field>=<value>`."""


def as_dict(section: Any) -> dict:
    """A section's fields as a shallow dict: a dataclass's, a Section's or a ConfigDict's."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
    return dict(section)


def dataclass_from_config(cls: type[T], cfg: Any, name: str, **converted: Any) -> T:
    """`cls(**cfg)`, naming `config.<name>`'s unknown fields; `converted` overrides values.
    `cfg` may be a ConfigDict, a mapping or a dataclass with (at least) `cls`'s fields."""
    if isinstance(cfg, cls) and not converted:
        return cfg
    values = as_dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown and not dataclasses.is_dataclass(cfg):
        raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(known)}")
    return cls(**{**{k: v for k, v in values.items() if k in known}, **converted})


class Section(Mapping):
    """A frozen free-form config section (a data source's fields, an experiment's own section):
    read as `section.field`, `section["field"]` or `section.get("field", default)`."""

    def __init__(self, values: Mapping[str, Any], path: str):
        object.__setattr__(self, "_values", {k: freeze(v, f"{path}.{k}") for k, v in dict(values).items()})
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._path} has no field {name!r}; it has {sorted(self._values)}") from None

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"{self._path} is frozen; use config_fields.replace")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._values!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values)))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Section) else v for k, v in self._values.items()}


def freeze(value: Any, path: str) -> Any:
    """Nested mappings become Sections and lists tuples, so nothing in a config can change."""
    if isinstance(value, Section):
        return value
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        return Section(value.to_dict() if hasattr(value, "to_dict") else value, path)
    if isinstance(value, list):
        return tuple(freeze(v, path) for v in value)
    return value


def replace(config: T, **changes: Any) -> T:
    """A copy of a frozen config with fields changed by dotted path:
    `replace(config, **{"data.split": "eval", "train.batch_size": 8})`."""
    by_head: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            by_head.setdefault(head, {})[rest] = value
        else:
            direct[head] = freeze(value, head)
    for head, nested in by_head.items():
        direct[head] = replace(getattr(config, head), **nested)
    if isinstance(config, Section):
        unknown = set(direct) - set(config)
        if unknown:
            raise AttributeError(f"{config._path} has no fields {sorted(unknown)}")
        return Section({**config, **direct}, config._path)
    return dataclasses.replace(config, **direct)

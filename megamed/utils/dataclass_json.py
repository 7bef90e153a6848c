"""Strict JSON <-> dataclass conversion: unknown keys are an error that names the key."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`; nested dataclass fields are built recursively.

    Raises ConfigError naming the dotted key for unknown keys or wrong nested types.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]!r} for {cls.__name__}; "
                          f"known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = from_dict(typ, value, f"{where}.{key}" if where else key)
        elif typing.get_origin(typ) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_json(cls: type[T], path: str | Path) -> T:
    with open(path) as f:
        return from_dict(cls, json.load(f), where="")


def save_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(obj), indent=2) + "\n")
    tmp.replace(path)

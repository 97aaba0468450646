"""Typed settings from plain data: a mapping checked key by key against a dataclass.

Used for recipes and for anything else configured from YAML (such as the data stage's step
list), so every setting fails the same way: one line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what was expected."""


def build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """Dataclass `cls` from a mapping, checking every key and value type. Keys the mapping leaves
    out keep the values of `base` (by default `cls()`), so a nested section that sets one field
    keeps its parent's defaults for the others (e.g. sft.train's own learning rate)."""
    base = cls() if base is None else base
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {name!r} (valid: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], value, name, getattr(base, key))
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as e:  # a dataclass's own range checks (__post_init__)
        raise ConfigError(f"{where or 'recipe'}: {e}") from None


def _coerce(tp: Any, value: Any, name: str, default: Any = None) -> Any:
    if tp is Any:  # free-form here; the owner of the field validates it (e.g. data.steps)
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name, default)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")

"""Typed ``--opt key=value`` parsing against config dataclasses, with one-line errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import LccError


def parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LccError(f"invalid --opt '{pair}': expected key=value")
        out[key.strip()] = value.strip()
    return out


def fields_of(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def convert(key: str, value: Any, hint: Any) -> Any:
    """Convert a string (or python value) to the field's type, or raise a one-line error."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        return convert(key, value, args[0])
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise LccError(f"invalid --opt {key}={value}: expected one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin in (list, tuple):
        return [convert(key, v, args[0]) for v in value.split(",") if v.strip()]
    if hint is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise LccError(f"invalid --opt {key}={value}: expected true or false")
    if hint in (int, float):
        try:
            return hint(value)
        except ValueError:
            raise LccError(f"invalid --opt {key}={value}: expected {'an integer' if hint is int else 'a number'}") from None
    return value


def build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate config ``cls`` from the subset of ``values`` naming its fields."""
    fields = fields_of(cls)
    kwargs = {k: convert(k, v, fields[k]) for k, v in values.items() if k in fields}
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise LccError(f"invalid options for {cls.__name__}: {e}") from None
    check = getattr(instance, "check", None)
    if callable(check):  # a config checks the values that need no model here: before the model loads (seconds to minutes)
        check()
    return instance


def check_known(values: dict[str, Any], classes: list[type]) -> None:
    """Refuse keys that no config class declares, listing the keys that exist."""
    known = sorted({name for cls in classes for name in fields_of(cls)})
    for key in values:
        if key not in known:
            raise LccError(f"unknown --opt '{key}'; valid options: {', '.join(known)}")

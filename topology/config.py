"""Typed, validated configuration sections built from plain dictionaries.

Each section of a scenario is a frozen dataclass. Its fields may carry
metadata that this module checks on load::

    rate_bps: float = field(default=100e6, metadata=spec(min=1.0, help="..."))

`from_dict` rejects unknown keys (suggesting the closest known one), wrong
types and out-of-range values, and names the dotted path of the field, the
value it got and what would fix it. Nested dataclasses and lists of them are
built recursively; `Optional[...]` fields accept null.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from topology.errors import ConfigError

T = TypeVar("T")


def spec(
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> dict[str, Any]:
    """Metadata for a config field: bounds, allowed values and a help text."""
    return {"min": min, "max": max, "choices": choices, "help": help}


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from `data`, validating every field.

    `where` is the dotted path of this section in the file, used in errors.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'scenario'}: expected a mapping of fields, got "
            f"{type(data).__name__} {data!r}"
        )
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{_join(where, str(key))}: unknown field{hint} "
                f"(known fields: {', '.join(sorted(fields))})"
            )

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = _join(where, name)
        value = _convert(hints[name], data[name], path)
        _check_bounds(f.metadata, value, path)
        kwargs[name] = value

    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'scenario'}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config object, for writing next to results."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init
        }
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, for documentation and error messages."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else " / ".join(errors))

    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{path}: got {value!r}, expected one of "
                f"{', '.join(repr(a) for a in args)}"
            )
        return value

    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{path}: expected a list, got {type(value).__name__} {value!r}"
            )
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)

    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{path}: expected a number, got {type(value).__name__} {value!r}"
            )
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{path}: expected a whole number, got {type(value).__name__} {value!r}"
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"{path}: expected a string, got {type(value).__name__} {value!r}"
            )
        return value
    return value


def _check_bounds(meta: Mapping[str, Any], value: Any, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{path}: got {value!r}, expected one of "
            f"{', '.join(repr(c) for c in choices)}"
        )
    lo, hi = meta.get("min"), meta.get("max")
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        if lo is not None and v < lo:
            raise ConfigError(
                f"{path}: {v!r} is below the minimum {lo!r}; "
                f"use a value of at least {lo!r}"
            )
        if hi is not None and v > hi:
            raise ConfigError(
                f"{path}: {v!r} is above the maximum {hi!r}; "
                f"use a value of at most {hi!r}"
            )

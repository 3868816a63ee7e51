"""Generic, typed YAML-to-dataclass builder that reports errors as `file:line: key.path: message`.

Why a home-grown builder: every error must name the file, the line and the key, unknown keys are
errors (never silently ignored), and the reference documentation is generated from the same
dataclasses so it can never drift from what the parser accepts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

DURATION = "duration"
SIZE = "size"

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]i?[bB]?|[bB])?\s*$")
_SIZE_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class ConfigError(Exception):
    """All validation errors of one file, each already formatted as `file:line: key: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Issue(Exception):
    """One error at one key path, raised while building; collected into ConfigError."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def doc(default: Any, text: str, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default and one line of reference documentation."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def required(text: str) -> Any:
    return dataclasses.field(metadata={"doc": text, "required": True})


def parse_duration(value: Any, path: str) -> float:
    """`250ms`, `2s`, `1m`, `1h` or a number of seconds."""
    if isinstance(value, bool):
        raise Issue(path, f"expected a duration like 250ms, 2s or 1m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise Issue(path, "a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNIT[m.group(2)]
    raise Issue(path, f"expected a duration like 250ms, 2s or 1m, got {value!r}")


def parse_size(value: Any, path: str) -> int:
    """`512`, `16KB`, `64MB`, `1GiB` (binary multiples)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()[:1]
            return int(float(m.group(1)) * _SIZE_UNIT[unit])
    raise Issue(path, f"expected a size like 1024, 16KB or 64MB, got {value!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return str(get_args(tp)[1])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"map of {_type_name(get_args(tp)[1])}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to type `tp`, raising Issue with the key path on mismatch."""
    origin = get_origin(tp)
    if origin is Annotated:
        kind = get_args(tp)[1]
        return parse_duration(value, path) if kind == DURATION else parse_size(value, path)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        # Try the option whose shape matches first, so its specific error is the one reported.
        candidates = [o for o in options if o is not type(None)]
        candidates.sort(key=lambda o: not _same_shape(o, value))
        first: Issue | None = None
        for option in candidates:
            try:
                return convert(option, value, path)
            except Issue as e:
                first = first or e
        if first is not None and (len(candidates) == 1 or _same_shape(candidates[0], value)):
            raise first
        raise Issue(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in get_args(tp):
            return str(value)  # YAML reads `on: [503]` as an int; the option is the string "503"
        raise Issue(path, f"expected one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise Issue(path, f"expected a list, got {value!r}")
        return tuple(convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        item_tp = get_args(tp)[0]
        if not isinstance(value, list):
            raise Issue(path, f"expected a list, got {value!r}")
        return tuple(convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise Issue(path, f"expected a mapping, got {value!r}")
        return {str(k): convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Issue(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Issue(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise Issue(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise Issue(path, f"expected a string, got {value!r}")
    if tp is Any:
        return value
    raise Issue(path, f"unsupported type {tp!r}")  # pragma: no cover - a bug in the model


def _same_shape(tp: Any, value: Any) -> bool:
    origin = get_origin(tp)
    if isinstance(value, list):
        return origin in (list, tuple)
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    return origin not in (list, tuple, dict) and not dataclasses.is_dataclass(tp)


def build(cls: type, value: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping: unknown keys and missing required keys are errors."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Issue(path, f"expected a mapping, got {value!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for key, raw in value.items():
        name = str(key)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise Issue(f"{prefix}{name}", f"unknown key (known keys: {known})")
        kwargs[name] = convert(hints[name], raw, f"{prefix}{name}")
    for name, f in fields.items():
        if f.metadata.get("required") and name not in kwargs:
            raise Issue(f"{prefix}{name}", "required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) rows for the reference documentation."""
    rows: list[tuple[str, str, str, str]] = []
    hints = get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if f.metadata.get("required"):
            default = "required"
        elif f.default is not dataclasses.MISSING:
            default = "null" if f.default is None else repr(f.default)
        else:
            default = "see below"
        rows.append((key, _type_name(tp), default, str(f.metadata.get("doc", ""))))
        inner = _inner_dataclass(tp)
        if inner is not None:
            suffix = "[]." if get_origin(_strip_optional(tp)) in (list, tuple) else "."
            if get_origin(_strip_optional(tp)) is dict:
                suffix = ".<name>."
            rows.extend(describe(inner, f"{key}{suffix}"))
    return rows


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _inner_dataclass(tp: Any) -> type | None:
    tp = _strip_optional(tp)
    origin = get_origin(tp)
    if origin in (list, tuple):
        tp = get_args(tp)[0]
    elif origin is dict:
        tp = get_args(tp)[1]
    elif origin in (Union, types.UnionType):
        for a in get_args(tp):
            if dataclasses.is_dataclass(a):
                return typing.cast(type, a)
        return None
    return typing.cast(type, tp) if dataclasses.is_dataclass(tp) else None

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
PERCENT = "percent"
RATIO = "ratio"

Duration = Annotated[float, DURATION]
Size = Annotated[int, SIZE]
# A number of percent (`20%` or `20` → 20.0); a bare 0.2 is refused, since it is a ratio misread.
Percent = Annotated[float, PERCENT]
# A fraction in 0..1 (`0.5`), also written as a percentage (`50%` → 0.5).
Ratio = Annotated[float, RATIO]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]i?[bB]?|[bB])?\s*$")
_SIZE_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_PERCENT_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(%)?\s*$")


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


def _number_or_percent(value: Any) -> tuple[float, bool] | None:
    """(number, written with %) of a YAML number or a `12.5` / `12.5%` string; None otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), False
    if isinstance(value, str):
        m = _PERCENT_RE.match(value)
        if m:
            return float(m.group(1)), m.group(2) is not None
    return None


def parse_percent(value: Any, path: str) -> float:
    """`20%`, `0.5%` or a plain number of percent (`20`); range checks are the field's own.

    A bare number strictly between 0 and 1 is refused: `budget: 0.2` is almost always meant as
    a ratio (20%), and reading it as 0.2% would silently change the behaviour by a factor of 100.
    """
    parsed = _number_or_percent(value)
    if parsed is None:
        raise Issue(path, f"expected a percentage like 20% or 20, got {value!r}")
    number, with_sign = parsed
    if not with_sign and 0 < number < 1:
        written = value.strip() if isinstance(value, str) else repr(value)
        pct = f"{round(number * 100, 10):g}"
        raise Issue(
            path,
            f"{written} looks like a ratio: write {pct}% or {pct} for {pct} percent "
            f"(or '{written}%' if you mean {written} percent)",
        )
    return number


def parse_ratio(value: Any, path: str) -> float:
    """A fraction as a number (`0.5`, taken as is) or as a percentage string (`50%` → 0.5)."""
    parsed = _number_or_percent(value)
    if parsed is None:
        raise Issue(path, f"expected a ratio like 0.5 or 50%, got {value!r}")
    number, with_sign = parsed
    return number / 100 if with_sign else number


_SCALARS: dict[str, Callable[[Any, str], Any]] = {
    DURATION: parse_duration,
    SIZE: parse_size,
    PERCENT: parse_percent,
    RATIO: parse_ratio,
}


def _enabled_field(cls: type) -> bool:
    """Whether section `cls` is switched by an `enabled: bool` field (AccessLogConfig, UpstreamTls)."""
    return any(f.name == "enabled" and f.init for f in dataclasses.fields(cls)) and (
        get_type_hints(cls).get("enabled") is bool
    )


def _switch(cls: type, on: bool, path: str) -> dict[str, Any]:
    """The mapping a section written as `true`/`false` stands for.

    `true` is "on with the defaults": `{}`, or `{enabled: true}` where an `enabled` field exists.
    `false` reaches here only for a section that is not optional (an optional one is None, see
    `convert`), so it needs an `enabled` field to mean anything.
    """
    if _enabled_field(cls):
        return {"enabled": on}
    if on:
        return {}
    raise Issue(path, "cannot be switched off: give a mapping, or true for the defaults")


def _switch_doc(tp: Any) -> str:
    """What `true`/`false` mean for a field, for the reference (empty: not a switchable section)."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    sections = [o for o in options if dataclasses.is_dataclass(o)]
    if len(sections) != 1 or bool in options:
        return ""
    cls = typing.cast(type, sections[0])
    if any(f.metadata.get("required") for f in dataclasses.fields(cls)):
        return ""  # `true` alone would always be a missing-key error: do not suggest it
    enabled = _enabled_field(cls)
    if type(None) in options:
        on = "`{enabled: true}`" if enabled else "`{}`: every key at its default"
        return f"also `true` (= {on}) or `false` (= absent)"
    # An always-present section: `true` is accepted but says nothing unless it flips `enabled`.
    return "also `true`/`false` (= `{enabled: true}`/`{enabled: false}`)" if enabled else ""


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


def convert(tp: Any, value: Any, path: str, *, section: bool = False) -> Any:
    """Convert a YAML value to type `tp`, raising Issue with the key path on mismatch.

    `section`: the value is a field of a mapping, where a dataclass type may be given as
    `true`/`false` (not a list item, map value or the whole file, where that means nothing).
    """
    origin = get_origin(tp)
    if origin is Annotated:
        return _SCALARS[get_args(tp)[1]](value, path)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if (
            value is False
            and section
            and type(None) in options
            and bool not in options
            and any(dataclasses.is_dataclass(o) for o in options)
        ):
            return None  # `false` switches an optional section off, like leaving it out
        # Try the option whose shape matches first, so its specific error is the one reported.
        candidates = [o for o in options if o is not type(None)]
        candidates.sort(key=lambda o: not _same_shape(o, value))
        first: Issue | None = None
        for option in candidates:
            try:
                return convert(option, value, path, section=section)
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
        cls = typing.cast(type, tp)
        if section and isinstance(value, bool):
            value = _switch(cls, value, path)
        return build(cls, value, path)
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
    if isinstance(value, bool) and dataclasses.is_dataclass(tp):
        return True  # `true`/`false` for a section: its error (a missing key) is the useful one
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
        kwargs[name] = convert(hints[name], raw, f"{prefix}{name}", section=True)
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
        elif f.default is None:
            default = "null"
        elif f.default is dataclasses.MISSING:
            default = "see below"
        elif get_origin(tp) is Annotated and get_args(tp)[1] == PERCENT:
            default = f"{f.default:g}%"
        else:
            default = repr(f.default)
        text = str(f.metadata.get("doc", ""))
        switch = _switch_doc(tp)
        rows.append((key, _type_name(tp), default, f"{text}; {switch}" if switch else text))
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

"""The generic typed validator: a mapping checked against a dataclass, as one `ConfigError` line per problem.

`from_dict(cls, data)` builds dataclass `cls` from plain YAML/JSON values, rejecting unknown keys (with a
did-you-mean), wrong types, `Literal` choices outside their set, non-finite numbers and values outside the range
a field declares (`field(default=..., metadata=rng(lo, hi))`, inclusive, either bound None). Run configurations
(`config.py`), table specs (`experiments/spec.py`), run records (`engine/record.py`) and method options
(`methods/base.py`) all go through it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from sdesbench.errors import ConfigError
from sdesbench.registry import did_you_mean


def rng(lo: float | None = None, hi: float | None = None, doc: str = "", **extra: Any) -> dict[str, Any]:
    """Field metadata: inclusive numeric range plus a one-line description."""
    return {"range": (lo, hi), "doc": doc, **extra}


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, tuples to lists)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error says more than "expected X or None"
            return coerce(value, options[0], key)
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(type_name(a) for a in args)}, got {describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        leaf = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {leaf}={value!r}"
                          f"{did_you_mean(value, choices)}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value, value]  # `crop: 64` means 64x64
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {describe(value)}")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {describe(value)}")
        _, inner = typing.get_args(tp) or (str, Any)
        return {k: coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {describe(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    return value


def check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    lo, hi = f.metadata.get("range", (None, None))
    if value is None or isinstance(value, (list, dict, str)):
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}={value} is out of range {bounds}")


def from_dict(cls: Any, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and missing fields."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'{did_you_mean(key, fields, prefix + '.' if prefix else '')}")
        kwargs[key] = coerce(value, hints[key], full)
        check_range(kwargs[key], fields[key], full)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing '{missing[0]}'")
    return cls(**kwargs)


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested ones) as plain dicts/lists, the inverse of `from_dict`."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj

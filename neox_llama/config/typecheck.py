"""Turn a plain mapping (from YAML) into a typed schema dataclass, collecting every problem."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

_MISSING = object()


class Mismatch(Exception):
    """A value does not fit its declared type; the message says what was expected.

    ``where`` and ``value`` name the offending element when it is inside a list.
    """

    def __init__(self, expected: str, where: str | None = None, value: Any = _MISSING):
        super().__init__(expected)
        self.where, self.value = where, value


def user_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a schema dataclass that users may set (not the derived bookkeeping)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def describe_type(tp: Any) -> str:
    """A short human name of a type annotation, e.g. 'int or null', 'one of bf16, fp16, fp32'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {describe_type(inner)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in user_fields(tp))
    return {int: "int", float: "float", bool: "bool (true/false)", str: "str", dict: "a mapping"}.get(tp, str(tp))


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Mismatch("float")
    if not math.isfinite(value):
        raise Mismatch("a finite float")
    return float(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Mismatch("int")
    if isinstance(value, int):
        return value
    if math.isfinite(value) and value == int(value):  # 5e5 is read as a float; it is a whole number
        return int(value)
    raise Mismatch("int")


def _leaf_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _leaf_type(args[0]) if len(args) == 1 else tp
    return tp


def field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key (``optimizer.params.lr``) in schema class ``cls``, or None if unknown."""
    tp: Any = cls
    for part in dotted.split("."):
        tp = _leaf_type(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints or part not in {f.name for f in user_fields(tp)}:
            return None
        tp = hints[part]
    return tp


def is_text_key(dotted: str) -> bool:
    """True when the key holds free text (a str field), whose command-line value is taken literally."""
    from neox_llama.config.schema import Config

    return _leaf_type(field_type(Config, dotted)) is str


def coerce(value: Any, tp: Any, key: str, report: Callable[[str, str], None]) -> Any:
    """Return ``value`` converted to annotation ``tp``; raise :class:`Mismatch` when it cannot be.

    Nested dataclasses report their own unknown or mistyped keys through ``report(key, message)``
    and come back with defaults in place of the bad entries.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], key, report)
    if value is None:
        raise Mismatch(describe_type(tp))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise Mismatch(describe_type(tp) + did_you_mean(str(value), [str(c) for c in choices]))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise Mismatch(describe_type(tp))
        items = []
        for i, item in enumerate(value):
            try:
                items.append(coerce(item, inner, f"{key}[{i}]", report))
            except Mismatch as err:
                raise Mismatch(str(err), err.where or f"{key}[{i}]", item if err.value is _MISSING else err.value) from None
        return items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise Mismatch(describe_type(tp))
        return build_dataclass(tp, value, report, prefix=key + ".")
    if tp is float:
        return _as_float(value)
    if tp is int:
        return _as_int(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch("bool (true/false)")
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch("str (quote it in YAML)")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise Mismatch("a mapping")
    raise TypeError(f"schema uses an unsupported annotation {tp!r} for {key}")  # a bug in the schema, not user input


def _check_bounds(value: Any, f: dataclasses.Field) -> str | None:
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if lo is not None and value < lo:
        return f"must be >= {lo:g}"
    if hi is not None and value > hi:
        return f"must be <= {hi:g}"
    return None


def build_dataclass(cls: type, mapping: dict, report: Callable[[str, str], None], prefix: str = "") -> Any:
    """Build ``cls`` from ``mapping``. Each problem goes to ``report(dotted_key, message)``;
    a bad entry keeps the field's default so that all problems can be reported in one go."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in user_fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in mapping.items():
        dotted = prefix + str(name)
        f = by_name.get(name)
        if f is None:
            report(dotted, f"unknown key '{dotted}'" + did_you_mean(dotted, [prefix + n for n in by_name]))
            continue
        try:
            converted = coerce(value, hints[name], dotted, report)
        except Mismatch as err:
            where, bad = err.where or dotted, value if err.value is _MISSING else err.value
            report(dotted, f"{where}: expected {err}, got {bad!r} ({type(bad).__name__})")
            continue
        problem = _check_bounds(converted, f)
        if problem:
            report(dotted, f"{dotted}: {converted!r} {problem}")
            continue
        kwargs[name] = converted
    return cls(**kwargs)

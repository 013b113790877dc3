"""Checks of values parsed from outside bytes (JSON headers, manifests, configs), made before
anything uses them: each takes the value and a field path, returns the value as the caller
will use it, and raises `SchemaError` naming the field and what was wrong. The parsers turn that
into their own error (FormatError, CheckpointError, ConfigError) with the file name and the fix,
so a damaged file never reaches numpy as a list where an int belongs, and no allocation is sized
from an unchecked field.
"""

from __future__ import annotations

import math


class SchemaError(ValueError):
    """A field of parsed JSON has the wrong type or range; str() is 'field: what is wrong'."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def member(obj: dict, key: str, field: str):
    """obj[key], or SchemaError naming field.key as missing."""
    if key not in obj:
        raise SchemaError(f"{field}.{key}" if field else key, "missing")
    return obj[key]


def mapping(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise SchemaError(field, f"must be a JSON object, got {_show(value)}")
    return value


def array(value, field: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise SchemaError(field, f"must be a JSON list, got {_show(value)}")
    if length is not None and len(value) != length:
        raise SchemaError(field, f"must have {length} entries, got {len(value)}")
    return value


INT64 = 1 << 63  # every integer field reaches numpy or numba as an int64


def integer(value, field: str, lo: int | None = 0, hi: int | None = None) -> int:
    """An int (not a bool, not a float) in [lo, hi], and in int64's range whatever the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(field, f"must be an integer, got {_show(value)}")
    if not -INT64 <= value < INT64:
        raise SchemaError(field, f"must fit in 64 bits, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SchemaError(field, f"must be {bounds}, got {value}")
    return value


def number(value, field: str, positive: bool = False) -> float:
    """A finite int or float (not a bool), > 0 if `positive`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(field, f"must be a finite number, got {_show(value)}")
    if positive and value <= 0:
        raise SchemaError(field, f"must be > 0, got {value}")
    return value


def string(value, field: str, choices=None) -> str:
    if not isinstance(value, str):
        raise SchemaError(field, f"must be a string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise SchemaError(field, f"must be one of {', '.join(map(str, choices))}, got {_show(value)}")
    return value


def boolean(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(field, f"must be true or false, got {_show(value)}")
    return value


def shape(value, field: str, ndims=(1, 2), lo: int = 1) -> tuple[int, ...]:
    """A list of `ndims` dimensions, each an integer >= lo, as a tuple."""
    dims = array(value, field)
    if len(dims) not in ndims:
        raise SchemaError(field, f"must have {' or '.join(map(str, ndims))} dimensions, got {_show(value)}")
    return tuple(integer(d, f"{field}[{i}]", lo) for i, d in enumerate(dims))

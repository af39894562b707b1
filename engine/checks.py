"""Typed, bounded reading of one value at a boundary (config.json, engine options, sampling
parameters): the integer / real / flag rules every boundary applies, each failure an error of the
caller's class naming the field, the value and the allowed range.

Booleans are refused where numbers are expected (True is an int to Python, never a size or a
seed to us); NumPy scalars (and integer 0-d tensors) pass and come back as Python numbers.
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os

_SHOWN = 60   # characters of a bad value quoted in a message (a 10 MB string stays out of logs)


def shown(value) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value's own __repr__ may fail; the message must not
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _is_flag(value) -> bool:
    """True, False, or a boolean NumPy / torch scalar."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _range(lo, hi, lo_open: bool = False) -> str:
    if hi is None:
        return f"> {lo:g}" if lo_open else f">= {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"


def is_integer(value) -> bool:
    """An int, a NumPy integer or an integer 0-d tensor; not a bool, 2.0 or "2"."""
    if _is_flag(value) or getattr(value, "ndim", 0) != 0:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def integer(value, name: str, error: type[Exception], lo: int | None = None, hi: int | None = None) -> int:
    """`value` as a Python int within [lo, hi] (either end may be open-ended: None)."""
    if not is_integer(value):
        raise error(f"{name} must be an integer, got {shown(value)}")
    value = operator.index(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"<= {hi}" if lo is None else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise error(f"{name} must be an integer {bounds}, got {shown(value)}")
    return value


def real(value, name: str, error: type[Exception], lo: float, hi: float | None = None,
         lo_open: bool = False) -> float:
    """`value` as a finite Python float within [lo, hi] ((lo, hi] with lo_open)."""
    if not isinstance(value, numbers.Real) or _is_flag(value):
        raise error(f"{name} must be a number, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:                       # an int too large for a float
        value = math.inf
    if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        raise error(f"{name} must be a finite number {_range(lo, hi, lo_open)}, got {shown(value)}")
    return value


def flag(value, name: str, error: type[Exception]) -> bool:
    """`value` as a bool: True or False only (a 0/1 or a string is a mistake, not a flag)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {shown(value)}")
    return value


def one_of(value, name: str, error: type[Exception], choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
    return value


def read_json(path: str, max_bytes: int, what: str, error: type[Exception]):
    """The parsed content of the JSON file `path` (a `what`: "config.json", "an index"), refused
    with `error` when it is larger than `max_bytes` or not valid JSON (a size limit first, so a
    huge or deeply nested file costs no parse)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise error(f"{path}: {size} bytes is too large for {what} (limit {max_bytes})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    # ValueError: bad JSON or UTF-8, or an integer too long to convert; RecursionError: [[[[...]]]]
    except (ValueError, RecursionError, OSError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None

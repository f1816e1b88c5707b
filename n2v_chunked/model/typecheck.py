"""Checking config values against type hints: one rule for config files and options.

YAML and JSON give typed values, and Python does not check dataclass fields:
``steps: 2.5`` would train for a fractional step count, ``lr: "0.001"`` fail
deep inside the optimiser, and ``augment: "no"`` (a non-empty string) turn
augmentation on.  :func:`conform` accepts a value only when it is of the
hinted type, with the one widening everyone expects (an integer where a float
is wanted), and returns it in that type.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from typing import Any

BAD = object()  # what conform returns for a value of the wrong type

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def conform(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for, or :data:`BAD`.

    Parameters
    ----------
    value : object
        A value from YAML, JSON or Python.
    hint : type
        ``bool``, ``int``, ``float``, ``str``, ``list[T]`` or a union of these.

    Returns
    -------
    object
        The value (a float for an integer where a float is wanted, a list for
        a tuple), or :data:`BAD`.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            out = conform(value, option)
            if out is not BAD:
                return out
        return BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return BAD
        (item,) = typing.get_args(hint) or (Any,)
        items = [conform(v, item) for v in value]
        return BAD if any(v is BAD for v in items) else items
    if hint is Any:
        return value
    if isinstance(value, bool) and hint is not bool:  # True is an int to Python, never a count to a user
        return BAD
    if hint is int:  # numpy integers too (the Python API), as plain ints
        return int(value) if isinstance(value, numbers.Integral) else BAD
    if hint is float:
        if isinstance(value, numbers.Real) and math.isfinite(value):
            return float(value)
        return BAD
    return value if isinstance(value, hint) else BAD


def describe(hint: Any) -> str:
    """``list[int]`` -> ``"a list of integers"``: the expected type in words."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {describe(item).split(' ', 1)[-1]}s" if item in (int, str) else "a list"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def kind_of(value: Any) -> str:
    """``"a string"``, ``"a float"``...: what the value is, for the message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a float" if math.isfinite(value) else "not finite"
    return {int: "an integer", str: "a string", list: "a list", dict: "a mapping", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )


def mismatch(key: str, value: Any, hint: Any) -> str:
    """One line: ``'steps' = 2.5 is a float, expected an integer``."""
    return f"{key!r} = {value!r} is {kind_of(value)}, expected {describe(hint)}"

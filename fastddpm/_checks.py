"""Argument checks shared by the ops, the schedule and the samplers: one wording for every error.

Each check names the argument and what is allowed, and returns the value normalised to a Python
``int``/``float``/``bool`` (so numpy scalars are accepted and nothing downstream sees them).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch


def int_arg(name: str, value: Any, low: int | None = None, high: int | None = None, *, allowed: str = "an int") -> int:
    """``value`` as a Python int, in ``[low, high)`` where given.

    Accepts Python and numpy integers (anything with ``__index__``); rejects ``bool`` (also numpy's),
    floats (even integral ones) and tensors with a ``TypeError`` naming ``name``; a value outside the
    range raises ``ValueError`` naming ``name`` and the range. ``allowed`` words the type error.
    """
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be {allowed}, got {_describe(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {allowed}, got {_describe(value)}") from None
    if (low is not None and v < low) or (high is not None and v >= high):
        lo = "-inf" if low is None else _pow2(low)
        hi = "inf" if high is None else _pow2(high)
        raise ValueError(f"{name}={v} is out of range [{lo}, {hi})")
    return v


def real_arg(name: str, value: Any) -> float:
    """``value`` as a finite Python float (Python/numpy ints and floats; not bool, str or tensors)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def bool_arg(name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (a string such as ``"false"`` is not taken as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, (bool, int, float, str)):
        return f"{value!r} ({type(value).__name__})"
    return type(value).__name__


def _pow2(v: int) -> str:
    """Large bounds such as 2**64 written as powers of two (readable in a message)."""
    if abs(v) >= 2**31 and abs(v) & (abs(v) - 1) == 0:
        return f"{'-' if v < 0 else ''}2**{abs(v).bit_length() - 1}"
    return str(v)

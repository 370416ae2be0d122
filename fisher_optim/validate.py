"""Argument checks shared by the whole library: a bad argument gets a ``ValueError`` that
names it, the value given and what is valid.

>>> check_choice("labels", "exact", ("sample", "exact"))
>>> check_positive_int("every", 0)
Traceback (most recent call last):
...
ValueError: every must be a positive integer, got 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice", "check_positive_int", "check_positive_int_or_none", "is_int"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` >= 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_int_or_none(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None or an ``int`` >= 1."""
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

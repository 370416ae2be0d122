"""Argument checks shared by the whole library: a bad argument gets a ``ValueError`` or
``TypeError`` that names it, the value given and what is valid.

Every constructor checks its arguments with these, so that one wrong input is refused with
the same words wherever it is given.

>>> check_choice("labels", "exact", ("sample", "exact"))
>>> check_positive_int("every", 0)
Traceback (most recent call last):
...
ValueError: every must be a positive integer, got 0
>>> check_keywords("FisherPenaltySGD", {"evry": 10}, ("every", "alpha"))
Traceback (most recent call last):
...
TypeError: FisherPenaltySGD got an unexpected keyword argument 'evry'; did you mean 'every'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_function_or_none",
    "check_keywords",
    "check_positive_int",
    "check_positive_int_or_none",
    "is_int",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` >= 1 (``True`` is not one)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_int_or_none(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is None or an ``int`` >= 1."""
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_function_or_none(name: str, value: Any, called: str = "like the model") -> None:
    """Raise ``TypeError`` unless ``value`` is None or callable (a function called ``called``)."""
    if value is not None and not callable(value):
        raise TypeError(
            f"{name} must be a function called {called}, or None; got {type(value).__name__}"
        )


def check_keywords(
    owner: str, given: Mapping[str, Any] | Iterable[str], accepted: Iterable[str]
) -> None:
    """Raise ``TypeError`` for the first keyword in ``given`` that is not in ``accepted``,
    naming ``owner`` and the closest accepted keyword (a typo such as ``evry=10``)."""
    accepted = list(accepted)
    for key in given:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else (f"; it takes {', '.join(sorted(accepted))}")
            )
            raise TypeError(f"{owner} got an unexpected keyword argument {key!r}{hint}")

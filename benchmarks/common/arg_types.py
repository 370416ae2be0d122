"""Command-line argument types of ``benchmarks/*.py``, and their help formatter.

Argument types (used by :mod:`benchmarks.common.options`) that turn an invalid value into an argparse error naming the option and the
valid range (``error: argument --epochs: must be an integer >= 1, got '0'``), never a
traceback from deep inside a run or a run that silently does something else; and a help
formatter that shows each option's default exactly once.

>>> positive_int("3"), positive_float("0.5")
(3, 0.5)
>>> positive_int("0")
Traceback (most recent call last):
    ...
argparse.ArgumentTypeError: must be an integer >= 1, got '0'
>>> fraction("1.5")
Traceback (most recent call last):
    ...
argparse.ArgumentTypeError: must be a number in [0, 1], got '1.5'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "HelpFormatter",
    "fraction",
    "integer",
    "momentum",
    "nonnegative_float",
    "nonnegative_int",
    "open_fraction",
    "positive_float",
    "positive_int",
    "real",
]


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (a missing bound is no bound)."""
    if low is not None and high is not None:
        what = f"an integer in [{low}, {high}]"
    elif low is not None:
        what = f"an integer >= {low}"
    elif high is not None:
        what = f"an integer <= {high}"
    else:
        what = "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


def real(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number between ``low`` and ``high`` (each bound closed
    unless ``*_open``; a missing bound is no bound). NaN and infinities are always refused."""
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        what = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


#: Counts, sizes, periods (epochs, batch sizes, ``every``, threads, ...).
positive_int = integer(1)
#: Seeds, and sizes or periods where 0 means "none" / "off".
nonnegative_int = integer(0)
#: Learning rates, penalty weights of a run that must be penalised, Beta parameters, ...
positive_float = real(0.0, low_open=True)
#: Weight decay, penalty weights where 0 is plain SGD.
nonnegative_float = real(0.0)
#: Fractions and probabilities.
fraction = real(0.0, 1.0)
#: A fraction that leaves something on both sides (a train/test split).
open_fraction = real(0.0, 1.0, low_open=True, high_open=True)
#: SGD momentum: 0 <= m < 1 (m = 1 never forgets a gradient).
momentum = real(0.0, 1.0, high_open=True)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default exactly once.

    Appends ``(default: X)`` (a list shown as ``a b c``, as it is typed; a ``--flag/--no-flag``
    pair as the spelling that is in effect) unless the help already states the default (it
    contains ``(default``) or there is none to state (``None``, a ``store_true`` flag,
    :data:`argparse.SUPPRESS`): such options say in their help what leaving them out does.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(default, bool):
            return f"{text} (default: {action.option_strings[0 if default else 1]})"
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})"

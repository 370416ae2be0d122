"""Command-line options declared once, as dataclass fields, and the argument types that check
them: the command line of ``python -m fisher_optim.demo`` and of the benchmark scripts.

An option is a dataclass field made by :func:`option`: its default, its help text and how
argparse reads it live in that one place. :func:`parser` (or :func:`add_options`) builds
the argparse arguments of a dataclass's option fields, grouped, in field order, and
:func:`from_args` builds the dataclass back from the parsed namespace:

>>> from dataclasses import dataclass
>>> @dataclass
... class Options:
...     steps: int = option(1500, "optimizer steps", type=positive_int)
...     lr: float = option(0.1, "learning rate", type=positive_float)
>>> p = parser("train.py", "A training script.", Options)
>>> from_args(Options, p.parse_args(["--steps", "10"]))
Options(steps=10, lr=0.1)

The flag is ``--`` plus the field name with ``-`` for ``_`` (``flag=`` names another); a
script may override defaults (``defaults={"steps": 200}``), and a help text may be a
function of a context object (an experiment's configuration) for defaults it states.

The argument types turn an invalid value into an argparse error naming the option and the
valid range (``error: argument --steps: must be an integer >= 1, got '0'``), never a
traceback from deep inside a run or a run that silently does something else;
:class:`HelpFormatter` shows each option's default exactly once:

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
import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

__all__ = [
    "HelpFormatter",
    "add_options",
    "fraction",
    "from_args",
    "integer",
    "momentum",
    "nonnegative_float",
    "nonnegative_int",
    "open_fraction",
    "option",
    "option_fields",
    "parser",
    "positive_float",
    "positive_int",
    "real",
    "Refused",
    "tagged",
]


# ------------------------------------------------------------------------------ types, --help
def _range_text(
    noun: str,
    low: float | None,
    high: float | None,
    low_open: bool,
    high_open: bool,
    fmt: Callable[[float], str],
) -> str | None:
    """``noun`` with its bounds, as the argument types name what they take (None: no bound)."""
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"{noun} in {left}{fmt(low)}, {fmt(high)}{right}"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{noun} {'<' if high_open else '<='} {fmt(high)}"
    return None


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (a missing bound is no bound)."""
    what = _range_text("an integer", low, high, False, False, str) or "an integer"

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
    what = _range_text("a number", low, high, low_open, high_open, lambda v: f"{v:g}")
    what = what or "a finite number"

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


# ------------------------------------------------------------------------------ options
_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str | Callable[[Any], str] = "",  # noqa: A002 (argparse's name)
    *,
    flag: str | tuple[str, ...] | None = None,
    group: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    tags: tuple[str, ...] = (),
    unset: str | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's (and the option's) default; a list is copied per instance.
        help: the help text (argparse's ``%(default)s`` is not needed: the formatter states
            the default), or a function of :func:`add_options`' ``context`` returning it.
        flag: the option string, or several (default: ``--field-name``); the field's own
            name makes it a positional argument.
        group: the ``--help`` section it is listed in.
        default_factory: instead of ``default``, a function computing it.
        tags: what the option is, for the script (e.g. ``("run",)``: it determines a run's
            numbers); see :func:`tagged`.
        unset: what leaving the option out means when its default is None (``--help``
            says ``(default: <unset>)``; a default set by a script is shown instead).
        argparse_kwargs: ``type``, ``choices``, ``nargs``, ``metavar``, ``action``,
            ``const`` as for ``ArgumentParser.add_argument``.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "group": group,
        "tags": tags,
        "unset": unset,
        "argparse": argparse_kwargs,
    }
    if default_factory is None and isinstance(default, list):
        default_factory, default = (lambda d=tuple(default): list(d)), _MISSING
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` made by :func:`option`, in order."""
    return [f for f in dataclasses.fields(cls) if "argparse" in f.metadata]


def tagged(cls: type, tag: str) -> list[str]:
    """The names of the option fields of ``cls`` with ``tag``, in order."""
    return [f.name for f in option_fields(cls) if tag in f.metadata["tags"]]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def add_options(
    parser: argparse.ArgumentParser,
    *classes: type,
    defaults: Mapping[str, Any] | None = None,
    context: Any = None,
    groups: dict[str, Any] | None = None,
    only: Collection[str] | None = None,
    refused: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Add the option fields of every class in ``classes`` to ``parser`` (only those named in
    ``only``, if given: a script takes an option another class declares).

    ``defaults`` overrides fields' defaults by name; a callable help text is called with
    ``context``. Fields with a ``group`` go into that argument group (made on first use;
    ``groups``, returned, holds those made so far, so several calls can share them).
    ``refused`` maps the names of options the script declares but cannot honour to why: such
    an option keeps its flag, type and default, its help says why, and any other value is a
    parser error that says why.
    """
    defaults = defaults or {}
    refused = refused or {}
    groups = {} if groups is None else groups
    for cls in classes:
        for f in option_fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            title = meta["group"]
            if title is None:
                target = parser
            else:
                if title not in groups:
                    groups[title] = parser.add_argument_group(title)
                target = groups[title]
            text = meta["help"](context) if callable(meta["help"]) else meta["help"]
            flags = meta["flag"] or "--" + f.name.replace("_", "-")
            flags = (flags,) if isinstance(flags, str) else tuple(flags)
            flag = flags[0]
            default = defaults[f.name] if f.name in defaults else _default(f)
            if default is None and meta["unset"] is not None:
                text = f"{text} (default: {meta['unset']})"
            kwargs = meta["argparse"]
            if f.name in refused:
                text = f"{text}. Not taken by this script: {refused[f.name]}"
                flag_only = kwargs.get("action") in ("store_true", "store_false")
                kwargs = {**kwargs, "action": Refused, "why": refused[f.name]}
                kwargs["nargs"] = 0 if flag_only else kwargs.get("nargs")
            if flag.startswith("-"):
                target.add_argument(*flags, dest=f.name, default=default, help=text, **kwargs)
            else:  # a positional argument (``flag`` is the field's name)
                target.add_argument(flag, default=default, help=text, **meta["argparse"])
    return groups


class Refused(argparse.Action):
    """The action of an option a script declares but cannot honour (:func:`add_options`'
    ``refused``): its default passes, any other value is a parser error saying ``why``; a
    flag (``nargs=0``) is refused whenever it is given."""

    def __init__(self, option_strings: list[str], dest: str, why: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.why = why

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if self.nargs == 0 or values != self.default:
            given = " ".join(map(str, values if isinstance(values, list) else [values]))
            parser.error(f"{' '.join([option_string or self.dest, given]).strip()}: {self.why}")
        setattr(namespace, self.dest, values)


def parser(
    prog: str, description: str, *classes: type, sections: Sequence[str] = (), **kwargs: Any
) -> argparse.ArgumentParser:
    """A script's parser (``--help`` states each default once): the option fields of
    ``classes``, by :func:`add_options` (``kwargs``: its ``defaults``, ``only``...), with
    the ``--help`` sections ``sections`` first, in that order."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    groups = {title: p.add_argument_group(title) for title in sections}
    add_options(p, *classes, groups=groups, **kwargs)
    return p


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of dataclass ``cls`` from the parsed ``args`` (its option fields) and
    ``values`` (the other fields, or overrides)."""
    kwargs = {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}
    return cls(**{**kwargs, **values})

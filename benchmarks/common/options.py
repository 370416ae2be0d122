"""Command-line options declared once, as dataclass fields.

An option is a field of the run specification (or of a script's options) made by
:func:`option`: its default, its help text and how argparse reads it live in that one place.
:func:`add_options` builds the argparse arguments of a dataclass's option fields (grouped,
in field order) and :func:`from_args` builds the dataclass back from the parsed namespace::

    @dataclass
    class Options:
        steps: int = option(1500, "optimizer steps", type=positive_int)

    parser = argparse.ArgumentParser()
    add_options(parser, Options)
    opts = from_args(Options, parser.parse_args(["--steps", "10"]))  # Options(steps=10)

The flag is ``--`` plus the field name with ``-`` for ``_`` (``flag=`` names another); a
setting may override defaults (``defaults={"epochs": 200}``), and a help text may be a
function of a context object (the experiment's configuration) for defaults it states.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from benchmarks.common.arg_types import HelpFormatter

__all__ = ["add_options", "from_args", "option", "option_fields", "parser", "tagged"]

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
) -> dict[str, Any]:
    """Add the option fields of every class in ``classes`` to ``parser`` (only those named in
    ``only``, if given: a script takes an option another class declares).

    ``defaults`` overrides fields' defaults by name; a callable help text is called with
    ``context``. Fields with a ``group`` go into that argument group (made on first use;
    ``groups``, returned, holds those made so far, so several calls can share them).
    """
    defaults = defaults or {}
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
            if flag.startswith("-"):
                target.add_argument(
                    *flags, dest=f.name, default=default, help=text, **meta["argparse"]
                )
            else:  # a positional argument (``flag`` is the field's name)
                target.add_argument(flag, default=default, help=text, **meta["argparse"])
    return groups


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

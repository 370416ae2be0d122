"""Checks shared by the tests of every command line (the demo's, the benchmarks')."""

from __future__ import annotations

import argparse

import pytest


def _shown(value: object) -> str:
    """A default as a user types it: lists space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def option_helps(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, str]]:
    """Each option's help as ``--help`` renders it (before line wrapping)."""
    formatter = parser._get_formatter()
    return {
        a.option_strings[0]: (a, formatter._expand_help(a))
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    }


def assert_help_complete(parser: argparse.ArgumentParser) -> None:
    """Every option is explained and states one default, the true one where it is a value."""
    text = parser.format_help()  # renders without a formatting error
    assert "(default: None)" not in text and "(default: False)" not in text
    for name, (action, shown) in option_helps(parser).items():
        assert action.help and len(action.help) > 10, f"{name}: no help"
        count = shown.count("default:")
        if isinstance(action, argparse._StoreTrueAction) or action.nargs == 0:
            assert count <= 1, (name, shown)  # a flag that is off says nothing more
            continue
        assert count == 1, f"{name}: {count} defaults in {shown!r}"
        default = action.default
        if default is not None and not isinstance(default, bool):
            assert f"default: {_shown(default)}" in shown, (name, shown)


def assert_rejected(
    parser: argparse.ArgumentParser,
    argv: list[str],
    option: str,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """``argv`` is an argparse error (exit code 2) that names ``option``."""
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err or option in err, err
    return err

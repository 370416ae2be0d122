"""fisher_optim/_cli.py: argument types that refuse bad values, and --help with one default.

:func:`assert_help_complete` is shared with the tests of every command line
(tests/test_demo.py, tests/test_bench_cli.py).
"""

from __future__ import annotations

import argparse
import math

import pytest

from fisher_optim._cli import (
    HelpFormatter,
    fraction,
    integer,
    momentum,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    real,
)


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
        if isinstance(action, argparse._StoreTrueAction):
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


# --------------------------------------------------------------------------------------
# the argument types
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (positive_int, ["1", "7", "100000"], ["0", "-1", "1.5", "x", ""]),
        (nonnegative_int, ["0", "3"], ["-1", "2.0", "nan"]),
        (positive_float, ["1e-6", "0.1", "3"], ["0", "-0.1", "nan", "inf", "-inf", "x"]),
        (nonnegative_float, ["0", "0.5", "10"], ["-1e-9", "nan", "inf"]),
        (fraction, ["0", "0.25", "1"], ["-0.1", "1.01", "nan"]),
        (open_fraction, ["0.01", "0.5", "0.99"], ["0", "1", "2"]),
        (momentum, ["0", "0.9", "0.999"], ["1", "-0.1", "1.5"]),
    ],
)
def test_types_accept_the_range_and_refuse_the_rest(kind, good, bad):
    for text in good:
        assert kind(text) == (float(text) if "." in text or "e" in text else int(text))
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace(".", r"\.")):
            kind(text)


def test_bounds_and_messages():
    assert integer(2, 4)("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match=r"an integer in \[2, 4\], got '5'"):
        integer(2, 4)("5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"an integer <= 3"):
        integer(high=3)("4")
    assert real()("-1e300") == -1e300
    with pytest.raises(argparse.ArgumentTypeError, match="a finite number"):
        real()("nan")
    with pytest.raises(argparse.ArgumentTypeError, match=r"a number < 2"):
        real(high=2, high_open=True)("2")
    assert math.isclose(real(0, 1, low_open=True)("1"), 1.0)


def test_parser_error_names_the_option(capsys):
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--epochs", type=positive_int, default=3)
    err = assert_rejected(p, ["--epochs", "0"], "--epochs", capsys)
    assert "must be an integer >= 1, got '0'" in err


# --------------------------------------------------------------------------------------
# the help formatter
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="batch sizes")
    p.add_argument("--out", default=None, help="output folder (default: runs/x)")
    p.add_argument("--pct", type=float, default=5.0, help="share in %% of the data")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument(
        "--log", action=argparse.BooleanOptionalAction, default=True, help="write the log file"
    )
    return p


def test_help_states_each_default_once():
    p = _parser()
    helps = {k: v for k, (_, v) in option_helps(p).items()}
    assert helps["--lr"] == "learning rate (default: 0.1)"
    assert helps["--sizes"] == "batch sizes (default: 1 2)"
    assert helps["--out"] == "output folder (default: runs/x)"  # stated by hand: not twice
    assert helps["--pct"] == "share in % of the data (default: 5.0)"  # a '%' is no format
    assert helps["--quick"] == "a short smoke run"
    assert helps["--log"].count("default") == 1 and helps["--log"].endswith("--log)")
    assert_help_complete(p)


def test_assert_help_complete_catches_the_old_double_default():
    p = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: a b)")
    with pytest.raises(AssertionError):
        assert_help_complete(p)
    q = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    q.add_argument("--batch-size", type=int, default=128)  # no help
    with pytest.raises(AssertionError, match="no help"):
        assert_help_complete(q)

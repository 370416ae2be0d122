"""fisher_optim/cli.py: argument types that refuse bad values, --help with one default, and
options declared once as dataclass fields."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import pytest

from fisher_optim import cli

from .cli_utils import assert_help_complete, assert_rejected, option_helps

# --------------------------------------------------------------------------------------
# the argument types
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("positive_int", ["1", "7", "100000"], ["0", "-1", "1.5", "x", ""]),
        ("nonnegative_int", ["0", "3"], ["-1", "2.0", "nan"]),
        ("positive_float", ["1e-6", "0.1", "3"], ["0", "-0.1", "nan", "inf", "-inf", "x"]),
        ("nonnegative_float", ["0", "0.5", "10"], ["-1e-9", "nan", "inf"]),
        ("fraction", ["0", "0.25", "1"], ["-0.1", "1.01", "nan"]),
        ("open_fraction", ["0.01", "0.5", "0.99"], ["0", "1", "2"]),
        ("momentum", ["0", "0.9", "0.999"], ["1", "-0.1", "1.5"]),
    ],
)
def test_types_accept_the_range_and_refuse_the_rest(kind, good, bad):
    kind = getattr(cli, kind)
    for text in good:
        assert kind(text) == (float(text) if "." in text or "e" in text else int(text))
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace(".", r"\.")):
            kind(text)


def test_bounds_and_messages():
    integer, real = cli.integer, cli.real
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
    p.add_argument("--epochs", type=cli.positive_int, default=3)
    err = assert_rejected(p, ["--epochs", "0"], "--epochs", capsys)
    assert "must be an integer >= 1, got '0'" in err


# --------------------------------------------------------------------------------------
# the help formatter
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
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
    q = argparse.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
    q.add_argument("--batch-size", type=int, default=128)  # no help
    with pytest.raises(AssertionError, match="no help"):
        assert_help_complete(q)


# --------------------------------------------------------------------------------------
# options declared once
# --------------------------------------------------------------------------------------


@dataclass
class Opts:
    steps: int = cli.option(10, "optimizer steps", type=int, group="run", tags=("run",))
    names: list[str] = cli.option(["a"], "names", nargs="+", tags=("run",))
    limit: float | None = cli.option(None, "a limit", unset="none", type=float, flag="--cap")
    other: int = 3


def test_options_are_dataclass_fields():
    parser = argparse.ArgumentParser()
    cli.add_options(parser, Opts, defaults={"steps": 20})
    assert [f.name for f in cli.option_fields(Opts)] == ["steps", "names", "limit"]
    assert cli.tagged(Opts, "run") == ["steps", "names"]
    assert cli.from_args(Opts, parser.parse_args([])) == Opts(steps=20)
    args = parser.parse_args(["--steps", "3", "--names", "x", "y", "--cap", "0.5"])
    assert cli.from_args(Opts, args, other=4) == Opts(3, ["x", "y"], 0.5, 4)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["limit"] == "a limit (default: none)" and helps["steps"] == "optimizer steps"
    assert Opts().names is not Opts().names  # a list default is copied per instance


@dataclass
class Shared:
    pack: int = cli.option(1, "runs at once", type=cli.positive_int, metavar="N")
    fast: bool = cli.option(False, "a flag", action="store_true")


def test_a_refused_option_keeps_its_default_and_says_why(capsys):
    why = "packed runs would slow each other"
    p = cli.parser("x", "d", Shared, refused={"pack": why, "fast": "nothing to speed up"})
    assert cli.from_args(Shared, p.parse_args(["--pack", "1"])) == Shared()
    err = assert_rejected(p, ["--pack", "2"], "--pack", capsys)
    assert err.strip().endswith(f"error: --pack 2: {why}")
    assert_rejected(p, ["--pack", "0"], "--pack", capsys)  # its type still checks
    err = assert_rejected(p, ["--fast"], "--fast", capsys)
    assert err.strip().endswith("error: --fast: nothing to speed up")
    helps = {k: v for k, (_, v) in option_helps(p).items()}
    assert helps["--pack"] == f"runs at once. Not taken by this script: {why} (default: 1)"
    assert_help_complete(p)

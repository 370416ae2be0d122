"""benchmarks/common/cli.py and the command line of every benchmarks/*.py script: --help
states one true default per option and explains each; an invalid value is an argparse error
(exit code 2, naming the option), never a traceback or a silent run. Parsers only: no
training, no data."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fisher_optim.cli import Refused

from .cli_utils import assert_help_complete, assert_rejected

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

cli = importlib.import_module("benchmarks.common.cli")

#: Scripts being written or rewritten by others at the time of writing (issue 13): each joins
#: the checks once its parser uses fisher_optim.cli' types and HelpFormatter and is
#: exposed as ``build_parser()``. A new script not listed here is checked at once.
PENDING: set[str] = set()
SCRIPTS = sorted(
    p.stem
    for p in (ROOT / "benchmarks").glob("*.py")
    if p.stem != "__init__" and p.stem not in PENDING
)
_loaded: dict[str, ModuleType] = {}


def _script(name: str) -> ModuleType:
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(
            f"_bench_cli_{name}", ROOT / "benchmarks" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


def parser_of(name: str) -> argparse.ArgumentParser:
    """The parser a script's ``--help`` prints: the shared one for an experiment script
    (it declares ``CONFIG``), else the script's own ``build_parser()``."""
    module = _script(name)
    if hasattr(module, "CONFIG"):
        return cli.build_parser(module.CONFIG)
    assert hasattr(module, "build_parser"), f"benchmarks/{name}.py: no build_parser()"
    return module.build_parser()


EXPERIMENTS = [n for n in SCRIPTS if hasattr(_script(n), "CONFIG")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_complete(name):
    assert_help_complete(parser_of(name))


@pytest.mark.parametrize("name", SCRIPTS)
def test_defaults_parse_and_every_number_has_a_range(name, capsys):
    parser = parser_of(name)
    if not any(a.required for a in parser._actions):
        parser.parse_args([])  # the defaults are valid values
    for action in parser._actions:
        option = action.option_strings[0] if action.option_strings else action.dest
        # plain int/float accept -1 and nan: a number option states its range by its type
        assert action.type not in (int, float), f"{name} {option}: use a fisher_optim.cli type"
        if action.option_strings and (
            callable(action.type) and action.type not in (str, Path) or action.choices
        ):
            assert_rejected(parser, [option, "not-a-value"], option, capsys)


#: (argv, the option the error names) for the shared experiment command line.
INVALID = [
    (["--lrs", "0.1", "0"], "--lrs"),
    (["--lrs", "-0.1"], "--lrs"),
    (["--lr-star", "0"], "--lr-star"),
    (["--lr-star", "nan"], "--lr-star"),
    (["--alpha", "-1"], "--alpha"),
    (["--alphas", "0.1", "-0.1"], "--alphas"),
    (["--alpha-center", "0"], "--alpha-center"),
    (["--gpx-center", "-100"], "--gpx-center"),
    (["--mixup-beta", "0"], "--mixup-beta"),
    (["--seeds", "0", "-1"], "--seeds"),
    (["--seeds"], "--seeds"),
    (["--seed", "-3"], "--seed"),
    (["--noise", "1.5"], "--noise"),
    (["--noise", "-0.1"], "--noise"),
    (["--fp-start-epochs", "0"], "--fp-start-epochs"),
    (["--batch-sizes", "128", "0"], "--batch-sizes"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-5"], "--epochs"),
    (["--milestones", "0"], "--milestones"),
    (["--batch-size", "0"], "--batch-size"),
    (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--model", "resnet1000"], "--model"),
    (["--every", "0"], "--every"),
    (["--penalty-batch-size", "0"], "--penalty-batch-size"),
    (["--bn-refresh-batches", "-1"], "--bn-refresh-batches"),
    (["--small-batch-size", "0"], "--small-batch-size"),
    (["--noise-every", "0"], "--noise-every"),
    (["--ghost-batch-size", "-1"], "--ghost-batch-size"),
    (["--lr-base-batch", "0"], "--lr-base-batch"),
    (["--lr-cap", "0"], "--lr-cap"),
    (["--batch-lrs", "0.1", "-0.8"], "--batch-lrs"),
    (["--train-subset", "0"], "--train-subset"),
    (["--val-size", "-1"], "--val-size"),
    (["--test-subset", "0"], "--test-subset"),
    (["--split-seed", "-1"], "--split-seed"),
    (["--probe-size", "0"], "--probe-size"),
    (["--trace-every-steps", "-1"], "--trace-every-steps"),
    (["--loss-threshold", "0"], "--loss-threshold"),
    (["--test-every", "-1"], "--test-every"),
    (["--group-probe-size", "0"], "--group-probe-size"),
    (["--device", "gpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--time-limit", "0"], "--time-limit"),
]


@pytest.mark.parametrize(
    ("argv", "option"), INVALID, ids=[a[0][0] + "=" + " ".join(a[0][1:]) for a in INVALID]
)
def test_invalid_values_are_argparse_errors(argv, option, capsys):
    assert_rejected(parser_of("cifar10_simplecnn"), argv, option, capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "10", "--milestones", "10"], "--milestones must lie in 1..9"),
        (["--batch-sizes", "128", "256", "--batch-lrs", "0.1"], "--batch-lrs needs one"),
    ],
)
def test_options_valid_alone_but_not_together_are_argparse_errors(argv, message, capsys):
    cfg = _script("cifar10_simplecnn").CONFIG
    with pytest.raises(SystemExit) as exc:
        cli.main(cfg, [*argv, "--dry-run"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bare_milestones_flag_keeps_the_learning_rate_constant():
    cfg = _script("cifar10_simplecnn").CONFIG
    parser = cli.build_parser(cfg)
    assert "the bare flag keeps the LR constant" in " ".join(parser.format_help().split())
    constant = cli.make_specs(cfg, parser.parse_args(["--epochs", "30", "--milestones"]))
    assert {s.milestones for s in constant} == {()}
    scaled = cli.make_specs(cfg, parser.parse_args(["--epochs", "30"]))
    assert {s.milestones for s in scaled} == {(15, 22)}  # (150, 225) of 300 epochs, scaled


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_shows_the_settings_own_defaults(name):
    cfg = _script(name).CONFIG
    text = " ".join(parser_of(name).format_help().split())
    assert f"(default: {' '.join(cfg.default_methods)}, each at" in text
    assert f"mini-batch size (default: {cfg.batch_size})" in text
    assert f"(default: {cfg.epochs})" in text and f"(default: {cfg.model})" in text


def test_overhead_and_curvature_speed_refuse_bad_values(capsys):
    overhead, speed = parser_of("overhead"), parser_of("curvature_speed")
    for argv, option in [
        (["--rounds", "0"], "--rounds"),
        (["--window", "0"], "--window"),
        (["--warmup", "-1"], "--warmup"),
        (["--device", "tpu"], "--device"),
        (["--models", "nope"], "--models"),
        (["--variants", "sgd2"], "--variants"),
    ]:
        assert_rejected(overhead, argv, option, capsys)
    for argv, option in [
        (["--n", "0"], "--n"),
        (["--repeats", "0"], "--repeats"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--skip", "lop"], "--skip"),
    ]:
        assert_rejected(speed, argv, option, capsys)
    assert overhead.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    assert speed.parse_args(["--skip", "loop", "backpack"]).skip == ["loop", "backpack"]


#: ``--device``, ``--compile``, ``--amp`` and ``--pack``, which every script takes.
SHARED = ("device", "compile", "amp", "pack")
#: The arguments a script requires.
REQUIRED = {"step_time_across_commits": ["--baseline", "."], "report": ["runs"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_takes_the_shared_options(name, capsys):
    """Each is declared once (``runner.DeviceOptions``, ``RunSpec.amp``). One a script cannot
    honour keeps its flag and default (which parses), says so in ``--help``, and refuses any
    other value with one paragraph saying why: exit code 2, no traceback."""
    parser = parser_of(name)
    by_dest = {a.dest: a for a in parser._actions}
    assert set(SHARED) <= set(by_dest)
    for dest in SHARED:
        action = by_dest[dest]
        if not isinstance(action, Refused):
            continue
        flag = action.option_strings[0]
        given = REQUIRED.get(name, [])
        if action.nargs != 0 and action.default is not None:  # the default, given, passes
            assert getattr(parser.parse_args([*given, flag, str(action.default)]), dest) == (
                action.default
            )
        argv = {"device": [flag, "cuda:1"], "amp": [flag, "bf16"], "pack": [flag, "2"]}
        err = assert_rejected(parser, [*given, *argv.get(dest, [flag])], flag, capsys)
        paragraph = err.strip().splitlines()[-1]
        assert paragraph.endswith(action.why) and "Traceback" not in err
        assert len(action.why) > 40 and "Not taken by this script" in action.help


def test_the_shared_options_refused_are_the_ones_stated():
    """Every option works where it can: the timing scripts refuse ``--pack`` (packed runs
    would slow each other), the measurement-only ones ``--compile``/``--amp``, the readers of
    logs all four."""
    refused = {
        name: sorted(a.dest for a in parser_of(name)._actions if isinstance(a, Refused))
        for name in SCRIPTS
    }
    every = sorted(SHARED)
    assert refused == {
        **{name: [] for name in SCRIPTS},
        "curvature_speed": ["amp", "compile", "pack"],
        "fp_spikes": every,
        "report": every,
        "fsdp_overhead": every,
        "step_time_across_commits": every,
        "lm_penalty_scale": ["compile"],
        "loop_speed": ["pack"],
        "overhead": ["pack"],
    }


def _other_value(action: argparse.Action) -> list[str]:
    """Command-line words giving ``action`` a valid value other than its default."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[1 if action.default else 0]]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    default = action.default
    if isinstance(default, float):
        return [flag, str(default * 2 + 2 if default else 0.5)]
    return [flag, str(default * 2 + 2 if default else 2)]


def test_every_run_spec_option_reaches_the_runs():
    """An option is one RunSpec field: given on the command line, its value is the runs'."""
    options = importlib.import_module("fisher_optim.cli")
    config = importlib.import_module("benchmarks.common.config")
    cfg = _script("cifar10_simplecnn").CONFIG
    parser = cli.build_parser(cfg)
    by_dest = {a.dest: a for a in parser._actions}
    names = [f.name for f in options.option_fields(config.RunSpec)]
    assert len(names) >= 25 and set(names) <= set(by_dest)
    for name in names:
        argv = [*_other_value(by_dest[name]), "--methods", "fp", "--lrs", "0.1"]
        args = parser.parse_args(argv)
        spec = cli.make_specs(cli.apply_dataset(cfg, args), args)[0]
        assert getattr(spec, name) == getattr(args, name) != parser.get_default(name), name


def test_a_setting_is_declared_once_by_the_options_and_the_run_spec():
    """A setting's fields are RunSpec's fields and the sweep's options, with their declared
    defaults (no copy to drift); a script's value of one is the default of its option; a
    name that is neither is a TypeError."""
    options = importlib.import_module("fisher_optim.cli")
    config = importlib.import_module("benchmarks.common.config")
    setting = {f.name for f in dataclasses.fields(config.Setting)}
    run_fields = {f.name for f in dataclasses.fields(config.RunSpec)} - set(config.PER_RUN)
    resolved = set(options.tagged(cli.SweepOptions, "resolved"))  # the setting's own fields
    sweep = {f.name for f in options.option_fields(cli.SweepOptions)} - resolved
    assert setting == run_fields | sweep
    shadowed = [n for n in setting if n in vars(config.ExperimentConfig)]  # e.g. a method
    assert not shadowed, f"ExperimentConfig attributes hide setting fields: {shadowed}"
    plain = config.ExperimentConfig(name="plain", dataset="cifar10", model="tiny")
    parser = cli.build_parser(plain)
    for cls in (cli.SweepOptions, config.RunSpec):
        for f in options.option_fields(cls):
            if f.name not in resolved | {"dataset", "model", "loss_threshold"}:
                default = config.CLI_DEFAULTS.get(f.name, options._default(f))
                assert parser.get_default(f.name) == default == getattr(plain, f.name), f.name
    assert parser.get_default("loss_threshold") == config.LOSS_THRESHOLDS["cifar10"]
    lb = _script("large_batch_noise").CONFIG
    parser = cli.build_parser(lb)
    for name in (
        "epochs",
        "batch_size",
        "ghost_batch_size",
        "lr_scaling",
        "log_every_update",
        "weight_decay",
        "model",
    ):
        assert parser.get_default(name) == getattr(lb, name), name
    with pytest.raises(TypeError):
        config.ExperimentConfig(name="x", dataset="cifar10", model="tiny", epoch=3)


#: Every experiment script's option strings, parsed defaults and plain run's run names,
#: recorded from the code before the options were declared once (issue 27): a change to
#: how options are declared must not change what any command line means.
EXPECTED = ROOT / "tests" / "bench_cli_expected.json"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_command_lines_are_as_recorded(name):
    expected = json.loads(EXPECTED.read_text())[name]
    cfg = _script(name).CONFIG
    parser = cli.build_parser(cfg)
    args = parser.parse_args([])
    assert sorted(s for a in parser._actions for s in a.option_strings) == expected["options"]
    assert json.loads(json.dumps(vars(args))) == expected["defaults"]
    assert [s.name for s in cli.make_specs(cli.apply_dataset(cfg, args), args)] == expected["runs"]


def test_every_experiment_script_is_recorded():
    assert sorted(json.loads(EXPECTED.read_text())) == sorted(EXPERIMENTS)


def test_a_run_spec_field_added_after_the_first_experiments_is_left_out_at_its_default():
    """config.json of a run at the defaults holds only the first experiments' fields (so
    --resume recognises runs made before a field existed); a value other than the default
    is written."""
    config = importlib.import_module("benchmarks.common.config")
    spec = config.RunSpec(experiment="x", dataset="cifar10", model="tiny", method="fp", lr=0.1)
    assert set(spec.to_dict()) == config.FIRST_SPEC_FIELDS
    changed = dataclasses.replace(spec, ghost_batch_size=64, spike_factor=4.0)
    assert set(changed.to_dict()) == config.FIRST_SPEC_FIELDS | {"ghost_batch_size", "spike_factor"}
    assert config.RunSpec.from_dict(changed.to_dict()) == changed

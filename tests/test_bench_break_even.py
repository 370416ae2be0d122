"""Smoke test of benchmarks/break_even.py on tiny generated CIFAR-10-format data."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from .test_bench_data import make_cifar10
from .test_bench_overhead import load

runner = importlib.import_module("benchmarks.common.runner")

TINY = ["--model", "tiny", "--settings", "0.1:16", "0.01:16", "0.1:32", "--seeds", "0", "1",
        "--train-subset", "64", "--epochs", "1", "--measure-every-examples", "32",
        "--probe-size", "16", "--hessian-probe-size", "8", "--top-k", "2",
        "--lanczos-iters", "4", "--gd-subset", "16", "--gd-steps", "2",
        "--gd-measure-every", "1"]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    make_cifar10(tmp_path / "data", per_batch=16)
    return ["--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]


def test_runs_summarizes_and_plots(tmp_path, data):
    break_even = load("break_even")
    out = tmp_path / "out"
    assert break_even.main([*TINY, *data, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["lr"], s["batch_size"]) for s in summary["settings"]] == [
        (0.1, 16),
        (0.01, 16),
        (0.1, 32),
    ]
    assert all(s["seeds"] == 2 for s in summary["settings"])
    assert [v["other"] for v in summary["verdicts"]] == [[0.01, 16], [0.1, 32]]
    assert summary["gd"]["two_over_lr"] == pytest.approx(2 / 0.02)
    assert (out / "break_even.png").is_file() and (out / "edge_of_stability.png").is_file()
    run = json.loads((out / "sgd_lr0.1_bs16_seed0.json").read_text())["run"]
    assert [r["step"] for r in run["records"]] == [0, 2, 4]
    assert len(run["records"][1]["lambda_K_top"]) == 2 and run["records"][1]["train_acc"] >= 0


def test_time_limit_then_resume(tmp_path, data, capsys):
    break_even = load("break_even")
    out = tmp_path / "out"
    args = [
        *TINY,
        *data,
        "--out",
        str(out),
        "--seeds",
        "0",
        "--gd-subset",
        "0",
        "--settings",
        "0.1:16",
        "0.01:16",
    ]
    assert break_even.main([*args, "--time-limit", "1e-9"]) == 3
    assert "--resume" in capsys.readouterr().out
    assert break_even.main(args) == 0
    first = (out / "sgd_lr0.1_bs16_seed0.json").read_text()
    assert break_even.main([*args, "--resume"]) == 0  # nothing rerun
    assert (out / "sgd_lr0.1_bs16_seed0.json").read_text() == first
    old = json.loads(first)
    del old["status"]  # as saved before the runs had a status
    (out / "sgd_lr0.1_bs16_seed0.json").write_text(json.dumps(old))
    assert break_even.main([*args, "--resume"]) == 0  # still reused
    assert json.loads((out / "sgd_lr0.1_bs16_seed0.json").read_text()) == old


@pytest.mark.parametrize(
    "bad",
    [
        ["--settings", "0.1"],
        ["--settings", "0.1:0"],
        ["--top-k", "0"],
        ["--momentum", "1.5"],
        ["--gd-lr", "-1"],
        ["--hessian-probe-size", "200"],
        ["--x-axis", "time"],
        ["--settings", "0.1:16", "0.1:16"],
        ["--settings", "--gd-subset", "0"],
        ["--seeds", "-1"],
    ],
)
def test_invalid_options_are_argparse_errors(bad, capsys):
    break_even = load("break_even")
    with pytest.raises(SystemExit) as err:
        break_even.parse_args(bad)
    assert err.value.code == 2 and "error" in capsys.readouterr().err


def _runs(out):
    """Every run file of ``out``, less the measurements' timings."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("time", "duration")}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    return {p.name: strip(json.loads(p.read_text())) for p in sorted(out.glob("*_*.json"))}


def test_time_limit_mid_run_then_resume_is_bitwise(tmp_path, data, monkeypatch):
    """A run stopped mid-epoch by --time-limit continues from its checkpoint: every record
    is that of the uninterrupted run (GD and SGD alike)."""
    break_even = load("break_even")
    args = [
        *TINY,
        *data,
        "--seeds",
        "0",
        "--settings",
        "0.1:16",
        "--epochs",
        "2",
        "--gd-steps",
        "3",
    ]
    assert break_even.main([*args, "--out", str(tmp_path / "whole")]) == 0
    split = tmp_path / "split"
    # the deadline passes at the (n+1)-th check: GD at step 2, then SGD at steps 1 and 5
    # (mid-epoch 1, mid-epoch 2: 4 steps an epoch)
    for n in (2, 3, 4):
        ticks = iter(range(10**6))
        monkeypatch.setattr(runner, "clock", lambda t=ticks, n=n: 120.0 * (next(t) > n))
        assert break_even.main([*args, "--out", str(split), "--time-limit", "1", "--resume"]) == 3
        monkeypatch.undo()
        assert list(split.glob("*.pt"))  # the unfinished run's checkpoint
    assert break_even.main([*args, "--out", str(split), "--resume"]) == 0
    assert not list(split.glob("*.pt"))
    assert _runs(split) == _runs(tmp_path / "whole")


def _steps_reads(main, argv, monkeypatch):
    """Host reads between consecutive deadline checks (one per training step) of ``main``."""
    from benchmarks.common.syncs import SyncCounter

    counter, marks = SyncCounter(), []
    monkeypatch.setattr(runner, "past", lambda deadline: marks.append(counter.count) or False)
    with counter:
        assert main(argv) == 0
    return [b - a for a, b in zip(marks, marks[1:])]


@pytest.mark.parametrize("amp", [[], ["--amp", "bf16"]], ids=["float32", "bf16"])
def test_ordinary_training_steps_read_nothing_back(tmp_path, data, monkeypatch, amp):
    """Gradient descent and SGD read the device only at their measurements (every 2nd
    step here), with and without --amp bf16."""
    break_even = load("break_even")
    argv = [*TINY, *data, "--out", str(tmp_path / "out"), "--seeds", "0", "--settings",
            "0.1:16", "--gd-steps", "4", "--gd-measure-every", "2", "--no-plot", *amp]  # fmt: skip
    reads = _steps_reads(break_even.main, argv, monkeypatch)
    # GD: steps 0..3, measured at 0 and 2 (the 4th diff leads into the SGD run, which
    # records at its start); SGD: 4 steps, measured after steps 2 and 4
    gd, sgd = reads[:4], reads[5:]
    assert gd[1] == gd[3] == 0 and gd[0] > 0 and gd[2] > 0, reads
    assert sgd[0] == sgd[2] == 0 and sgd[1] > 0, reads


def test_amp_and_compile_train_and_resume_bitwise(tmp_path, data, monkeypatch):
    """--amp bf16 is part of the runs (config and file names); --compile trains through
    torch.compile (here the identity: compiling takes a minute on a CPU) while λ_H, λ_K and
    Tr(F) are measured on the eager model; cut mid-run by --time-limit, the runs resume
    bitwise."""
    break_even = load("break_even")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    args = [*TINY, *data, "--seeds", "0", "--settings", "0.1:16", "--epochs", "2",
            "--gd-steps", "3", "--amp", "bf16", "--compile", "--no-plot"]  # fmt: skip
    assert break_even.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert len(compiled) == 2  # the GD run's model and the SGD run's
    whole = _runs(tmp_path / "whole")
    assert sorted(whole) == ["gd_lr0.02_n16_amp-bf16.json", "sgd_lr0.1_bs16_seed0_amp-bf16.json"]
    assert all(r["config"]["amp"] == "bf16" for r in whole.values())
    split = tmp_path / "split"
    ticks = iter(range(10**6))
    monkeypatch.setattr(runner, "clock", lambda: 120.0 * (next(ticks) > 2))
    assert break_even.main([*args, "--out", str(split), "--time-limit", "1"]) == 3
    monkeypatch.setattr(runner, "clock", lambda: 0.0)
    assert break_even.main([*args, "--out", str(split), "--resume"]) == 0
    assert _runs(split) == whole


def test_pack_two_gives_the_runs_of_pack_one(tmp_path, data):
    """--pack 2: the GD and the SGD run train in two processes, both stopped by
    --time-limit and both resumed, with the numbers of --pack 1."""
    break_even = load("break_even")
    args = [*TINY, *data, "--seeds", "0", "--settings", "0.1:16", "--no-plot"]
    assert break_even.main([*args, "--out", str(tmp_path / "one")]) == 0
    two = ["--out", str(tmp_path / "two"), "--pack", "2"]
    assert break_even.main([*args, *two, "--time-limit", "1e-9"]) == 3
    assert len(list((tmp_path / "two").glob("*.pt"))) == 2  # each process's checkpoint
    assert break_even.main([*args, *two, "--resume"]) == 0
    runs = _runs(tmp_path / "one")
    assert len(runs) == 2 and _runs(tmp_path / "two") == runs
    summary = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summary[0] == summary[1]

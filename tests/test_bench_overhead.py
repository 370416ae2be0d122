"""Smoke tests of benchmarks/overhead.py and benchmarks/fd_step.py on tiny settings."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_times_variants_side_by_side(tmp_path):
    overhead = load("overhead")
    out = tmp_path / "o.json"
    results = overhead.main(
        ["--models", "tiny", "--variants", "fp_fd_k1", "gpx_exact_k10", "--batch-size", "8",
         "--rounds", "2", "--window", "2", "--warmup", "1", "--threads", "1", "--json", str(out)]
    )
    rows = results["tiny"]
    assert set(rows) == {"sgd", "fp_fd_k1", "gpx_exact_k10"}
    assert rows["sgd"]["ratio"] == 1.0 and rows["fp_fd_k1"]["target"] == 3.15
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert json.loads(out.read_text())["results"]["tiny"].keys() == rows.keys()


def test_fd_step_tables_mark_the_default_scheme_and_step(tmp_path):
    fd_step = load("fd_step")
    out = tmp_path / "fd.md"
    table = fd_step.main(
        ["--seeds", "1", "--batch-size", "4", "--networks", "smooth_mlp", "relu_cnn",
         "--steps", "1e-4", "1e-5", "1e-8", "--output", str(out)]
    )
    assert out.read_text() == table + "\n"
    assert "Relative L2 error" in table and "Cosine" in table and "Produced by `python" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "network" not in line]
    assert len(rows) == 2 * 2 * 3 * 3  # two tables x networks x dtypes x schemes
    default = [r for r in rows if "| float32 | guarded |" in r or "| float64 | forward |" in r]
    assert len(default) == 2 * 2 * 2
    assert all(r.count("**") == 2 for r in default)  # the default step of each dtype
    assert all("**" not in r for r in rows if r not in default)  # bfloat16 has none


def test_fd_default_is_within_one_percent_on_smooth_and_relu_networks():
    """The float32 default (guarded central difference, relative step 1e-5) against the
    float64 exact gradient, 3 seeds each of the smooth and the ReLU/max-pool CNN."""
    fd_step = load("fd_step")
    from fisher_optim.engines import DEFAULT_FD_SCHEME, DEFAULT_FD_STEP

    c = DEFAULT_FD_STEP[torch.float32]
    for net in ("tiny_smooth_cnn", "relu_cnn"):
        for seed in range(3):
            out = fd_step.measure(net, torch.float32, seed, 32, [c], [DEFAULT_FD_SCHEME[torch.float32]])
            error, cosine = out[DEFAULT_FD_SCHEME[torch.float32], c]
            assert error < 0.01 and cosine > 0.9999, (net, seed, error)


def test_fd_step_rejects_invalid_options(capsys):
    fd_step = load("fd_step")
    for bad in (["--seeds", "0"], ["--steps", "0"], ["--steps", "1.5"], ["--steps", "nan"],
                ["--steps", "-1e-3"], ["--schemes", "backward"], ["--dtypes", "float16"],
                ["--networks", "resnet"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as exc:
            fd_step.main(bad)
        assert exc.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fd_step.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--seeds", "--batch-size", "--steps", "--schemes", "--dtypes", "--networks",
                   "--threads", "--output"):
        assert option in text
    assert text.count("(default:") == 8


def test_guarded_difference_drops_the_side_that_crossed_a_kink():
    """The ReLU/max-pool CNN at c = 1e-5: in seed 0 the step behind θ crosses a kink (the
    central difference is 8x off, the forward one is not), in seed 2 the step ahead of θ
    does (forward 12x, central 6x); the guarded difference is within 0.2% in both."""
    fd_step = load("fd_step")
    schemes = ["forward", "central", "guarded"]
    for seed, crossed_ahead in ((0, False), (2, True)):
        out = fd_step.measure("relu_cnn", torch.float32, seed, 32, [1e-5], schemes)
        error = {s: out[s, 1e-5][0] for s in schemes}
        assert error["central"] > 1 and error["guarded"] < 2e-3, (seed, error)
        assert (error["forward"] > 1) == crossed_ahead, (seed, error)

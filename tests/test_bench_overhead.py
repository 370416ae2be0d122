"""Smoke tests of benchmarks/overhead.py and benchmarks/fd_step.py on small settings."""

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
        [
            "--models",
            "tiny",
            "--variants",
            "fp_fd_k1",
            "gpx_exact_k10",
            "--batch-size",
            "8",
            "--rounds",
            "2",
            "--window",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = results["tiny"]
    assert set(rows) == {"sgd", "fp_fd_k1", "gpx_exact_k10"}
    assert rows["sgd"]["ratio"] == 1.0 and rows["fp_fd_k1"]["target"] == 3.15
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert json.loads(out.read_text())["results"]["tiny"].keys() == rows.keys()


def test_fd_step_table_on_a_small_setting(tmp_path, monkeypatch):
    """The table: one row per network and state, every difference a median (worst) pair."""
    fd_step = load("fd_step")
    monkeypatch.setitem(fd_step.NETWORKS, "simplecnn", 4)

    def images(root, n, batch, train_steps):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n)]
        return xs, [
            (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(10, (batch,)))
            for _ in range(train_steps)
        ]

    monkeypatch.setattr(fd_step, "image_batches", images)
    out = tmp_path / "fd.md"
    table = fd_step.main(
        ["--networks", "simplecnn", "--batches", "2", "--train-steps", "1", "--output", str(out)]
    )
    assert out.read_text() == table + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| simplecnn")]
    assert [r.split(" | ")[1] for r in rows] == ["init", "trained"]
    cells = rows[0].split(" | ")
    old, central, forward = (float(c.split()[0]) for c in cells[3:6])
    assert central < 0.01 and forward < 0.01 < old  # the old default crosses kinks here
    assert "Produced by `python benchmarks/fd_step.py" in table


def test_fd_step_rejects_invalid_options(capsys):
    fd_step = load("fd_step")
    for bad in (["--batches", "0"], ["--train-steps", "x"], ["--networks", "resnet"]):
        with pytest.raises(SystemExit) as exc:
            fd_step.main(bad)
        assert exc.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fd_step.main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--data-root",
        "--networks",
        "--batches",
        "--train-steps",
        "--threads",
        "--output",
    ):
        assert option in text

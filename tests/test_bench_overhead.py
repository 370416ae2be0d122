"""Smoke tests of benchmarks/overhead.py and benchmarks/fd_step.py on tiny settings."""

import importlib.util
import json
import sys
from pathlib import Path

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


def test_fd_step_table_marks_the_default_step():
    fd_step = load("fd_step")
    table = fd_step.main(["--seeds", "1", "--batch-size", "4"])
    lines = [line for line in table.splitlines() if line.startswith("| ") and "network" not in line]
    assert len(lines) == 4  # two networks x two dtypes
    assert all(line.count("**") == 2 for line in lines)  # the default step of each dtype

"""Smoke test of benchmarks/fsdp_overhead.py on tiny settings (2 ranks, gloo)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def load():
    """The script as ``benchmarks.fsdp_overhead``: the spawned ranks import its worker."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("benchmarks.fsdp_overhead")


def test_fsdp_overhead_runs_and_reports_every_variant(tmp_path, capsys):
    bench = load()
    out = tmp_path / "fsdp.json"
    results = bench.main(
        [
            "--layers",
            "1",
            "--dim",
            "8",
            "--heads",
            "2",
            "--context",
            "4",
            "--batch-size",
            "2",
            "--window",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--ddp",
        ]
    )
    rows = results["overhead"]
    assert list(rows) == list(bench.VARIANTS)
    assert all(
        r["s_per_step"] > 0 and r["peak_mib"] > 0 and r["held_mib"] > 0 for r in rows.values()
    )
    # the penalty's variants hold the cached penalty gradient on top of SGD's state
    assert rows["fp_fd_k10"]["held_mib"] > rows["fsdp_sgd"]["held_mib"]
    # the exact mode runs under FSDP2 (on the gathered full parameters), in both schedules
    assert {"fp_exact_k10", "fp_exact_k1"} <= set(rows)
    assert rows["fp_exact_k1"]["held_mib"] == rows["fp_fd_k1"]["held_mib"]
    # Fisher noise runs under FSDP2 with each covariance
    assert {"noise_diag_k10", "noise_diag_k1", "noise_trace_k1", "noise_full_k1"} <= set(rows)
    assert json.loads(out.read_text())["results"]["overhead"].keys() == rows.keys()
    ddp = results["ddp"]
    assert list(ddp) == list(bench.DDP_VARIANTS)
    assert ddp["ddp_sgd"]["all_reduce_s_per_step"] == 0  # the optimizer's own only
    assert all(ddp[v]["all_reduce_s_per_step"] > 0 for v in ("ddp_fp_fd_k1", "ddp_fp_exact_k1"))
    text = capsys.readouterr().out
    assert (
        "| fp_fd_k1_forward |" in text
        and "| fp_exact_k1 |" in text
        and "| noise_full_k1 |" in text
        and "| ddp_fp_exact_k1 |" in text
        and "Produced by `python benchmarks/fsdp_overhead.py" in text
    )


def test_fsdp_overhead_rejects_bad_options():
    bench = load()
    for bad in (["--dim", "0"], ["--dim", "10", "--heads", "4"], ["--rounds", "x"]):
        with pytest.raises(SystemExit):
            bench.main(bad)

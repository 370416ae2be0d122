"""benchmarks/gpu_campaign.py: its CPU smoke mode (``--dry-run``: every part, the table's
runs packed two at a time by the benchmarks' training loop, resumed, archived and continued
elsewhere), the table's runs and the sizing arithmetic. (The training loop's host reads and
its bitwise resume: tests/test_bench_host_syncs.py, tests/test_bench_harness.py.)"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_campaign as campaign
from benchmarks.common.harness import prepare_data


def test_dry_run_writes_every_part(tmp_path: Path) -> None:
    # --pack 2: the runs train in two processes at once
    result = campaign.main(
        ["--dry-run", "--out", str(tmp_path), "--pack", "2", "--budget-s", "300"]
    )
    written = json.loads((tmp_path / campaign.CAMPAIGN_JSON).read_text())
    assert written["dry_run"] and set(written["parts"]) == set(campaign.PARTS)
    tests = result["parts"]["tests"]
    assert tests["returncode"] == 0 and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] >= 1
    over = result["parts"]["overhead"]
    assert set(over["models"]["tiny"]["ratio"]) == {"sgd", *campaign.OVERHEAD_VARIANTS}
    # the optimizer's syncs in 20 steps at every=10: two refreshes, one each; none in the loop
    assert over["syncs"]["syncs_in_opt_step"] == 2
    assert over["syncs"]["syncs_in_training_loop"] == 2
    curv = result["parts"]["curvature"]
    assert {"loop", "fisher_trace", "batched"} <= set(curv["tiny"]["seconds"])
    table = result["parts"]["table1"]
    states = table["runs"].values()
    assert [s["status"] for s in states] == ["complete", "complete"]
    assert all(s["epochs_done"] == campaign.DRY["epochs"] for s in states)
    assert [r["seeds_complete"] for r in table["row"][:2]] == [1, 1]
    assert table["pack"] == 2
    for state in states:  # the harness's run folders
        assert state["summary"]["test_acc_at_best_val"] is not None

    # a rerun of the table resumes: finished runs are not trained again
    again = campaign.main(["--dry-run", "--out", str(tmp_path), "--pack", "1", "--parts", "table1"])
    assert again["parts"]["table1"]["runs"] == table["runs"]
    assert set(again["parts"]) == set(campaign.PARTS)  # the earlier parts are kept

    # archived (in one file, or in files of bounded size), unarchived on a "fresh machine"
    assert campaign.archive(tmp_path, tmp_path / "whole") == [
        campaign.CAMPAIGN_JSON,
        "table1-0.tar",
    ]
    packed = tmp_path / "packed"
    names = campaign.archive(tmp_path, packed, limit=1)  # one run per archive
    assert names == [campaign.CAMPAIGN_JSON, "table1-0.tar", "table1-1.tar"]
    assert all((packed / n).is_file() for n in names)
    fresh = tmp_path / "fresh"
    resumed = campaign.main(
        [
            "--dry-run",
            "--out",
            str(fresh),
            "--pack",
            "1",
            "--parts",
            "table1",
            "--unarchive",
            *(str(packed / n) for n in names[1:]),
        ]
    )
    assert resumed["parts"]["table1"]["runs"] == table["runs"]  # nothing trained again


def test_an_interrupted_table_continues(tmp_path: Path) -> None:
    """A deadline already past stops the runs after their first epoch; the same call
    continues them to the end."""
    specs = [
        replace(s, model="tiny") for s in campaign.table1_specs([0], epochs=2, batch_size=32)[:2]
    ]
    data = prepare_data(campaign._synthetic_data(64, 32, 32), val_size=32)
    cpu = torch.device("cpu")
    part = campaign.run_table1(specs, data, tmp_path, cpu, 0.0, pack=1)
    assert [r["status"] for r in part["runs"].values()] == ["interrupted", "not started"]
    done = campaign.run_table1(specs, data, tmp_path, cpu, time.monotonic() + 600, pack=1)
    assert [r["status"] for r in done["runs"].values()] == ["complete", "complete"]
    assert [r["epochs_done"] for r in done["runs"].values()] == [2, 2]


def test_table1_runs_follow_the_paper() -> None:
    specs = campaign.table1_specs([0, 1])
    assert len(specs) == 2 * len(campaign.TABLE1_RUNS)
    assert [s.seed for s in specs[:6]] == [0] * 6  # seed-major: the whole row first
    first = specs[0]
    assert (first.epochs, first.milestones, first.batch_size, first.momentum) == (
        300,
        (150, 225),
        128,
        0.9,
    )
    lrs = {(s.method, s.lr) for s in specs}
    assert ("baseline", 0.1) in lrs and ("baseline", 0.01) in lrs and ("fp", 0.01) in lrs
    assert {s.alpha for s in specs if s.method == "gpx"} == {100.0}
    assert all(s.spike_factor is None for s in specs)  # the paper's FP, no safeguard
    assert all(s.test_every == 0 for s in specs)  # test@best-val on the kept weights
    assert all(s.amp is None for s in specs)  # float32 unless --amp


def test_amp_trains_the_table_runs_under_autocast() -> None:
    args = campaign.build_parser().parse_args(["--amp", "bf16"])
    specs = campaign.table1_specs([0], amp=args.amp)
    assert {s.amp for s in specs} == {"bf16"} and all(s.name.endswith("amp-bf16") for s in specs)
    assert len({s.name for s in specs}) == len(specs)


def test_sizing_arithmetic(monkeypatch) -> None:
    flops = {"sgd": 15e9, "fp_exact_k1": 60e9}
    monkeypatch.setattr(campaign, "step_flops", lambda model, variant, bs=128: flops[variant])
    plan = campaign.table1_sizing(tflops=15.0, budget_s=540.0)
    assert plan["steps_per_run"] == 300 * 352
    baseline = (300 * 352 * 15e9 + 300 * 15_000 * 15e9 / (3 * 128)) / 15e12
    assert plan["gpu_s_per_run"]["baseline"] == pytest.approx(baseline)
    penalised = plan["gpu_s_per_run"]["penalised"]
    assert penalised == pytest.approx(baseline + 300 * 352 * 45e9 / 10 / 15e12)
    assert plan["row_fraction_fitting"] == pytest.approx(
        plan["table_part_s"] / (2 * baseline + 4 * penalised)
    )

"""benchmarks/gpu_campaign.py: its CPU smoke mode (``--dry-run``), the sync-free training
loop's resume, the table's runs and the sizing arithmetic."""

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
    # two workers: the runs train in two processes at once
    result = campaign.main(
        ["--dry-run", "--out", str(tmp_path), "--workers", "2", "--budget-s", "300"]
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
    assert table["workers"] == 2

    # a rerun of the table resumes: finished runs are not trained again
    again = campaign.main(
        ["--dry-run", "--out", str(tmp_path), "--workers", "1", "--parts", "table1"]
    )
    assert again["parts"]["table1"]["runs"] == table["runs"]
    assert set(again["parts"]) == set(campaign.PARTS)  # the earlier parts are kept

    # packed into flat files of bounded size, unpacked on a "fresh machine", resumed there
    packed = tmp_path / "packed"
    names = campaign.pack(tmp_path, packed, limit=1)  # one run per archive
    assert names == [campaign.CAMPAIGN_JSON, "table1-0.tar", "table1-1.tar"]
    assert all((packed / n).is_file() for n in names)
    fresh = tmp_path / "fresh"
    resumed = campaign.main(
        [
            "--dry-run",
            "--out",
            str(fresh),
            "--workers",
            "1",
            "--parts",
            "table1",
            "--unpack",
            *(str(packed / n) for n in names[1:]),
        ]
    )
    assert resumed["parts"]["table1"]["runs"] == table["runs"]  # nothing trained again


def _tiny(tmp: Path, epochs: int = 3, train: int = 64):
    spec = replace(campaign.table1_specs([0], epochs=epochs, batch_size=32)[1], model="tiny")
    assert spec.method == "fp" and spec.penalty == "fisher"
    data = prepare_data(campaign._synthetic_data(train, 32, 32), val_size=32)
    return spec, data


def test_interrupted_run_resumes_bitwise(tmp_path: Path) -> None:
    spec, data = _tiny(tmp_path)
    cpu = torch.device("cpu")
    whole = campaign.train_sync_free(spec, data, tmp_path / "whole", cpu, time.monotonic() + 600)
    assert whole["status"] == "complete" and whole["epochs_done"] == 3
    # a deadline already past: the first epoch runs (no epoch time known yet), then it stops
    part = campaign.train_sync_free(spec, data, tmp_path / "part", cpu, time.monotonic())
    assert part["status"] == "interrupted" and part["epochs_done"] == 1
    resumed = campaign.train_sync_free(spec, data, tmp_path / "part", cpu, time.monotonic() + 600)
    assert resumed["status"] == "complete" and resumed["epochs_done"] == 3
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("val_acc", "test_acc", "train_loss", "trace"):
        assert [r[key] for r in a["logs"]] == [r[key] for r in b["logs"]], key


def test_training_steps_read_nothing_back(tmp_path: Path, monkeypatch) -> None:
    """Within an epoch only the optimizer's refresh syncs (one per ``every`` steps)."""
    spec, data = _tiny(tmp_path, epochs=1, train=11 * 32)
    before_step: list[int] = []
    real = campaign.iterate_batches

    def batches(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if "generator" in kwargs:  # the training epoch's batches, not the Tr(F) probe's
                before_step.append(counter.count)
            yield batch

    monkeypatch.setattr(campaign, "iterate_batches", batches)
    with campaign.SyncCounter() as counter:
        campaign.train_sync_free(
            spec, data, tmp_path / "run", torch.device("cpu"), time.monotonic() + 600
        )
    assert len(before_step) == 11
    per_step = [b - a for a, b in zip(before_step, before_step[1:])]
    # steps 0..9: the refresh of step 0 syncs once; step 10's refresh is after the last yield
    assert per_step == [1] + [0] * 9


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

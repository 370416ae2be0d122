"""benchmarks/fp_spikes.py: the spike statistics of a run's per-refresh log."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_fp_spikes", ROOT / "benchmarks" / "fp_spikes.py")
fp_spikes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp_spikes)


def test_running_ratios_against_a_hand_computed_median():
    ratios = fp_spikes.running_ratios([1.0, 3.0, 2.0, 20.0, None, 2.0], window=4)
    assert ratios[0] is None  # nothing known yet
    assert ratios[1] == 3.0 and ratios[2] == 1.0  # medians 1 and 2
    assert ratios[3] == 10.0 and ratios[4] is None
    assert ratios[5] == pytest.approx(2.0 / 2.5)  # median of (1, 3, 2, 20)


def test_collapses_are_epochs_losing_more_than_ten_points():
    metrics = [
        {"epoch": 0},
        {"epoch": 1, "train_acc": 50.0},
        {"epoch": 2, "train_acc": 70.0},
        {"epoch": 3, "train_acc": 55.0},
        {"epoch": 4, "train_acc": 50.0},
    ]
    assert fp_spikes.collapses(metrics) == [3]


def test_report_on_a_written_run(tmp_path, capsys):
    run = tmp_path / "fp_run"
    run.mkdir()
    norms = [1.0, 1.1, 0.9, 1.0, 1.2, 8.0, 1.0, 1.1]
    (run / "refreshes.jsonl").write_text(
        "".join(
            json.dumps(
                {"step": 10 * i, "epoch": i / 4, "value": n * n, "grad_norm": n, "scale": None}
            )
            + "\n"
            for i, n in enumerate(norms)
        )
    )
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e, "train_acc": a}) + "\n"
            for e, a in [(0, None), (1, 40.0), (2, 20.0)]
        )
    )
    assert fp_spikes.main([str(run), "--window", "4", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 refreshes" in out and "collapses (train acc -10 points in one epoch): [2]" in out
    assert "| 4 | 1 |" in out  # factor 4 flags the one spike (8 / median 1.05)
    assert fp_spikes.main([str(tmp_path)]) == 2


@pytest.mark.parametrize(
    "n,b,k",
    [
        (10000, 128, 10),
        (45000, 128, 10),
        (100000, 128, 10),
        (1000, 100, 10),
        (50, 8, 3),
        (37, 5, 4),
    ],
)
def test_short_batch_refreshes_against_a_simulated_step_counter(n, b, k):
    epochs = 40
    expected, t = [], 0
    for e in range(1, epochs + 1):
        for start in range(0, n, b):
            if t % k == 0 and n - start < b:  # a refresh on the short batch
                expected.append(e)
            t += 1
    assert fp_spikes.short_batch_refreshes(n, b, k, epochs) == expected


def test_schedule_report_names_the_papers_sizes(capsys):
    assert fp_spikes.main(["--schedule", "10000", "45000", "--epochs", "60"]) == 0
    out = capsys.readouterr().out
    assert "| 10000 | 79 | 16 | 8.0 | 6 (9, 19, 29, 39, 49, ...) |" in out
    assert "| 45000 | 352 | 72 | 1.8 | 0 |" in out


def test_pull_is_alpha_times_the_median_norm_of_each_epoch(tmp_path, capsys):
    runs = []
    for name, method, alpha, norms in [
        ("fp_run", "fp", 0.01, [1.0, 3.0, 2.0, 10.0, 30.0]),
        ("gpx_run", "gpx", 1000.0, [1e-5, 2e-5, 9e-5, 4e-5, 5e-5]),
    ]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"method": method, "alpha": alpha}))
        # epochs 0, 0.3, 0.6 (epoch 0), 1.0, 1.3 (epoch 1)
        (run / "refreshes.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "step": i,
                        "epoch": [0, 0.3, 0.6, 1.0, 1.3][i],
                        "value": 1.0,
                        "grad_norm": n,
                        "scale": 1.0,
                    }
                )
                + "\n"
                for i, n in enumerate(norms)
            )
        )
        runs.append(str(run))
    assert fp_spikes.main([*runs, "--pull", "0", "1", "2"]) == 0
    out = capsys.readouterr().out
    # fp: 0.01 · median(1, 3, 2) = 0.02; 0.01 · median(10, 30) = 0.2; no refresh in epoch 2
    assert "| fp_run | fp | 0.01 | 0.02 | 0.2 | - |" in out
    # gpx: 1000 · median(1e-5, 2e-5, 9e-5) = 0.02; 1000 · median(4e-5, 5e-5) = 0.045
    assert "| gpx_run | gpx | 1000 | 0.02 | 0.045 | - |" in out

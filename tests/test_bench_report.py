"""benchmarks/report.py: arms, mean ± sd, paired differences and Spearman's ρ, checked against
brute force on fabricated run directories (no training)."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


def _spec(method="baseline", lr=0.01, alpha=0.0, seed=0, spike_factor=None, epochs=60):
    return {
        "method": method,
        "lr": lr,
        "alpha": alpha,
        "seed": seed,
        "epochs": epochs,
        "spike_factor": spike_factor,
        "milestones": [50],
    }


def _write_run(root: Path, spec: dict, test: float, train_accs=(50.0, 90.0, 95.0), **extra):
    d = (
        root
        / f"{spec['method']}_{spec['lr']}_{spec['alpha']}_{spec['spike_factor']}_s{spec['seed']}"
    )
    d.mkdir(parents=True)
    summary = {
        "name": d.name,
        "spec": spec,
        "status": "complete",
        "best_val_acc": test + 1,
        "test_acc_at_best_val": test,
        "final_test_acc": test - 0.5,
        "final_train_acc": train_accs[-1],
        "max_trace": 100.0 + test,
        "tr_f_i": 10.0 * test,
        "overhead": 0.1,
        **extra,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": 0, "train_acc": None}] + [
        {"epoch": i + 1, "train_acc": a, "val_acc": 50.0, "trace": 5.0}
        for i, a in enumerate(train_accs)
    ]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def _brute_ranks(v):
    # rank = 1 + number of smaller values + (number of other equal values) / 2
    return [1 + sum(w < x for w in v) + (sum(w == x for w in v) - 1) / 2 for x in v]


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_brute_force_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=9).tolist()
    y = rng.normal(size=9).tolist()
    n = len(x)
    rx, ry = _brute_ranks(x), _brute_ranks(y)
    classic = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))
    assert report.spearman(x, y) == pytest.approx(classic, abs=1e-12)
    xt = [round(v) for v in x]  # ties
    yt = rng.integers(0, 3, size=n).tolist()
    if len(set(xt)) > 1 and len(set(yt)) > 1:
        expected = np.corrcoef(_brute_ranks(xt), _brute_ranks(yt))[0, 1]
        assert report.spearman(xt, yt) == pytest.approx(expected, abs=1e-12)


def test_spearman_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="equal length"):
        report.spearman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="undefined"):
        report.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_average_ranks_by_enumeration():
    for v in itertools.product([0, 1, 2], repeat=4):
        assert report.average_ranks(list(v)) == _brute_ranks(list(v))


def test_arms_mean_sd_pairs_and_collapses(tmp_path):
    tests = {
        ("baseline", 0): 57.0,
        ("baseline", 1): 58.5,
        ("baseline", 2): 56.0,
        ("fp", 0): 60.0,
        ("fp", 1): 58.0,
        ("fp", 3): 61.0,
    }
    for (method, seed), acc in tests.items():
        alpha = 0.01 if method == "fp" else 0.0
        spike = 4.0 if method == "fp" else None
        # fp seed 1 collapses twice: 90 -> 70 (-20), 80 -> 60 (-20); a 10-point drop is not one
        accs = (
            (50.0, 90.0, 70.0, 80.0, 60.0)
            if (method, seed) == ("fp", 1)
            else (50.0, 60.0, 50.0, 55.0)
        )
        _write_run(tmp_path, _spec(method, 0.001, alpha, seed, spike), acc, accs)
    arms = report.group_arms(report.load_runs([tmp_path]))
    assert list(arms) == ["baseline/lr0.001/a0", "fp/lr0.001/a0.01/guard4"]
    table = report.arm_table(arms)
    base = [57.0, 58.5, 56.0]
    m, sd = statistics.fmean(base), statistics.stdev(base)
    assert f"| {m:.2f} ± {sd:.2f} |" in table.splitlines()[2]
    assert table.splitlines()[3].endswith("| 2 (0/2/0) |")
    diffs = report.paired_differences(arms["fp/lr0.001/a0.01/guard4"], arms["baseline/lr0.001/a0"])
    assert diffs == {0: pytest.approx(3.0), 1: pytest.approx(-0.5)}  # seed 3: no partner


def test_main_end_to_end_and_errors(tmp_path, capsys):
    for seed, acc in enumerate([50.0, 52.0]):
        _write_run(tmp_path / "a", _spec("baseline", 0.01, seed=seed), acc)
        _write_run(tmp_path / "a", _spec("baseline", 0.1, seed=seed), acc - 3)
    (tmp_path / "a" / "unfinished").mkdir()  # no summary.json: left out
    assert (
        report.main(
            [str(tmp_path / "a"), "--spearman", "--pair", "baseline/lr0.01/a0", "baseline/lr0.1/a0"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "seed 0: +3.00, seed 1: +3.00 (mean +3.00 ± 0.00)" in out
    # Tr(F_i) = 10 · test and final test = test − 0.5: perfectly concordant
    assert "= +1.000 over 4 runs" in out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "a"), "--pair", "fp/lr0.01/a0", "baseline/lr0.01/a0"])
    err = capsys.readouterr().err
    assert "no arm 'fp/lr0.01/a0'; the arms are: baseline/lr0.01/a0, baseline/lr0.1/a0" in err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])
    _write_run(tmp_path / "flat", _spec(seed=0), 50.0)
    _write_run(tmp_path / "flat", _spec(seed=1), 50.0)  # equal Tr(F_i): ρ undefined
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "flat"), "--spearman"])
    assert "undefined" in capsys.readouterr().err


def test_same_label_for_different_arms_and_duplicate_seeds_raise(tmp_path):
    _write_run(tmp_path / "x", _spec(seed=0), 50.0)
    spec = _spec(seed=0)
    spec["milestones"] = [30]  # a field the label does not show
    _write_run(tmp_path / "y", spec, 51.0)
    with pytest.raises(ValueError, match="both labelled"):
        report.group_arms(report.load_runs([tmp_path / "x", tmp_path / "y"]))
    _write_run(tmp_path / "z", _spec(seed=0), 52.0)
    with pytest.raises(ValueError, match="seed"):
        report.group_arms(report.load_runs([tmp_path / "x", tmp_path / "z"]))


def test_a_baselines_safeguard_settings_do_not_split_its_arm(tmp_path):
    """The safeguard acts only on a penalty: baselines run with and without it are one arm,
    FP runs are two."""
    _write_run(tmp_path, _spec(seed=0, spike_factor=None), 50.0)
    _write_run(tmp_path, _spec(seed=1, spike_factor=4.0), 52.0)
    arms = report.group_arms(report.load_runs([tmp_path]))
    assert [len(runs) for runs in arms.values()] == [2]
    _write_run(tmp_path / "fp", _spec("fp", alpha=0.01, seed=0, spike_factor=None), 55.0)
    _write_run(tmp_path / "fp", _spec("fp", alpha=0.01, seed=0, spike_factor=4.0), 56.0)
    assert len(report.group_arms(report.load_runs([tmp_path / "fp"]))) == 2


def test_epochs_join_the_label_when_schedules_differ(tmp_path):
    _write_run(tmp_path, _spec(epochs=60), 50.0)
    _write_run(tmp_path / "long", _spec(epochs=100), 51.0)
    arms = report.group_arms(report.load_runs([tmp_path, tmp_path / "long"]))
    assert sorted(arms) == ["baseline/lr0.01/a0/e100", "baseline/lr0.01/a0/e60"]


def test_batch_size_joins_the_label_when_batch_sizes_differ(tmp_path):
    """Wen et al.'s SB and LB runs at one learning rate are two arms, told apart by /bs."""
    _write_run(tmp_path / "sb", {**_spec(lr=0.03), "batch_size": 32}, 50.0)
    _write_run(tmp_path / "lb", {**_spec(lr=0.03), "batch_size": 512}, 48.0)
    _write_run(tmp_path / "lb", {**_spec(lr=0.03, seed=1), "batch_size": 512}, 47.0)
    arms = report.group_arms(report.load_runs([tmp_path / "sb", tmp_path / "lb"]))
    assert sorted(arms) == ["baseline/lr0.03/a0/bs32", "baseline/lr0.03/a0/bs512"]
    assert [len(arms["baseline/lr0.03/a0/bs512"])] == [2]
    # the safeguard acts only on a penalty: a noise run's spike_factor is not in its label
    _write_run(
        tmp_path / "lb", {**_spec("noise_diag", 0.01, spike_factor=4.0), "batch_size": 512}, 46.0
    )
    arms = report.group_arms(report.load_runs([tmp_path / "sb", tmp_path / "lb"]))
    assert "noise_diag/lr0.01/a0/bs512" in arms
    # one batch size: no /bs in the label
    assert sorted(report.group_arms(report.load_runs([tmp_path / "lb"]))) == [
        "baseline/lr0.03/a0",
        "noise_diag/lr0.01/a0",
    ]

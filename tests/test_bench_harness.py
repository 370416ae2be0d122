"""Tests for the benchmark harness (benchmarks/common/{harness,cli,config,plots}.py) and scripts.

Everything runs on tiny generated data with the ``tiny`` model, on CPU, in a few seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

harness = importlib.import_module("benchmarks.common.harness")
cli = importlib.import_module("benchmarks.common.cli")
config = importlib.import_module("benchmarks.common.config")
plots = importlib.import_module("benchmarks.common.plots")
runner = importlib.import_module("benchmarks.common.runner")
data_mod = importlib.import_module("benchmarks.common.data")

SCRIPTS = (
    "cifar10_simplecnn",
    "cifar100_vgg",
    "cifar100_wresnet",
    "cifar100_densenet",
    "tinyimagenet_wresnet",
    "noisy_labels",
    "fp_start_epoch",
    "early_trace_vs_accuracy",
    "large_batch",
)
NUM_CLASSES = 4


def _images(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Learnable images: a class-dependent colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    x = base[labels % 4].view(-1, 3, 1, 1).float() + 60 * torch.randn(
        len(labels), 3, size, size, generator=g
    )
    return x.clamp(0, 255).to(torch.uint8)


def tiny_datasets(n_train: int = 96, n_test: int = 32, size: int = 16):
    """In-memory ``(train, test)`` ImageDatasets."""
    g = torch.Generator().manual_seed(0)
    y_tr = torch.randint(0, NUM_CLASSES, (n_train,), generator=g)
    y_te = torch.randint(0, NUM_CLASSES, (n_test,), generator=g)
    mk = data_mod.ImageDataset
    return (
        mk(_images(y_tr, size, 1), y_tr, NUM_CLASSES, name="tiny-train"),
        mk(_images(y_te, size, 2), y_te, NUM_CLASSES, name="tiny-test"),
    )


def tiny_spec(method: str = "baseline", **kw) -> config.RunSpec:
    base = {
        "experiment": "test",
        "dataset": "cifar10",
        "model": "tiny",
        "method": method,
        "lr": 0.05,
        "alpha": 0.0 if method == "baseline" else 0.01,
        "epochs": 2,
        "milestones": (1,),
        "batch_size": 16,
        "probe_size": 16,
        "eval_batch_size": 64,
        "every": 2,
        "loss_threshold": 10.0,
    }
    base.update(kw)
    return config.RunSpec(**base)


def tiny_bundle(**kw) -> harness.DataBundle:
    return harness.prepare_data(tiny_datasets(), val_size=kw.pop("val_size", 24), **kw)


def _strip_times(records):
    return [{k: v for k, v in r.items() if k not in harness.TIME_KEYS} for r in records]


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


def test_alpha_grid_and_milestones():
    cfg = config.ExperimentConfig(name="x", dataset="cifar10", model="tiny")
    grid = cfg.alpha_values("fp")
    assert len(grid) == 10 and grid[0] == pytest.approx(1e-3) and grid[-1] == pytest.approx(0.1)
    assert cfg.alpha_values("gpx")[-1] == pytest.approx(10 * cfg.gpx_center)
    assert len(cfg.with_overrides(alpha_grid_size=5).alpha_values("gp")) == 5
    assert cfg.alpha_values("baseline") == (0.0,)
    assert config.scale_milestones((150, 225), 300, 300) == [150, 225]
    assert config.scale_milestones((150, 225), 300, 30) == [15, 22]
    assert config.scale_milestones((150, 225), 300, 3) == [2]
    assert config.vgg_milestones(300) == (80, 120, 160, 200, 240, 280)
    assert cfg.threshold == 1.2
    assert config.ExperimentConfig(name="y", dataset="cifar100", model="tiny").threshold == 3.5


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


def _write_image_folder(root: Path, n_train: int = 8, n_test: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((32, 32, 3), 25 * c, np.uint8) + rng.integers(
                    0, 30, (32, 32, 3), dtype=np.uint8
                )
                Image.fromarray(arr).save(d / f"{i}.png")


def test_cli_end_to_end(tmp_path, monkeypatch):
    """A --quick-style run through the command line on a generated image folder."""
    monkeypatch.setenv("FISHER_OPTIM_DATA", str(tmp_path / "cache_root"))
    _write_image_folder(tmp_path / "data")
    cfg = config.ExperimentConfig(name="e2e", dataset="cifar10", model="tiny", epochs=300)
    out = tmp_path / "runs"
    code = cli.main(
        cfg,
        [
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--quick",
            "--val-size",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--probe-size",
            "8",
            "--methods",
            "baseline",
            "fp",
            "--lrs",
            "0.05",
            "--no-progress",
        ],
    )
    assert code == 0
    for name in ("baseline_lr0.05_s0_bs16", "fp_lr0.05_a0.01_s0_bs16_guard4"):
        run = out / name
        logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in logs] == [0, 1, 2]
        assert all(r["trace"] > 0 and r["trace_fb"] is not None for r in logs)
        assert logs[-1]["lr"] == pytest.approx(0.005)  # milestone 150/300 * 2 = epoch 1
        s = json.loads((run / "summary.json").read_text())
        for key in (
            "best_val_acc",
            "test_acc_at_best_val",
            "final_test_acc",
            "max_trace",
            "tr_f_i",
            "sec_per_epoch",
            "images_per_s",
        ):
            assert key in s
        assert s["best_val_acc"] is not None and s["max_trace"] > 0
        assert (run / "checkpoint.pt").is_file()
    fp_logs = (out / "fp_lr0.05_a0.01_s0_bs16_guard4" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(fp_logs[-1])["penalty_value"] is not None
    res = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"baseline", "fp"}
    assert (out / "figure.png").stat().st_size > 1000
    assert (out / "results.md").read_text().startswith("| method")
    # the plots CLI
    assert (
        plots.main(
            [
                str(out / "baseline_lr0.05_s0_bs16"),
                str(out / "fp_lr0.05_a0.01_s0_bs16_guard4"),
                "-o",
                str(tmp_path / "fig.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "fig.png").is_file()
    assert (
        plots.main(
            [str(out / "baseline_lr0.05_s0_bs16"), "--scatter", "-o", str(tmp_path / "sc.png")]
        )
        == 0
    )
    # --resume skips finished runs
    t0 = time.perf_counter()
    assert (
        cli.main(
            cfg,
            [
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(out),
                "--quick",
                "--val-size",
                "16",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--probe-size",
                "8",
                "--methods",
                "baseline",
                "fp",
                "--lrs",
                "0.05",
                "--no-progress",
                "--resume",
                "--no-plot",
            ],
        )
        == 0
    )
    assert time.perf_counter() - t0 < 5


RESUMED = {
    "baseline": {},
    "fp": {},
    "fp_fd": {"method": "fp", "fd_mode": "finite_difference"},
    "gp": {},
    "gpr": {},
    "gpx": {"alpha": 1.0},
    "mixup": {"alpha": 0.5},
    "noise_trace": {"small_batch_size": 4},
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_is_bitwise(tmp_path, name):
    """Straight run == run interrupted after every step (mid-epoch and at epoch ends), for
    every method."""
    fields = {"method": name, **RESUMED[name]}
    spec = tiny_spec(
        fields.pop("method"),
        augment="standard",
        bn_refresh_batches=2,
        trace_every_steps=4,
        **fields,
    )
    data = tiny_bundle()
    straight = harness.train_run(spec, data, tmp_path / "a", log=None)
    pieces, s = 0, {"status": "interrupted"}
    while s["status"] != "complete":
        s = harness.train_run(spec, data, tmp_path / "b", resume=True, deadline=0.0, log=None)
        pieces += 1
        assert pieces < 100
    assert pieces >= 9  # it really was cut into many pieces (5 steps per epoch)
    for f in ("metrics.jsonl", "trace.jsonl"):
        a = [json.loads(x) for x in (tmp_path / "a" / f).read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "b" / f).read_text().splitlines()]
        assert _strip_times(a) == _strip_times(b)
    drop = {"sec_per_epoch", "images_per_s", "train_time", "overhead"}
    assert {k: v for k, v in straight.items() if k not in drop} == {
        k: v for k, v in s.items() if k not in drop
    }
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert ca["epoch"] == cb["epoch"] == 2


@pytest.mark.parametrize("method", ["baseline", "fp"])
def test_extend_lengthens_a_finished_run_to_the_run_it_would_have_been(tmp_path, method):
    """2 constant-LR epochs, then --extend to 4 epochs with ×0.1 at 3 == 4 epochs straight."""
    data = tiny_bundle()
    long = tiny_spec(method, epochs=4, milestones=(3,), trace_every_steps=4)
    short = tiny_spec(method, epochs=2, milestones=(), trace_every_steps=4)
    harness.train_run(long, data, tmp_path / "a", log=None)
    harness.train_run(short, data, tmp_path / "b", log=None)
    with pytest.raises(ValueError, match="--extend"):
        harness.train_run(long, data, tmp_path / "b", resume=True, log=None)
    s = harness.train_run(long, data, tmp_path / "b", extend=True, log=None)
    assert s["status"] == "complete" and s["spec"] == long.to_dict()
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert [r["lr"] for r in ca["logs"][1:]] == [r["lr"] for r in cb["logs"][1:]]
    train_keys = ("train_loss", "train_acc", "lr", "alpha")
    assert [{k: r.get(k) for k in train_keys} for r in ca["logs"]] == [
        {k: r.get(k) for k in train_keys} for r in cb["logs"]
    ]


def test_schedule_change_error_names_what_forbids_extending():
    old = tiny_spec(epochs=4, milestones=(2,)).to_dict()
    err = harness.schedule_change_error
    assert err(old, tiny_spec(epochs=8, milestones=(2, 6)).to_dict(), 4) is None
    assert "milestones [2]" in err(old, tiny_spec(epochs=8, milestones=(3,)).to_dict(), 4)
    assert err(old, tiny_spec(epochs=8, milestones=(3,)).to_dict(), 1) is None
    assert "more than --epochs 3" in err(old, tiny_spec(epochs=3, milestones=(2,)).to_dict(), 4)
    assert "differs in lr" in err(old, tiny_spec(epochs=8, milestones=(2,), lr=0.1).to_dict(), 4)


def test_two_epochs_equal_one_plus_one(tmp_path, monkeypatch):
    """The brief's literal check: 2 epochs straight vs 1 epoch, then resume for the second."""
    spec = tiny_spec("fp")
    data = tiny_bundle()
    harness.train_run(spec, data, tmp_path / "a", log=None)
    calls = {"n": 0}
    steps = -(-len(data.train) // spec.batch_size)

    def fake_clock() -> float:
        calls["n"] += 1
        return 0.0 if calls["n"] < steps else 2.0

    c = tmp_path / "c"
    monkeypatch.setattr(runner, "clock", fake_clock)
    part = harness.train_run(spec, data, c, log=None, deadline=1.0)
    monkeypatch.undo()
    assert part["status"] == "interrupted" and part["epochs_done"] == 1
    ck = torch.load(c / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step_in_epoch"] == 0
    done = harness.train_run(spec, data, c, log=None, resume=True)
    assert done["status"] == "complete"
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (c / "metrics.jsonl").read_text().splitlines()]
    assert _strip_times(a) == _strip_times(b)
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    cc = torch.load(c / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(v, cc["model"][k]) for k, v in ca["model"].items())


def test_test_every_keeps_test_at_best_val_exact(tmp_path):
    """``test_every=0`` evaluates test (and noisy-train) accuracy at the last epoch, and the
    test accuracy once more at the end on the kept best-validation weights; training and
    every measured number are those of the run that evaluates every epoch."""
    data = tiny_bundle(label_noise=0.25)
    every = harness.train_run(
        tiny_spec("fp", epochs=6, milestones=(4,), label_noise=0.25), data, tmp_path / "a", log=None
    )
    spec = tiny_spec("fp", epochs=6, milestones=(4,), label_noise=0.25, test_every=0)
    assert spec.to_dict()["test_every"] == 0 and "test_every" not in tiny_spec().to_dict()
    sparse = harness.train_run(spec, data, tmp_path / "b", log=None)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in a] == [r["val_acc"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        if rb["epoch"] in (0, spec.epochs):
            assert rb["test_acc"] == ra["test_acc"]
            assert rb["train_acc_noisy"] == ra["train_acc_noisy"]
        elif rb["epoch"] == sparse["best_val_epoch"]:
            assert rb["test_acc"] == ra["test_acc"]
        else:
            assert rb["test_acc"] is None and "train_acc_noisy" not in rb
    assert any(r["test_acc"] is None for r in b)  # something was skipped
    for key in (
        "best_val_epoch",
        "test_acc_at_best_val",
        "final_test_acc",
        "final_train_acc_noisy",
        "max_trace",
    ):
        assert sparse[key] == every[key], key
    with pytest.raises(ValueError, match="test_every"):
        tiny_spec(test_every=-1)


def test_val_every_measures_every_nth_epoch_and_the_last(tmp_path):
    data = tiny_bundle()
    every = harness.train_run(
        tiny_spec("fp", epochs=5, milestones=(4,)), data, tmp_path / "a", log=None
    )
    spec = tiny_spec("fp", epochs=5, milestones=(4,), val_every=2)
    sparse = harness.train_run(spec, data, tmp_path / "b", log=None)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["epoch"] for r in b if "val_acc" in r] == [0, 2, 4, 5]
    for rb in b:
        if "val_acc" in rb:
            ra = a[rb["epoch"]]
            assert (rb["val_acc"], rb["trace"]) == (ra["val_acc"], ra["trace"])
    assert sparse["final_test_acc"] == every["final_test_acc"]
    with pytest.raises(ValueError, match="val_every"):
        tiny_spec(val_every=0)


def test_fp_runs_log_every_refresh_and_the_spike_factor(tmp_path):
    spec = tiny_spec("fp", epochs=2, spike_factor=4.0)
    assert spec.name.endswith("guard4") and "guard" not in tiny_spec("fp").name
    assert "spike_factor" not in tiny_spec("fp").to_dict()  # older runs: safeguard off
    summary = harness.train_run(spec, tiny_bundle(), tmp_path / "a", log=None)
    logs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    refreshes = [
        json.loads(x) for x in (tmp_path / "a" / "refreshes.jsonl").read_text().splitlines()
    ]
    assert summary["status"] == "complete"
    assert summary["overhead"] > 0 and all(r["wall_time"] >= r["train_time"] for r in logs[1:])
    assert len(refreshes) == logs[-1]["refreshes"] > 0 and logs[-1]["spikes"] == 0
    assert all(r["value"] > 0 and r["grad_norm"] > 0 and r["scale"] == 1.0 for r in refreshes)
    assert [r["step"] for r in refreshes] == sorted(r["step"] for r in refreshes)


def test_fp_start_epoch_trains_plain_sgd_before_it(tmp_path):
    """``fp_start_epoch=2`` (``--fp-start-epochs 2``): epoch 1 is the baseline's epoch 1
    bit for bit, and FP acts from epoch 2 on."""
    data = tiny_bundle()
    keys = ("train_loss", "train_acc", "val_acc", "val_loss", "trace")
    logs = {}
    for name, spec in {
        "sgd": tiny_spec(),
        "late": tiny_spec("fp", alpha=1.0, fp_start_epoch=2),
        "fp": tiny_spec("fp", alpha=1.0),
    }.items():
        harness.train_run(spec, data, tmp_path / name, log=None)
        logs[name] = [
            {k: r[k] for k in keys}
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        ]
    assert logs["late"][:2] == logs["sgd"][:2]  # initialisation and epoch 1
    assert logs["fp"][1] != logs["sgd"][1]  # FP from epoch 1 does change epoch 1
    assert logs["late"][2] != logs["sgd"][2]


def test_divergence_stops_the_run(tmp_path):
    """A non-finite training loss ends the run at once with status "diverged", and a grid
    keeps going with the next run."""
    data = tiny_bundle()
    specs = [tiny_spec(lr=1e30, epochs=4), tiny_spec(lr=0.05, epochs=1)]
    lines: list[str] = []
    bad, good = harness.run_many(specs, data, tmp_path, log=lines.append)
    assert bad["status"] == "diverged" and bad["epochs_done"] == 1
    assert any("diverged" in line for line in lines)
    logs = [
        json.loads(x) for x in (tmp_path / specs[0].name / "metrics.jsonl").read_text().splitlines()
    ]
    assert logs[-1]["epoch"] == 1 and logs[-1]["diverged_at_step"] < 5
    assert good["status"] == "complete"
    rows = cli.aggregate(specs, {s["name"]: s for s in (bad, good)})
    assert len(rows) == 2  # a diverged run is a finished table cell
    again = harness.train_run(specs[0], data, tmp_path / specs[0].name, resume=True, log=None)
    assert again["status"] == "diverged"  # --resume does not retrain it


def test_label_noise_run(tmp_path):
    data = tiny_bundle(label_noise=0.5)
    assert data.noisy is not None and 0 < int(data.noisy.sum()) < len(data.train)
    assert torch.equal(data.noisy, data.train.labels != data.clean_labels)
    spec = tiny_spec("fp", label_noise=0.5, epochs=1, track_groups=True, group_probe_size=40)
    s = harness.train_run(spec, data, tmp_path, log=None)
    saved = torch.load(tmp_path / "noise.pt")
    assert torch.equal(saved["noisy"], data.noisy)
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "train_acc_clean",
        "train_acc_noisy",
        "grad_norm_clean",
        "grad_norm_noisy",
        "mean_grad_norm_clean",
        "mean_grad_norm_noisy",
        "grad_cosine_clean_noisy",
    ):
        assert logs[-1][key] is not None, key
    assert logs[-1]["noisy_count"] == int(data.noisy.sum())
    assert s["final_train_acc_noisy"] == logs[-1]["train_acc_noisy"]
    assert s["final_train_acc_clean"] == logs[-1]["train_acc_clean"]


# --------------------------------------------------------------------------------------
# α selection
# --------------------------------------------------------------------------------------


def test_alpha_grid_selects_on_validation(tmp_path, monkeypatch):
    """Validation accuracy peaks at α=0.01, test accuracy at α=0.1: α=0.01 must win."""
    cfg = config.ExperimentConfig(
        name="sel",
        dataset="cifar10",
        model="tiny",
        epochs=2,
        alpha_grids={"fp": (0.001, 0.01, 0.1)},
    )
    val = {0.001: 50.0, 0.01: 70.0, 0.1: 60.0}
    test = {0.001: 40.0, 0.01: 55.0, 0.1: 90.0}
    seen = []

    def fake_train_run(spec, data, out_dir, **kw):
        seen.append(spec)
        return {
            "name": spec.name,
            "spec": spec.to_dict(),
            "status": "complete",
            "best_val_acc": val[spec.alpha] + spec.seed,
            "test_acc_at_best_val": test[spec.alpha],
            "final_test_acc": test[spec.alpha],
        }

    monkeypatch.setattr(harness, "train_run", fake_train_run)
    bundle = tiny_bundle()
    monkeypatch.setattr(harness, "prepare_data", lambda *a, **k: bundle)
    out = tmp_path / "runs"
    assert (
        cli.main(
            cfg,
            [
                "--alpha-grid",
                "--methods",
                "fp",
                "--lrs",
                "0.1",
                "--seeds",
                "0",
                "1",
                "--out",
                str(out),
                "--no-plot",
                "--device",
                "cpu",
            ],
        )
        == 0
    )
    assert sorted({s.alpha for s in seen}) == [0.001, 0.01, 0.1] and len(seen) == 6
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["alpha"] == 0.01
    assert row["test_acc_at_best_val"] == 55.0
    assert row["best_val_acc"] == pytest.approx(70.5)
    # without validation the selection refuses rather than using test accuracy
    with pytest.raises(ValueError, match="validation"):
        harness.select_best(
            [
                {
                    "name": "a",
                    "spec": {"alpha": 1.0},
                    "best_val_acc": None,
                    "test_acc_at_best_val": 99.0,
                }
            ]
        )
    with pytest.raises(SystemExit):
        cli.main(cfg, ["--alpha-grid", "--val-size", "0", "--out", str(out)])


def test_summary_model_selection():
    spec = tiny_spec("baseline", loss_threshold=1.0)
    logs = [
        {"epoch": 0, "val_acc": 10.0, "test_acc": 10.0, "trace": 500.0, "train_loss": None},
        {"epoch": 1, "val_acc": 50.0, "test_acc": 40.0, "trace": 5.0, "train_loss": 1.5},
        {"epoch": 2, "val_acc": 60.0, "test_acc": 45.0, "trace": 9.0, "train_loss": 0.9},
        {"epoch": 3, "val_acc": 55.0, "test_acc": 70.0, "trace": 7.0, "train_loss": 0.5},
    ]
    s = harness.summarize(spec, logs, [])
    assert s["best_val_epoch"] == 2 and s["test_acc_at_best_val"] == 45.0
    assert s["final_test_acc"] == 70.0
    assert s["max_trace"] == 9.0  # epoch 0 (initialisation) excluded
    assert s["tr_f_i"] == 9.0 and s["tr_f_i_epoch"] == 2


# --------------------------------------------------------------------------------------
# scripts
# --------------------------------------------------------------------------------------


def test_scripts_help():
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        for name in SCRIPTS
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (name, err)
        assert "--quick" in out and "--alpha-grid" in out and "--resume" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_configs(name):
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.CONFIG
    assert cfg.name == name
    parser = cli.build_parser(cfg)
    for argv in ([], ["--quick"], ["--alpha-grid", "--val-size", "100"], ["--augment"]):
        args = parser.parse_args(argv)
        cli._apply_quick(args, parser)
        specs = cli.make_specs(cfg, args)
        assert specs and len({s.name for s in specs}) == len(specs)
        for s in specs:
            assert s.dataset == cfg.dataset and s.model == cfg.model
    default = cli.make_specs(cfg, parser.parse_args([]))
    assert all(s.epochs == cfg.epochs for s in default)
    if name == "tinyimagenet_wresnet":
        assert sorted({s.lr for s in default}) == pytest.approx(
            [cfg.lr_star / 30, cfg.lr_star], rel=1e-5
        )
    if name == "noisy_labels":
        assert {s.method for s in default} == {"baseline", "mixup", "gpx", "fp", "gpr"}
        assert all(s.label_noise == 0.25 and s.weight_decay == 0 for s in default)
    if name == "large_batch":
        assert all(s.batch_size == 1280 for s in default)
        assert all(s.penalty_batch_size == 128 and s.every == 1 for s in default)


def test_explicit_alpha_grid_is_searched_for_penalties_only():
    cfg = config.ExperimentConfig(name="x", dataset="cifar10", model="tiny")
    parser = cli.build_parser(cfg)
    args = parser.parse_args(
        ["--methods", "baseline", "fp", "--lrs", "0.01", "--alpha-grid", "--alphas", "0.01", "0.1"]
    )
    specs = cli.make_specs(cfg, args)
    assert sorted((s.method, s.alpha) for s in specs) == [
        ("baseline", 0.0),
        ("fp", 0.01),
        ("fp", 0.1),
    ]


def test_spike_factor_and_val_every_reach_the_specs():
    cfg = config.ExperimentConfig(name="x", dataset="cifar10", model="tiny")
    parser = cli.build_parser(cfg)

    def specs(*argv):
        return {
            s.method: s
            for s in cli.make_specs(
                cfg, parser.parse_args(["--methods", "baseline", "fp", "--lrs", "0.01", *argv])
            )
        }

    default = specs()
    assert default["fp"].spike_factor == 4.0 and default["fp"].name.endswith("guard4")
    assert "guard" not in default["baseline"].name
    off = specs("--spike-factor", "none", "--val-every", "3", "--milestones")
    assert off["fp"].spike_factor is None and "guard" not in off["fp"].name
    assert off["fp"].val_every == 3 and off["fp"].milestones == ()  # bare flag: constant LR
    for bad in ("1", "0.5", "nan", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--spike-factor", bad])
    early = specs("--guard-early")
    assert early["fp"].guard_early and early["fp"].name.endswith("guard4e")
    assert "guard_early" not in default["fp"].to_dict()  # older runs: off
    with pytest.raises(ValueError, match="guard-early"):
        specs("--guard-early", "--spike-factor", "none")


def test_explicit_milestones_replace_the_scaled_schedule():
    cfg = config.ExperimentConfig(
        name="x", dataset="cifar10", model="tiny", epochs=300, milestones=(80, 120, 160)
    )
    parser = cli.build_parser(cfg)
    (scaled,) = cli.make_specs(
        cfg, parser.parse_args(["--epochs", "30", "--lrs", "0.1", "--methods", "baseline"])
    )
    assert scaled.milestones == (8, 12, 16)
    (given,) = cli.make_specs(
        cfg,
        parser.parse_args(
            ["--epochs", "30", "--lrs", "0.1", "--methods", "baseline", "--milestones", "20", "15"]
        ),
    )
    assert given.milestones == (15, 20)
    with pytest.raises(ValueError, match="--milestones"):
        cli.make_specs(cfg, parser.parse_args(["--epochs", "30", "--milestones", "30"]))


def test_dataset_switch_takes_the_data_sets_loss_threshold():
    cfg = config.ExperimentConfig(name="x", dataset="cifar100", model="tiny")
    parser = cli.build_parser(cfg)
    args = parser.parse_args(["--dataset", "cifar10"])
    switched = cli.apply_dataset(cfg, args)
    assert switched.dataset == "cifar10" and args.loss_threshold == 1.2
    assert all(s.dataset == "cifar10" for s in cli.make_specs(switched, args))
    args = parser.parse_args(["--dataset", "cifar10", "--loss-threshold", "2.0"])
    cli.apply_dataset(cfg, args)
    assert args.loss_threshold == 2.0


def test_init_option_reaches_the_model(tmp_path):
    cfg = config.ExperimentConfig(name="x", dataset="cifar10", model="tiny")
    parser = cli.build_parser(cfg)
    (spec,) = cli.make_specs(
        cfg, parser.parse_args(["--lrs", "0.1", "--methods", "baseline", "--init", "glorot"])
    )
    assert spec.init == "glorot" and spec.name.endswith("_init-glorot")
    assert spec.to_dict()["init"] == "glorot" and "init" not in tiny_spec().to_dict()
    with pytest.raises(ValueError, match="init"):
        tiny_spec(init="xavier")
    data = tiny_bundle()
    traces = {}
    for init in ("kaiming", "glorot"):
        harness.train_run(tiny_spec(epochs=1, init=init), data, tmp_path / init, log=None)
        first = json.loads((tmp_path / init / "metrics.jsonl").read_text().splitlines()[0])
        traces[init] = first["trace"]  # Tr(F) at initialisation
    assert traces["kaiming"] != traces["glorot"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("fp", {"alpha": 0.01}), ("fp", {"alpha": 0.01, "fd_mode": "exact"}), ("noise_diag", {})],
)
def test_compile_trains_the_optimizers_through_the_compiled_module(method, extra, tmp_path):
    """``--compile``: the optimizer is built on the module the step calls (the compiled one),
    so it sees the training forwards; the run trains as the eager one does."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    train = data_mod.ImageDataset(images, torch.randint(10, (64,), generator=g), 10, name="s")
    data = harness.DataBundle(train, None, train)
    spec = config.RunSpec(
        experiment="x", dataset="cifar10", model="tiny", method=method, lr=0.01,
        batch_size=16, probe_size=8, small_batch_size=4, **extra,
    )  # fmt: skip
    weights = []
    for compile in (False, True):
        torch._dynamo.reset()
        run = harness._Run(spec, data, tmp_path, torch.device("cpu"), compile=compile)
        for _ in range(3):
            run._step(torch.arange(16))
        weights.append(torch.cat([p.detach().flatten() for p in run.model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)

"""Tests of the large-batch noise benchmark (Wen et al., 2020): benchmarks/large_batch_noise.py
and the harness additions (FisherNoiseSGD methods, Ghost BatchNorm, per-update curves)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.test_bench_harness import (  # noqa: E402
    _strip_times,
    _write_image_folder,
    tiny_bundle,
    tiny_spec,
)

harness = importlib.import_module("benchmarks.common.harness")
cli = importlib.import_module("benchmarks.common.cli")
config = importlib.import_module("benchmarks.common.config")

from fisher_optim import FisherNoiseSGD  # noqa: E402
from fisher_optim.ghost_batchnorm import GhostBatchNorm  # noqa: E402


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "_bench_large_batch_noise", ROOT / "benchmarks" / "large_batch_noise.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def noise_spec(method: str = "noise_diag", **kw) -> config.RunSpec:
    base = {
        "batch_size": 36,
        "small_batch_size": 8,
        "ghost_batch_size": 12,
        "log_every_update": True,
        "alpha": 0.0,
        "epochs": 2,
    }
    base.update(kw)
    return tiny_spec(method, **base)


def test_spec_fields_are_backward_compatible():
    old = tiny_spec("fp")
    d = old.to_dict()
    for key in (
        "small_batch_size",
        "noise_fisher",
        "noise_every",
        "ghost_batch_size",
        "log_every_update",
    ):
        assert key not in d  # config.json / checkpoints of other runs are unchanged
    assert old.name == "fp_lr0.05_a0.01_s0_bs16" and old.noise_covariance is None
    assert not old.ghost
    new = noise_spec(noise_fisher="true", noise_every=3)
    assert new.name == "noise_diag_lr0.05_s0_bs36_ms8_Ftrue_ev3_gbn12"
    assert config.RunSpec.from_dict(new.to_dict()) == new
    assert new.ghost and new.noise_covariance == "diagonal"
    with pytest.raises(ValueError, match="noise_fisher"):
        noise_spec(noise_fisher="exact")


@pytest.mark.parametrize(
    "method,cov", [("noise_diag", "diagonal"), ("noise_trace", "trace"), ("noise_full", "full")]
)
def test_noise_run(tmp_path, method, cov):
    data = tiny_bundle()
    spec = noise_spec(method, epochs=1 if method == "noise_full" else 2)
    run = harness._Run(spec, data, tmp_path / "r", torch.device("cpu"))
    assert isinstance(run.opt, FisherNoiseSGD) and run.opt.covariance == cov
    assert run.opt.fisher == "empirical"
    assert any(isinstance(m, GhostBatchNorm) for m in run.model.modules())
    s = harness.train_run(spec, data, tmp_path / "r", log=None)
    assert s["status"] == "complete"
    logs = _jsonl(tmp_path / "r" / "metrics.jsonl")
    assert logs[0]["noise_norm"] is None
    for r in logs[1:]:
        assert r["noise_norm"] > 0 and r["noise_norm_mean"] > 0 and r["fisher_trace"] > 0
    steps = -(-len(data.train) // spec.batch_size)
    curve = _jsonl(tmp_path / "r" / "train_curve.jsonl")
    assert [c["step"] for c in curve] == list(range(1, spec.epochs * steps + 1))
    assert curve[-1]["epoch"] == pytest.approx(spec.epochs)
    assert all(0 <= c["train_err"] <= 100 and c["noise_norm"] > 0 for c in curve)


def test_small_batch_run_uses_plain_bn_and_sgd(tmp_path):
    data = tiny_bundle()
    spec = noise_spec("baseline", batch_size=12, epochs=1)  # batch == ghost batch: plain BN
    run = harness._Run(spec, data, tmp_path, torch.device("cpu"))
    assert type(run.opt) is torch.optim.SGD
    assert not any(isinstance(m, GhostBatchNorm) for m in run.model.modules())
    harness.train_run(spec, data, tmp_path, log=None)
    curve = _jsonl(tmp_path / "train_curve.jsonl")
    assert len(curve) == 6 and "noise_norm" not in curve[0]
    assert "noise_norm" not in _jsonl(tmp_path / "metrics.jsonl")[-1]


def test_noise_run_drops_a_final_batch_not_larger_than_ms(tmp_path):
    data = tiny_bundle()  # 72 training examples: 2 x 32 + 8
    spec = noise_spec("noise_trace", batch_size=32, epochs=1)
    harness.train_run(spec, data, tmp_path, log=None)
    assert len(_jsonl(tmp_path / "train_curve.jsonl")) == 2


def test_noise_resume_is_bitwise(tmp_path):
    spec = noise_spec("noise_diag", noise_every=2)
    data = tiny_bundle()
    straight = harness.train_run(spec, data, tmp_path / "a", log=None)
    s, pieces = {"status": "interrupted"}, 0
    while s["status"] != "complete":
        s = harness.train_run(spec, data, tmp_path / "b", resume=True, deadline=0.0, log=None)
        pieces += 1
        assert pieces < 20
    assert pieces >= 3
    for f in ("metrics.jsonl", "train_curve.jsonl"):
        assert _strip_times(_jsonl(tmp_path / "a" / f)) == _strip_times(_jsonl(tmp_path / "b" / f))
    assert straight["best_val_acc"] == s["best_val_acc"]


def test_script_config_and_cli_options():
    cfg = _load_script()
    assert cfg.name == "large_batch_noise" and cfg.model == "resnet44"
    parser = cli.build_parser(cfg)
    default = cli.make_specs(cfg, parser.parse_args([]))
    assert [(s.method, s.batch_size) for s in default] == [
        ("baseline", 128),
        ("baseline", 4096),
        ("noise_trace", 4096),
        ("noise_diag", 4096),
    ]
    assert {s.epochs for s in default} == {164}
    assert default[0].lr == pytest.approx(0.1) and not default[0].ghost
    for s in default[1:]:
        assert s.lr == pytest.approx(0.1 * (4096 / 128) ** 0.5, rel=1e-5)
        assert s.ghost and s.ghost_batch_size == 128 and s.small_batch_size == 128
        assert s.noise_fisher == "empirical" and s.noise_every == 1 and s.log_every_update
    args = parser.parse_args(
        [
            "--batch-sizes",
            "128",
            "1024",
            "--lr-scaling",
            "linear",
            "--lr-cap",
            "0.5",
            "--methods",
            "baseline",
            "noise_full",
            "--fisher",
            "true",
            "--noise-every",
            "5",
            "--model",
            "vgg16_bn",
            "--no-log-every-update",
        ]
    )
    specs = cli.make_specs(cfg, args)
    assert [(s.method, s.batch_size, s.lr) for s in specs] == [
        ("baseline", 128, 0.1),
        ("baseline", 1024, 0.5),
        ("noise_full", 1024, 0.5),
    ]
    assert all(s.model == "vgg16_bn" and not s.log_every_update for s in specs)
    assert specs[-1].noise_fisher == "true"
    args = parser.parse_args(["--batch-lrs", "0.05", "0.4"])
    assert [s.lr for s in cli.make_specs(cfg, args)] == [0.05, 0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="batch-lrs"):
        cli.make_specs(cfg, parser.parse_args(["--batch-lrs", "0.05"]))
    for argv in (["--quick"], ["--augment"], ["--alpha-grid", "--val-size", "100"]):
        args = parser.parse_args(argv)
        cli._apply_quick(args, parser)
        specs = cli.make_specs(cfg, args)
        assert len({s.name for s in specs}) == len(specs) == 4


def test_cli_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FISHER_OPTIM_DATA", str(tmp_path / "cache_root"))
    _write_image_folder(tmp_path / "data")
    cfg = _load_script().with_overrides(model="tiny")
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
            "--batch-sizes",
            "16",
            "64",
            "--small-batch-size",
            "16",
            "--ghost-batch-size",
            "16",
            "--probe-size",
            "8",
            "--no-progress",
            "--no-plot",
            "--threads",
            "1",
        ],
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [
        ("baseline", 16),
        ("baseline", 64),
        ("noise_trace", 64),
        ("noise_diag", 64),
    ]
    assert all(r["final_train_err"] is not None for r in rows)
    assert "train err" in (out / "results.md").read_text()
    for r in rows:
        run = out / r["runs"][0]
        assert (run / "train_curve.jsonl").is_file()
        cfg_json = json.loads((run / "config.json").read_text())
        assert cfg_json["ghost_batch_size"] == 16 and cfg_json["small_batch_size"] == 16

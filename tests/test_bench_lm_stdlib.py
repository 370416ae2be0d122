"""benchmarks/lm_stdlib.py on a tiny setting: both methods from the same initialisation and
data order, the logged numbers, the figure, --time-limit/--resume bitwise, bad options."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
runner = importlib.import_module("benchmarks.common.runner")
TINY = [
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--batch-size",
    "4",
    "--context",
    "16",
    "--dim",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--max-bytes",
    "20000",
    "--val-windows",
    "8",
    "--probe-size",
    "4",
    "--alphas",
    "0.5",
    "--every",
    "2",
    "--threads",
    "1",
]
TIME_KEYS = ("train_time",)


@pytest.fixture(scope="module")
def lm_stdlib():
    spec = importlib.util.spec_from_file_location("lm_stdlib", ROOT / "benchmarks" / "lm_stdlib.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_stdlib"] = module
    spec.loader.exec_module(module)
    return module


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def test_tiny_run_same_start_and_data_order(lm_stdlib, tmp_path: Path) -> None:
    out = tmp_path / "lm"
    assert lm_stdlib.main([*TINY, "--eval-every", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [lm_stdlib.run_name(r["config"]) for r in results["runs"]]
    assert names == ["baseline_s0", "fp_a0.5_s0"]
    assert results["corpus"]["val_files"] >= 1 and results["corpus"]["train_bytes"] == 20000
    base, fp = _metrics(out / names[0]), _metrics(out / names[1])
    assert [r["step"] for r in base] == [r["step"] for r in fp] == [0, 1, 2, 3, 4]
    for row in base + fp:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-12)
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-12)
        assert row["trace"] > 0
    # same initialisation, same first batch: identical until the penalty changes the weights
    assert base[0]["val_loss"] == fp[0]["val_loss"] and base[0]["trace"] == fp[0]["trace"]
    assert base[1]["train_loss"] == fp[1]["train_loss"]  # step 1's batch, before any update
    assert base[2]["val_loss"] != fp[2]["val_loss"]
    assert [r["refreshes"] for r in fp] == [0, 1, 1, 2, 2] and "refreshes" not in base[0]
    assert fp[-1]["penalty_value"] > 0
    assert (out / "figure.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| baseline_s0 |" in table and "| fp_a0.5_s0 |" in table


def test_time_limit_and_resume_are_bitwise(
    lm_stdlib, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*TINY, "--methods", "fp", "--no-plot"]
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "whole")]) == 0
    ticks = iter(range(10**6))
    monkeypatch.setattr(runner, "clock", lambda: 20.0 * next(ticks))  # 1/3 minute a call
    split = str(tmp_path / "split")
    assert lm_stdlib.main([*args, "--out", split, "--time-limit", "1"]) == 3
    assert (tmp_path / "split" / "fp_a0.5_s0" / "checkpoint.pt").is_file()
    monkeypatch.undo()
    assert lm_stdlib.main([*args, "--out", split, "--resume"]) == 0
    whole, resumed = tmp_path / "whole" / "fp_a0.5_s0", tmp_path / "split" / "fp_a0.5_s0"
    assert _metrics(resumed) == _metrics(whole)
    assert not (resumed / "checkpoint.pt").exists()
    assert lm_stdlib.main([*args, "--out", split, "--resume"]) == 0  # finished: skipped


def _summaries(root: Path) -> dict[str, dict]:
    """Every run's summary, less its timings."""
    out = {}
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        del summary["train_seconds"], summary["final"]["train_time"]
        out[path.parent.name] = summary
    return out


def test_amp_and_compile_train_and_resume_bitwise(
    lm_stdlib, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--amp bf16 is part of the run (its config and folder name); --compile trains
    through torch.compile (here the identity: compiling takes a minute on a CPU) and the
    penalty and measurements through the eager model; a run cut by --time-limit resumes
    bitwise."""
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    args = [*TINY, "--methods", "fp", "--no-plot", "--amp", "bf16", "--compile"]
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert [type(m).__name__ for m in compiled] == ["ByteTransformerLM"]
    whole = _summaries(tmp_path / "whole")
    assert list(whole) == ["fp_a0.5_s0_amp-bf16"]
    assert whole["fp_a0.5_s0_amp-bf16"]["config"]["amp"] == "bf16"
    assert math.isfinite(whole["fp_a0.5_s0_amp-bf16"]["best_val_loss"])
    float32 = tmp_path / "float32"
    assert lm_stdlib.main([*TINY, "--methods", "fp", "--no-plot", "--out", str(float32)]) == 0
    assert (
        _summaries(float32)["fp_a0.5_s0"]["final"]["val_loss"]
        != (whole["fp_a0.5_s0_amp-bf16"]["final"]["val_loss"])
    )
    ticks = iter(range(10**6))
    monkeypatch.setattr(runner, "clock", lambda: 20.0 * next(ticks))
    split = str(tmp_path / "split")
    assert lm_stdlib.main([*args, "--out", split, "--time-limit", "1"]) == 3
    monkeypatch.setattr(runner, "clock", lambda: 0.0)
    assert lm_stdlib.main([*args, "--out", split, "--resume"]) == 0
    assert _summaries(tmp_path / "split") == whole


def test_pack_two_gives_the_runs_of_pack_one(lm_stdlib, tmp_path: Path) -> None:
    """--pack 2: the two runs train in two processes, with the numbers of --pack 1."""
    args = [*TINY, "--no-plot"]
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "two"), "--pack", "2"]) == 0
    one, two = _summaries(tmp_path / "one"), _summaries(tmp_path / "two")
    assert list(one) == ["baseline_s0", "fp_a0.5_s0"] and two == one
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [lm_stdlib.run_name(r["config"]) for r in results["runs"]] == list(one)


@pytest.mark.parametrize(
    "bad",
    [
        ["--steps", "0"],
        ["--heads", "3"],
        ["--val-every-file", "1"],
        ["--alphas", "-1"],
        ["--optimizer", "lion"],
    ],
)
def test_bad_options_are_argparse_errors(
    lm_stdlib, bad: list[str], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as err:
        lm_stdlib.main([*TINY, *bad])
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("amp", [[], ["--amp", "bf16"]], ids=["float32", "bf16"])
def test_ordinary_training_steps_read_nothing_back(
    lm_stdlib, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amp: list[str]
) -> None:
    """Between two deadline checks (one per step) a step reads the device only at the log
    points (every 2nd step here), with and without --amp bf16. (With SGD: AdamW reads its
    step counters, which it keeps on the host, so they are no device read on a GPU, but the
    counter sees them on the CPU.)"""
    from benchmarks.common.syncs import SyncCounter

    counter, marks = SyncCounter(), []
    monkeypatch.setattr(runner, "past", lambda deadline: marks.append(counter.count) or False)
    argv = [*TINY, "--methods", "baseline", "--optimizer", "sgd", "--no-plot", "--out",
            str(tmp_path), *amp]  # fmt: skip
    with counter:
        assert lm_stdlib.main(argv) == 0
    reads = [b - a for a, b in zip(marks, marks[1:])]
    assert len(reads) == 3 and reads[0] == reads[2] == 0 and reads[1] > 0, reads


@pytest.mark.slow
def test_compile_trains_the_eager_runs_numbers(lm_stdlib, tmp_path: Path) -> None:
    """With the real torch.compile (a minute on a CPU): the fp run's numbers are the eager
    run's, up to the compiled kernels' rounding."""
    args = [*TINY, "--methods", "fp", "--no-plot"]
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert lm_stdlib.main([*args, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = (_metrics(tmp_path / d / "fp_a0.5_s0") for d in ("eager", "compiled"))
    for a, b in zip(eager, compiled, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["trace"] == pytest.approx(a["trace"], rel=1e-3)

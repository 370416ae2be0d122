"""Host reads of the benchmark training loop (benchmarks/common/harness.py), counted by
``benchmarks.common.syncs.SyncCounter`` (on CUDA also by the runtime's sync debug mode).

The budget, for every method: an ordinary training step reads nothing back from the device
(the loss, the hits and the noise norm are summed there); the only reads inside a step are
the optimizer's own (a penalty refresh, a noise estimate: ``tests/test_host_syncs.py``), and
a step that refreshes nothing reads nothing at all. Between epochs, at the log point, the
same number of reads every epoch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common.syncs import SyncCounter  # noqa: E402

from .test_bench_harness import tiny_bundle, tiny_spec  # noqa: E402

harness = importlib.import_module("benchmarks.common.harness")

#: (method, spec fields): every training method of the harness, refreshing every 3 steps
METHODS = {
    "baseline": {},
    "fp_exact": {"method": "fp", "fd_mode": "exact"},
    "fp_finite_difference": {"method": "fp", "fd_mode": "finite_difference"},
    "gp": {"method": "gp"},
    "gpr": {"method": "gpr"},
    "gpx": {"method": "gpx", "alpha": 1.0},
    "mixup": {"method": "mixup", "alpha": 0.5},
    "noise_trace": {"method": "noise_trace", "small_batch_size": 4, "noise_every": 3},
    "noise_diag": {"method": "noise_diag", "small_batch_size": 4, "noise_every": 3},
    "noise_full": {"method": "noise_full", "small_batch_size": 4},
}
EPOCHS = 3
# the counter wraps each step's optimizer step, which the LR scheduler notices
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")


def _count(monkeypatch, tmp_path: Path, fields: dict, **kw) -> tuple[list, list, list]:
    """Per training step: (reads in the step, reads in its optimizer step); and the reads
    between the last step of an epoch and the first of the next (the log points)."""
    spec = tiny_spec(**{"every": 3, "epochs": EPOCHS, "milestones": (), **fields, **kw})
    steps: list[tuple[int, int]] = []
    between: list[int] = []
    counter = SyncCounter()
    real_step = harness._Run._step
    last_end = [None]

    def step(run, idx):
        if last_end[0] is not None and run.step_in_epoch == 0:
            between.append(counter.count - last_end[0])
        inner = [0]
        opt_step = run.opt.step

        def counted_opt_step(*a, **k):
            before = counter.count
            try:
                return opt_step(*a, **k)
            finally:
                inner[0] += counter.count - before

        run.opt.step = counted_opt_step
        before = counter.count
        try:
            real_step(run, idx)
        finally:
            del run.opt.step
        steps.append((max(counter.count - before, 0), inner[0]))
        last_end[0] = counter.count

    monkeypatch.setattr(harness._Run, "_step", step)
    with counter:
        harness.train_run(spec, tiny_bundle(), tmp_path / "run", log=None, progress=False)
    return steps, between, spec


@pytest.mark.parametrize("name", list(METHODS))
def test_an_ordinary_step_reads_nothing_back(monkeypatch, tmp_path, name) -> None:
    steps, between, spec = _count(monkeypatch, tmp_path, METHODS[name])
    per_epoch = len(steps) // EPOCHS
    assert len(steps) == EPOCHS * per_epoch >= 3 * EPOCHS
    # the loop's own reads in a step: none, whatever the optimizer reads
    assert [total - inner for total, inner in steps] == [0] * len(steps), name
    if name in ("baseline", "mixup"):
        assert [total for total, _ in steps] == [0] * len(steps)
    elif name != "noise_full":  # refreshes every 3 steps; the steps between read nothing
        ordinary = [total for i, (total, _) in enumerate(steps) if i % 3 != 0]
        assert ordinary == [0] * len(ordinary), name
    # the log points: the same reads at every epoch's end
    assert len(between) == EPOCHS - 1 and len(set(between)) == 1 and between[0] > 0


def test_log_every_update_reads_the_epoch_once(monkeypatch, tmp_path) -> None:
    """Per-update records (Wen et al.'s Fig. 3) are read at the epoch's end, not per step."""
    steps, _, _ = _count(monkeypatch, tmp_path, METHODS["noise_trace"], log_every_update=True)
    assert [total - inner for total, inner in steps] == [0] * len(steps)
    curve = harness.runner.read_jsonl(tmp_path / "run" / harness.TRAIN_CURVE)
    assert len(curve) == len(steps)
    assert all(r["noise_norm"] is not None and r["noise_norm"] > 0 for r in curve)


def test_bf16_autocast_steps_read_nothing_back(monkeypatch, tmp_path) -> None:
    steps, _, _ = _count(monkeypatch, tmp_path, METHODS["fp_exact"], amp="bf16")
    ordinary = [total for i, (total, _) in enumerate(steps) if i % 3 != 0]
    assert ordinary == [0] * len(ordinary)


def test_the_epoch_statistics_are_those_of_the_steps(tmp_path) -> None:
    """The loss and accuracy summed on the device equal a host sum over the same steps."""
    spec = tiny_spec(epochs=1, milestones=())
    seen: list[tuple[float, int, int]] = []
    real = harness._Run._step

    def step(run, idx):
        before = run.acc.clone()
        real(run, idx)
        seen.append(((run.acc - before)[0].item(), int((run.acc - before)[1].item()), len(idx)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness._Run, "_step", step)
        harness.train_run(spec, tiny_bundle(), tmp_path / "run", log=None)
    rec = harness.runner.read_jsonl(tmp_path / "run" / harness.METRICS)[-1]
    n = sum(b for _, _, b in seen)
    assert rec["train_loss"] == pytest.approx(sum(v for v, _, _ in seen) / n, rel=1e-12)
    assert rec["train_acc"] == pytest.approx(100.0 * sum(h for _, h, _ in seen) / n)
    assert torch.isfinite(torch.tensor(rec["train_loss"]))

"""benchmarks/common/runner.py: one run's folder and life cycle (skip-if-finished, resume,
time limit, divergence, atomic writes) on a toy counting run."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
runner = importlib.import_module("benchmarks.common.runner")


class Count:
    """Adds 1 per step to a total until ``steps``; the loss of step ``nan_at`` is NaN."""

    def __init__(self, steps: int, nan_at: int | None = None) -> None:
        self.steps, self.nan_at, self.step, self.seen = steps, nan_at, 0, []

    def state_dict(self):
        return {"step": self.step, "seen": list(self.seen)}

    def load_state_dict(self, st):
        self.step, self.seen = st["step"], st["seen"]

    def resume_error(self, saved):
        return "another count"

    def position(self):
        return {"step": self.step}

    def train(self, deadline, checkpoint):
        while self.step < self.steps:
            if runner.past(deadline):
                return runner.INTERRUPTED
            self.step += 1
            if runner.diverged(math.nan if self.step == self.nan_at else 1.0):
                return runner.DIVERGED
            self.seen.append(self.step)
            checkpoint()
        return runner.COMPLETE

    def summary(self, status):
        return {"status": status, "config": {"steps": self.steps}, "seen": self.seen}


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    runner.write_json(tmp_path / "a.json", {"x": [1, 2]})
    runner.write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, {"y": None}])
    assert runner.read_jsonl(tmp_path / "b.jsonl") == [{"x": 1}, {"y": None}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.jsonl"]


def test_deadline(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runner, "clock", lambda: now[0])
    assert runner.deadline_after(None) is None and not runner.past(None)
    deadline = runner.deadline_after(0.5)
    assert deadline == 130.0 and not runner.past(deadline)
    now[0] = 130.5
    assert runner.past(deadline)


def test_interrupt_resume_skip_and_restart(tmp_path, monkeypatch):
    folder = runner.RunFolder(tmp_path / "r", {"steps": 5})
    ticks = iter(range(10**6))
    monkeypatch.setattr(runner, "clock", lambda: 10.0 * next(ticks))  # past 25 at step 3
    out = runner.execute(folder, lambda: Count(5), deadline=25.0, log=None)
    monkeypatch.undo()
    assert out == {"name": "r", "config": {"steps": 5}, "status": "interrupted", "step": 3}
    assert runner.load_summary(folder.path) is None
    assert folder.checkpoint_path.is_file() and (folder.path / "config.json").is_file()
    done = runner.execute(folder, lambda: Count(5), resume=True, log=None)
    assert done["status"] == "complete" and done["seen"] == [1, 2, 3, 4, 5]
    built = []
    again = runner.execute(folder, lambda: built.append(1) or Count(5), resume=True, log=None)
    assert again == done and not built  # finished: skipped, nothing built
    fresh = runner.execute(folder, lambda: Count(5, nan_at=3), keep_checkpoint=False, log=None)
    assert fresh["status"] == "diverged" and fresh["seen"] == [1, 2]
    assert not folder.checkpoint_path.exists()
    assert runner.DIVERGED in runner.FINISHED and runner.INTERRUPTED not in runner.FINISHED


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    runner.RunFolder(tmp_path, {"steps": 5}).save(Count(5).state_dict())
    with pytest.raises(ValueError, match="different run configuration .another count."):
        runner.execute(
            runner.RunFolder(tmp_path, {"steps": 6}), lambda: Count(6), resume=True, log=None
        )


def test_runs_sharing_a_folder_and_sweep_stops_at_the_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "clock", lambda: 1.0)

    def job(steps, deadline):
        folder = runner.RunFolder(tmp_path, {"steps": steps}, stem=f"count{steps}")
        return lambda _: runner.execute(folder, lambda: Count(steps), deadline=deadline, log=None)

    results, complete = runner.sweep([job(2, None), job(3, 0.0), job(4, None)])
    assert not complete and [r["status"] for r in results] == ["complete", "interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count2.json", "count2.pt", "count3.pt"]


def count_run(root: str, steps: int, *, deadline: float | None) -> dict:
    """A packed sweep's job: count to ``steps`` in ``root/count<steps>``."""
    folder = runner.RunFolder(Path(root) / f"count{steps}", {"steps": steps})
    return runner.execute(folder, lambda: Count(steps), deadline=deadline, log=None)


def test_a_packed_sweep_trains_in_processes_as_one_would(tmp_path):
    """--pack 2: the jobs rebuilt in two processes give the results of the plain sweep, in
    the runs' order; a deadline that has passed interrupts each process's first run, and
    the runs no process reached are left out. A run that is not a Job cannot travel."""
    jobs = lambda root: [runner.Job(count_run, str(root), n) for n in (2, 3, 4)]  # noqa: E731
    plain, complete = runner.sweep(jobs(tmp_path / "plain"))
    assert complete and [r["seen"] for r in plain] == [[1, 2], [1, 2, 3], [1, 2, 3, 4]]
    packed, complete = runner.sweep(jobs(tmp_path / "packed"), pack=2, folder=tmp_path)
    assert complete and packed == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "plain"]  # no job file left
    late, complete = runner.sweep(
        jobs(tmp_path / "late"), pack=2, deadline=runner.clock() - 1.0, folder=tmp_path
    )
    assert not complete and [r["status"] for r in late] == ["interrupted", "interrupted"]
    with pytest.raises(TypeError, match="Jobs"):
        runner.sweep([lambda d: {}, lambda d: {}], pack=2)


def bar_drawn(root: str, *, deadline: float | None) -> dict:
    """A packed sweep's job: whether a progress bar would be drawn, stderr a terminal."""
    with mock.patch.object(sys.stderr, "isatty", lambda: True):
        return {"status": "complete", "bar": runner.progress_bar(3, 0, "x") is not None}


def test_a_packed_process_draws_no_progress_bar(tmp_path, monkeypatch):
    """One bar per process would garble the terminal: none in a packed sweep's processes,
    one in a plain run (stderr a terminal)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = runner.progress_bar(3, 0, "x")
    assert bar is not None
    bar.close()
    assert runner.progress_bar(3, 0, "x", enabled=False) is None
    jobs = [runner.Job(bar_drawn, str(tmp_path)) for _ in range(2)]
    packed, complete = runner.sweep(jobs, pack=2, folder=tmp_path)
    assert complete and [r["bar"] for r in packed] == [False, False]


def test_train_step_is_the_hand_written_sgd_step_with_set_targets_before_the_update():
    """``train_step`` against the step written out in float64: the same weights after two
    steps of SGD with momentum; ``before_step`` runs once the gradients exist."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = model.double()
    ref = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(3, (6,))) for _ in range(2)]
    seen = []
    for x, y in batches:
        out, loss = runner.train_step(
            model,
            opt,
            runner.Precision(None, "cpu"),
            x,
            y,
            before_step=lambda: seen.append(all(p.grad is not None for p in model.parameters())),
        )
        assert out.shape == (6, 3) and loss.requires_grad
    assert seen == [True, True]
    velocity = [torch.zeros_like(p) for p in ref]
    for x, y in batches:  # by hand: cross-entropy as -log softmax, the momentum buffer
        w1, b1, w2, b2 = (p.requires_grad_() for p in ref)
        logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        loss = -(logits.log_softmax(1)[torch.arange(6), y]).mean()
        grads = torch.autograd.grad(loss, ref)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(ref, grads)):
                velocity[i] = g if velocity[i].abs().sum() == 0 else 0.9 * velocity[i] + g
                ref[i] = (p - 0.1 * velocity[i]).detach()
    for p, want in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


def test_forward_loss_then_backward_step_is_train_step():
    """The two halves, as a loop that measures between them takes them, give the same
    weights as the whole step; the forward runs under the precision's autocast."""
    import torch

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    weights = []
    for split in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        precision = runner.Precision("bf16", "cpu")
        if split:
            out, loss = runner.forward_loss(model, precision, x, y)
            runner.backward_step(opt, precision, loss)
        else:
            out, _ = runner.train_step(model, opt, precision, x, y)
        assert out.dtype == torch.bfloat16
        weights.append(model.weight.detach().clone())
    assert torch.equal(*weights)

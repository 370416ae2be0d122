"""FisherMonitor: schedule, history, peak, early value, explosion warning, logging, attach."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim.curvature import fisher_trace
from fisher_optim.monitor import CurvatureMonitor, FisherExplosionWarning, FisherMonitor

from .conftest import small_cnn, tiny_mlp
from .curvature_utils import (
    assert_unchanged,
    full_hessian,
    loop_exact_fisher,
    randomize_state,
    snapshot,
)
from .test_curvature_covariance import brute_covariance


@pytest.fixture
def setup():
    model = randomize_state(small_cnn())
    x, y = torch.randn(6, 3, 8, 8).double(), torch.randint(0, 5, (6,))
    return model, x, y


def test_schedule_history_and_peak(setup):
    model, x, y = setup
    monitor = FisherMonitor(model, (x, y), every=2, labels="exact")
    rows, expected = [], []
    for k in range(5):
        with torch.no_grad():  # change the model so that the trace moves
            for p in model.parameters():
                p.mul_(1.0 + 0.1 * k)
        rows.append(monitor.step())
        expected.append(fisher_trace(model, x, labels="exact"))
    assert [r is None for r in rows] == [True, False, True, False, True]
    assert [r["step"] for r in monitor.history] == [2, 4]
    assert [r["trace"] for r in monitor.history] == pytest.approx(expected[1::2][:2], rel=1e-12)
    assert set(monitor.history[0]) == {"step", "trace", "loss", "time", "duration", "exploding"}
    assert monitor.peak == max(r["trace"] for r in monitor.history)
    assert monitor.peak_step == max(monitor.history, key=lambda r: r["trace"])["step"]
    assert monitor.history[1]["time"] >= monitor.history[0]["time"] >= 0
    assert monitor(step=100)["step"] == 100  # __call__, off schedule: call 6 of every=2
    assert monitor.num_calls == 6 and monitor.exploding is False


def test_measure_leaves_model_untouched(setup):
    model, x, _ = setup
    model.train()
    snap = snapshot(model)
    monitor = FisherMonitor(model, [x[:3], x[3:]])
    monitor.measure(step=0)
    monitor.step()
    assert_unchanged(model, snap)
    assert len(monitor.history) == 2


def test_early_value_at_first_loss_below_threshold(setup):
    model, x, _ = setup
    monitor = FisherMonitor(model, x, every=10, labels="exact", loss_threshold=1.2)
    for loss in [3.0, 2.0, 1.5, torch.tensor(1.1), 0.9, 0.5]:
        monitor.step(loss=loss)
    assert monitor.early_step == 4  # measured although not on the every=10 schedule
    assert monitor.early_value == pytest.approx(fisher_trace(model, x, labels="exact"))
    assert [r["step"] for r in monitor.history] == [4]
    assert monitor.history[0]["loss"] == pytest.approx(1.1)


def test_warns_above_threshold(setup):
    model, x, _ = setup
    monitor = FisherMonitor(model, x, threshold=1e-12)
    with pytest.warns(FisherExplosionWarning, match="Fisher explosion at step 1"):
        monitor.step()
    assert monitor.exploding and monitor.history[0]["exploding"] is True


def test_warns_on_growth_factor(setup):
    model, x, _ = setup
    monitor = FisherMonitor(model, x, labels="exact", growth_factor=3.0)
    monitor.step()
    assert not monitor.exploding
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    with pytest.warns(FisherExplosionWarning, match="growth factor 3"):
        monitor.step()
    assert monitor.exploding and monitor.history[-1]["trace"] > 3 * monitor.first_value


def test_logging_to_callable_csv_and_jsonl(setup, tmp_path):
    model, x, _ = setup
    seen = []
    for log in (seen.append, tmp_path / "trace.csv", str(tmp_path / "trace.jsonl")):
        monitor = FisherMonitor(model, x, log=log, labels="exact")
        monitor.step(loss=2.5)
        monitor.step()
    assert [r["step"] for r in seen] == [1, 2] and seen[0]["loss"] == 2.5
    with open(tmp_path / "trace.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert float(rows[0]["trace"]) == pytest.approx(seen[0]["trace"])
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert [json.loads(line)["trace"] for line in lines] == pytest.approx(
        [r["trace"] for r in seen]
    )


def test_attach_to_optimizer(setup):
    model, x, y = setup
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = FisherMonitor(model, x, every=2)
    handle = monitor.attach(optimizer)
    for step in range(4):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
        if step == 1:
            assert monitor.history[-1]["loss"] == pytest.approx(float(loss.detach()))
    assert monitor.num_calls == 4 and [r["step"] for r in monitor.history] == [2, 4]
    handle.remove()
    optimizer.step()
    assert monitor.num_calls == 4


def test_bad_arguments():
    model, x = tiny_mlp(), torch.randn(3, 5).double()
    with pytest.raises(ValueError, match=r"ending in one of \('.csv', '.jsonl'\)"):
        FisherMonitor(model, x, log="trace.txt")
    with pytest.raises(ValueError, match="every"):
        FisherMonitor(model, x, every=0)
    with pytest.raises(ValueError, match=r"labels must be one of"):
        FisherMonitor(model, x, labels="empirical")
    with pytest.raises(ValueError, match="threshold"):
        FisherMonitor(model, x, threshold=-1.0)
    with pytest.raises(ValueError, match="no batches"):
        FisherMonitor(model, [])


# ------------------------------------------------------------------ CurvatureMonitor


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_curvature_monitor_matches_brute_force_and_leaves_model_untouched(setup):
    model, x, y = setup
    model.train()
    snap = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    quantities = ["trace_F", "trace_K", "lambda_K", "lambda_H", "lambda_H_eta_over_2"]
    monitor = CurvatureMonitor(
        model, (x, y), quantities, every=2, top_k=2, labels="exact", lr=optimizer,
        lanczos_iters=200, lanczos_tol=1e-11,
    )  # fmt: skip
    assert monitor.step() is None
    row = monitor.step(loss=1.5)
    assert_unchanged(model, snap)
    trace, eigenvalues = brute_covariance(model, x, y)
    hessian = torch.linalg.eigvalsh(full_hessian(model, x, y)).flip(0)
    assert row["step"] == 2 and row["loss"] == 1.5
    assert row["trace_F"] == pytest.approx(loop_exact_fisher(model, x), rel=1e-10)
    assert row["trace_K"] == pytest.approx(trace, rel=1e-10)
    assert row["lambda_K"] == pytest.approx(float(eigenvalues[0]), rel=1e-8)
    assert row["lambda_K_top"] == pytest.approx(eigenvalues[:2].tolist(), rel=1e-8)
    assert row["lambda_H"] == pytest.approx(float(hessian[0]), rel=1e-8)
    assert row["lambda_H_top"] == pytest.approx(hessian[:2].tolist(), rel=1e-8)
    assert row["lambda_H_converged"] and row["lambda_H_residual"] < 1e-9
    assert row["lambda_H_eta_over_2"] == pytest.approx(float(hessian[0]) * 0.2 / 2, rel=1e-8)
    optimizer.param_groups[0]["lr"] = 0.05  # a schedule: η is read at each measurement
    row = monitor.measure()
    assert row["lambda_H_eta_over_2"] == pytest.approx(float(hessian[0]) * 0.05 / 2, rel=1e-8)
    assert [r["step"] for r in monitor.history] == [2, 2]


def test_curvature_monitor_logs_and_attaches(setup, tmp_path):
    model, x, y = setup
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CurvatureMonitor(model, (x, y), ["trace_K", "lambda_H"], every=2, top_k=2,
                               lanczos_iters=20, log=tmp_path / "curv.csv")  # fmt: skip
    handle = monitor.attach(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    handle.remove()
    with open(tmp_path / "curv.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert float(rows[1]["trace_K"]) == pytest.approx(monitor.history[1]["trace_K"])
    assert "lambda_H_top" in rows[0] and "trace_F" not in rows[0]


def test_curvature_monitor_bad_arguments(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"quantities must be one of \('trace_F'"):
        CurvatureMonitor(model, (x, y), ["lambda_max"])
    with pytest.raises(ValueError, match="needs the learning rate"):
        CurvatureMonitor(model, (x, y), ["lambda_H_eta_over_2"])
    with pytest.raises(ValueError, match="lr must be a positive number"):
        CurvatureMonitor(model, (x, y), ["lambda_H_eta_over_2"], lr=-0.1)
    with pytest.raises(ValueError, match="need the true targets"):
        CurvatureMonitor(model, x, ["trace_F", "lambda_K"])
    CurvatureMonitor(model, x, "trace_F")  # Tr(F) alone needs no targets
    with pytest.raises(ValueError, match="top_k"):
        CurvatureMonitor(model, (x, y), top_k=0)


def test_monitors_pass_likelihood_and_target_mask_to_the_fisher_trace():
    """A one-output model through the Bernoulli likelihood, on the rows a mask keeps: Tr(F) by
    brute force, Σ_y p(y) ||∇ log p(y|x_i)||² over the kept examples (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    keep = torch.tensor([True, True, False, True, False, True])
    params = list(net.parameters())
    total = 0.0
    for i in torch.nonzero(keep).flatten():
        z = net(x[i : i + 1]).squeeze()
        p1 = torch.sigmoid(z)
        for y, prob in ((1.0, p1), (0.0, 1 - p1)):
            nll = F.binary_cross_entropy_with_logits(z, torch.tensor(y, dtype=torch.float64))
            g = torch.autograd.grad(nll, params, retain_graph=True)
            total += float(prob.detach()) * float(sum((t * t).sum() for t in g))
    want = total / int(keep.sum())
    kwargs = {"labels": "exact", "likelihood": "bernoulli", "target_mask": lambda x: keep}
    assert FisherMonitor(net, x, **kwargs).measure()["trace"] == pytest.approx(want, rel=1e-10)
    row = CurvatureMonitor(net, x, quantities=("trace_F",), **kwargs).measure()
    assert row["trace_F"] == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="likelihood"):
        FisherMonitor(net, x, labels="exact").measure()

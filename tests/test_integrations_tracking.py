"""fisher_optim.integrations.tracking: optimizer counters through wrappers, monitor rows as
flat metrics; ``import fisher_optim`` imports no training framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fisher_optim import FisherNoiseSGD, FisherPenaltySGD
from fisher_optim.integrations.tracking import OPTIMIZER_STATS, FisherTracking, optimizer_metrics

from .conftest import seeded_batch, seeded_mlp
from .curvature_utils import loop_exact_fisher


class Wrapper:
    """Stands for LightningOptimizer (``._optimizer``) / AcceleratedOptimizer (``.optimizer``)."""

    def __init__(self, inner, attr: str) -> None:
        setattr(self, attr, inner)


def _trained_fp() -> FisherPenaltySGD:
    model = seeded_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=2)
    for step in range(3):
        x, y = seeded_batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_optimizer_metrics_through_wrappers_and_several_optimizers() -> None:
    opt = _trained_fp()
    expected = {
        f"fisher/{name}": float(getattr(opt, attr))
        for attr, name in OPTIMIZER_STATS.items()
        if getattr(opt, attr, None) is not None
    }
    assert expected["fisher/penalty_value"] == opt.penalty_value
    assert expected["fisher/refreshes"] == 2.0 and expected["fisher/skipped_refreshes"] == 0.0
    assert optimizer_metrics([opt]) == expected
    wrapped = Wrapper(Wrapper(opt, "optimizer"), "_optimizer")
    assert optimizer_metrics([wrapped], prefix="p.") == {
        k.replace("fisher/", "p."): v for k, v in expected.items()
    }
    plain = torch.optim.SGD(seeded_mlp().parameters(), lr=0.1)
    assert optimizer_metrics([plain]) == {}
    noise = FisherNoiseSGD(seeded_mlp(), lr=0.1, small_batch_size=2)  # nothing computed yet
    both = optimizer_metrics([plain, opt, noise])
    assert both == {
        **{f"{k}_1": v for k, v in expected.items()},
        "fisher/refreshes_2": 0.0,
        "fisher/skipped_refreshes_2": 0.0,
    }


def test_early_guard_decisions_are_logged_only_when_the_early_guard_is_on() -> None:
    model = seeded_mlp()
    assert "fisher/unjudged_refreshes" not in optimizer_metrics([_trained_fp()])
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=10, guard_early=True)
    x, y = seeded_batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    metrics = optimizer_metrics([opt])
    assert metrics["fisher/unjudged_refreshes"] == opt.unjudged_refreshes == 1


def test_clipped_gradient_norm_is_read_from_a_tensor() -> None:
    model = seeded_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, max_grad_norm=0.01)
    x, y = seeded_batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert isinstance(opt.grad_norm, torch.Tensor)
    assert optimizer_metrics([opt])["fisher/grad_norm"] == float(opt.grad_norm)


def test_tracking_rows_are_flat_metrics_equal_to_brute_force() -> None:
    model = seeded_mlp().double()
    probe = torch.randn(5, 6, dtype=torch.float64)
    tracking = FisherTracking(probe, every=2, labels="exact", loss_threshold=0.5, prefix="f/")
    with pytest.raises(RuntimeError, match="bind"):
        tracking.step(1)
    tracking.bind(model)
    assert tracking.step(1, loss=2.0) == {}
    row = tracking.step(2, loss=1.0)
    assert set(row) == {"f/trace", "f/duration", "f/exploding"}
    assert row["f/trace"] == pytest.approx(loop_exact_fisher(model, probe), rel=1e-10)
    early = tracking.step(3, loss=0.1)  # off schedule: the paper's early value Tr(F_i)
    assert early["f/early_trace"] == early["f/trace"] == row["f/trace"]
    assert tracking.monitor.early_step == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every"):
        FisherTracking(torch.zeros(2, 3), every=0)
    with pytest.raises(TypeError, match="prefix"):
        FisherTracking(torch.zeros(2, 3), prefix=None)
    with pytest.raises(ValueError, match="no batches"):
        FisherTracking([])


def test_import_fisher_optim_needs_no_framework() -> None:
    code = (
        "import sys, fisher_optim, fisher_optim.integrations, "
        "fisher_optim.integrations.tracking\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _callback(kind: str, probe, **kwargs):
    if kind == "tracking":
        return FisherTracking(probe, **kwargs)
    if kind == "lightning":
        pytest.importorskip("lightning")
        from fisher_optim.integrations.lightning import FisherLightningCallback

        return FisherLightningCallback(probe, **kwargs)
    pytest.importorskip("transformers")
    from fisher_optim.integrations.transformers import FisherTrainerCallback

    return FisherTrainerCallback(probe, **kwargs)


def _tracking(callback):
    return callback if isinstance(callback, FisherTracking) else callback.tracking


KINDS = ("tracking", "lightning", "transformers")


@pytest.mark.parametrize("kind", KINDS)
def test_callbacks_forward_the_monitors_arguments(kind: str) -> None:
    """likelihood= and target_mask= reach the monitor; what is not given is the monitor's
    default (every=...), so the callbacks cannot drift from FisherMonitor."""
    import inspect

    from fisher_optim import Bernoulli, FisherMonitor

    def mask(x):
        return torch.ones(x.shape[0], dtype=torch.bool)

    model, probe = seeded_mlp(), seeded_batch(0)[0]
    callback = _callback(kind, probe, likelihood="bernoulli", target_mask=mask, labels="exact")
    tracking = _tracking(callback)
    tracking.bind(model)
    monitor = tracking.monitor
    defaults = inspect.signature(FisherMonitor.__init__).parameters
    assert isinstance(monitor.likelihood, Bernoulli)
    assert monitor.target_mask is mask
    assert monitor.labels == "exact"
    assert monitor.every == defaults["every"].default
    assert monitor.chunk_size == defaults["chunk_size"].default
    row = tracking.step(1)
    expected = FisherMonitor(model, probe, likelihood="bernoulli", labels="exact").step(step=1)
    assert row[f"{tracking.prefix}trace"] == pytest.approx(expected["trace"], rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_callbacks_name_a_typo_and_check_values(kind: str) -> None:
    probe = seeded_batch(0)[0]
    name = {
        "tracking": "FisherTracking",
        "lightning": "FisherLightningCallback",
        "transformers": "FisherTrainerCallback",
    }[kind]
    with pytest.raises(
        TypeError,
        match=rf"{name} got an unexpected keyword argument 'evry'; "
        "did you mean 'every'",
    ):
        _callback(kind, probe, evry=10)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        _callback(kind, probe, every=True)
    with pytest.raises(TypeError, match="target_mask must be a function"):
        _callback(kind, probe, target_mask=3)

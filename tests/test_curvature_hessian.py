"""Tr(H) (Hutchinson, Hutch++) and λ_max(H) against the full Hessian, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim._modules import eval_mode
from fisher_optim.curvature import (
    HessianOperator,
    hessian_trace,
    hutchinson,
    hutchpp,
    power_iteration,
    top_hessian_eigenvalue,
)

from .conftest import small_cnn, tiny_mlp
from .curvature_utils import assert_unchanged, full_hessian, randomize_state, snapshot

# torch.func.hessian (the brute force) warns about torch.jit internally
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture
def mlp_data():
    model = randomize_state(tiny_mlp())
    x, y = torch.randn(12, 5).double(), torch.randint(0, 4, (12,))
    return model, x, y


@pytest.fixture
def cnn_data():
    model = randomize_state(small_cnn())
    x, y = torch.randn(10, 3, 8, 8).double(), torch.randint(0, 5, (10,))
    return model, x, y


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_hvp_equals_full_hessian_for_batch_and_loader(model_name, mlp_data, cnn_data):
    model, x, y = mlp_data if model_name == "mlp" else cnn_data
    h = full_hessian(model, x, y)
    v = torch.randn(h.shape[0], dtype=torch.float64)
    # unequal batches: the loss is the mean over examples, not over batches
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with eval_mode(model):
        for data in ((x, y), loader):
            op = HessianOperator(model, data, F.cross_entropy)
            torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-9, atol=1e-11)  # cached


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_hessian_trace_within_3_standard_errors(mlp_data, distribution, monkeypatch):
    model, x, y = mlp_data
    model.train()
    snap = snapshot(model)
    calls = []
    original = HessianOperator.matvec
    monkeypatch.setattr(
        HessianOperator, "matvec", lambda self, v: calls.append(1) or original(self, v)
    )
    est = hessian_trace(
        model,
        (x, y),
        num_probes=100,
        distribution=distribution,
        generator=torch.Generator().manual_seed(0),
    )
    assert_unchanged(model, snap)
    true = float(full_hessian(model, x, y).trace())
    assert est.standard_error > 0 and len(calls) == 100
    assert abs(est.estimate - true) < 3 * est.standard_error, (est, true)


def test_hutchpp_hessian_trace_on_bn_model(cnn_data):
    model, x, y = cnn_data
    snap = snapshot(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    est = hessian_trace(
        model, loader, num_probes=60, method="hutch++", generator=torch.Generator().manual_seed(0)
    )
    assert_unchanged(model, snap)
    true = float(full_hessian(model, x, y).trace())
    assert abs(est.estimate - true) < 3 * est.standard_error + 1e-9 * abs(true), (est, true)


def _psd_with_decaying_spectrum(dim: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64) ** 2
    return (q * eigenvalues) @ q.T


def test_hutchpp_on_explicit_matrix():
    a = _psd_with_decaying_spectrum()
    true = float(a.trace())
    errors = {"hutchinson": [], "hutch++": []}
    for seed in range(30):
        for name, fn in (("hutchinson", hutchinson), ("hutch++", hutchpp)):
            est = fn(lambda v: a @ v, 60, 30, generator=torch.Generator().manual_seed(seed))
            errors[name].append(abs(est.estimate - true))
            if name == "hutch++":
                assert abs(est.estimate - true) < 4 * est.standard_error
    # deflating the top of the spectrum makes Hutch++ far more accurate for equal work
    assert sum(errors["hutch++"]) < 0.2 * sum(errors["hutchinson"])


def test_hutchpp_is_exact_for_low_rank_and_uses_all_matvecs():
    u = torch.randn(40, 2, dtype=torch.float64)
    a = u @ u.T
    count = []

    def matvec(v):
        count.append(1)
        return a @ v

    est = hutchpp(matvec, 40, 8, distribution="gaussian", generator=torch.Generator())
    assert len(count) == 8
    assert est.estimate == pytest.approx(float(a.trace()), rel=1e-10)


def test_top_eigenvalue_matches_eigvalsh(mlp_data):
    model, x, y = mlp_data
    model.train()
    snap = snapshot(model)
    lam = top_hessian_eigenvalue(
        model, (x, y), iters=3000, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    assert_unchanged(model, snap)
    eig = torch.linalg.eigvalsh(full_hessian(model, x, y))
    # the algebraically largest eigenvalue (λ_H^1), with a convergence report
    assert lam.converged and lam.eigenvalue == pytest.approx(float(eig[-1]), rel=1e-6)


def test_power_iteration_finds_largest_magnitude():
    a = torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64))
    est = power_iteration(lambda v: a @ v, 3, iters=500, tol=1e-13, generator=torch.Generator())
    assert est.converged and est.eigenvalue == pytest.approx(-4.0)
    assert abs(float(est.eigenvector[1].abs())) == pytest.approx(1.0)


def test_bad_arguments(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(ValueError, match=r"method must be one of \('hutchinson', 'hutch\+\+'\)"):
        hessian_trace(model, (x, y), method="lanczos")
    with pytest.raises(ValueError, match="distribution must be one of"):
        hessian_trace(model, (x, y), distribution="uniform")
    with pytest.raises(ValueError, match="num_probes"):
        hessian_trace(model, (x, y), num_probes=0)
    with pytest.raises(ValueError, match="num_matvecs >= 3"):
        hutchpp(lambda v: v, 4, 2)
    with pytest.raises(ValueError, match="targets"):
        hessian_trace(model, x)
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(model, (x, y), iters=0)


def test_one_output_model_with_the_default_cross_entropy_raises():
    """Cross-entropy over one class is identically 0, so would be its Hessian: refuse."""
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3).double(), torch.randn(8, 1).double()
    for measure in (hessian_trace, top_hessian_eigenvalue):
        with pytest.raises(ValueError, match="identically 0.*loss_fn="):
            measure(model, (x, y))
        with pytest.raises(ValueError, match="identically 0"):
            measure(model, (x, torch.zeros(8).long()))

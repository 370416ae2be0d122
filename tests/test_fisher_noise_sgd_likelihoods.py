"""FisherNoiseSGD with the Bernoulli (multi-label) and Gaussian (regression) likelihoods.

A float64 MLP with 3 outputs and a fixed batch of 8, so that the per-example gradients, the
empirical Fisher ``(1/M) Σ g_i g_i^T`` and the true Fisher ``(1/M) Σ_i J_i^T Λ_i J_i``
(``Λ = diag(p(1 − p))`` for Bernoulli, ``I/σ²`` for Gaussian) are formed by brute force, one
``torch.autograd.grad`` per example and output; the noise is drawn many times and its moments
compared with ``scale² · (diag F | F | Tr F / d)`` within statistical error, as
``test_fisher_noise_sgd.py`` does for the categorical likelihood.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim.fisher_noise_sgd import FisherNoiseSGD
from fisher_optim.likelihoods import Bernoulli, Gaussian

D = torch.float64
N, M_S, LR, OUT = 8, 2, 0.1, 3
SCALE2 = (N - M_S) / (N * M_S)
DRAWS = 20_000
SIGMA = 0.7
LIKELIHOODS = {"bernoulli": Bernoulli(), "gaussian": Gaussian(sigma=SIGMA)}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, OUT)).to(D)


def _batch(name: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=g, dtype=D)
    if name == "bernoulli":
        return x, torch.randint(2, (N, OUT), generator=g).to(D)
    return x, torch.randn(N, OUT, generator=g, dtype=D)


def _loss(name: str, z: Tensor, y: Tensor) -> Tensor:
    """``−log p(y|z)`` of one example (constants dropped), written out."""
    if name == "bernoulli":
        return F.binary_cross_entropy_with_logits(z, y, reduction="sum")
    return (z - y).square().sum() / (2 * SIGMA**2)


def _per_example_grads(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """``[N, d]``: ∇_θ ℓ(f(x_i), y_i), one backward per example."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        grads = torch.autograd.grad(_loss(name, model(xi[None])[0], yi), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _fisher(name: str, kind: str) -> Tensor:
    """The batch's empirical (true targets) or true (``J^T Λ J``) Fisher, ``[d, d]``."""
    model = _mlp()
    x, y = _batch(name)
    if kind == "empirical":
        g = _per_example_grads(model, name, x, y)
        return g.T @ g / N
    return _true_fisher_of(model, name, x) / N


def _true_fisher_of(model: nn.Module, name: str, x: Tensor) -> Tensor:
    """``Σ_i J_i^T Λ_i J_i`` over the examples of ``x``, ``J_i`` one backward per output."""
    params = list(model.parameters())
    fisher = 0
    for xi in x:
        z = model(xi[None])[0]
        jac = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(z[c], params, retain_graph=True)]
                )
                for c in range(OUT)
            ]
        )  # [OUT, d]
        if name == "bernoulli":
            p = torch.sigmoid(z.detach())
            lam = torch.diag(p * (1 - p))
        else:
            lam = torch.eye(OUT, dtype=D) / SIGMA**2
        fisher = fisher + jac.T @ lam @ jac
    return fisher


def _setup(name: str, covariance: str, fisher: str, **kw: object) -> FisherNoiseSGD:
    model = _mlp()
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance=covariance, fisher=fisher, seed=3,
        likelihood=LIKELIHOODS[name], **kw,
    )  # fmt: skip
    x, y = _batch(name)
    model(x)  # the batch is captured
    opt.set_targets(y)
    return opt


def _flat(tensors: list[Tensor | None], draws: int) -> Tensor:
    return torch.cat([t.reshape(draws, -1) for t in tensors if t is not None], dim=1)


def _check_moments(draws: Tensor, cov: Tensor, rel_frobenius: float | None = None) -> None:
    """Zero mean, and the sample covariance of ``draws`` ``[K, d]`` against ``cov``."""
    k = draws.shape[0]
    std = cov.diagonal().sqrt()
    assert (draws.mean(0).abs() <= 5 * std / math.sqrt(k) + 1e-15).all()
    var = draws.pow(2).mean(0)
    assert ((var - cov.diagonal()).abs() <= 5 * math.sqrt(2 / k) * cov.diagonal() + 1e-15).all()
    if rel_frobenius is not None:
        sample = draws.T @ draws / k
        assert float((sample - cov).norm() / cov.norm()) < rel_frobenius


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_empirical_diagonal_is_the_per_example_loop(name: str) -> None:
    opt = _setup(name, "diagonal", "empirical")
    opt._refresh(opt.current_batch())
    exact = _fisher(name, "empirical")
    estimate = torch.cat([c.reshape(-1) for c in opt._cache])
    torch.testing.assert_close(estimate, exact.diagonal(), rtol=1e-10, atol=1e-14)
    assert opt.fisher_trace == pytest.approx(float(exact.trace()), rel=1e-10)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * torch.diag(exact.diagonal()), rel_frobenius=0.05)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_true_diagonal_estimate_is_unbiased(name: str) -> None:
    """Each refresh samples labels from the model: the mean estimate is diag of J^T Λ J."""
    opt = _setup(name, "diagonal", "true")
    refreshes = 300
    estimates = []
    for _ in range(refreshes):
        opt._refresh(opt.current_batch())
        estimates.append(torch.cat([c.reshape(-1) for c in opt._cache]))
    est = torch.stack(estimates)
    exact = _fisher(name, "true").diagonal()
    assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(refreshes) + 1e-12).all()


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_full_covariance_is_scaled_fisher(name: str, fisher: str) -> None:
    opt = _setup(name, "full", fisher)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * _fisher(name, fisher), rel_frobenius=0.05)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_trace_noise_is_isotropic(name: str) -> None:
    opt = _setup(name, "trace", "empirical")
    opt._refresh(opt.current_batch())
    exact = _fisher(name, "empirical")
    d = exact.shape[0]
    assert opt.fisher_trace == pytest.approx(float(exact.trace()), rel=1e-10)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * float(exact.trace()) / d * torch.eye(d, dtype=D), 0.05)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_rows_without_a_target_are_left_out(name: str, covariance: str) -> None:
    """NaN targets (an output without a target) and ``target_mask`` rows take no part: the
    Fisher is the loop's over the examples that keep their targets."""
    x, y = _batch(name)
    y = y.clone()
    y[2] = float("nan")  # example 2 has no target at all
    keep = [i for i in range(N) if i != 2]
    g = _per_example_grads(_mlp(), name, x[keep], y[keep])
    exact = g.T @ g / N  # M stays the batch's N: example 2 contributes g_2 = 0
    opt = _setup(name, covariance, "empirical")
    opt.set_targets(y)
    batch = opt.current_batch()
    if covariance == "full":
        noise = _flat(opt._sample_noise(batch, draws=DRAWS), DRAWS)
        _check_moments(noise, SCALE2 * exact, rel_frobenius=0.05)
    else:
        opt._refresh(batch)
        estimate = torch.cat([c.reshape(-1) for c in opt._cache])
        torch.testing.assert_close(estimate, exact.diagonal(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_target_mask_rows_get_no_sampled_label(name: str) -> None:
    """fisher='true' with ``target_mask``: the mean estimate is the true Fisher of the
    examples the mask keeps (divided by the whole batch's M)."""
    mask = torch.ones(N, dtype=torch.bool)
    mask[2] = False
    opt = _setup(name, "diagonal", "true", target_mask=lambda inp: mask)
    refreshes = 300
    estimates = []
    for _ in range(refreshes):
        opt._refresh(opt.current_batch())
        estimates.append(torch.cat([c.reshape(-1) for c in opt._cache]))
    est = torch.stack(estimates)
    full = _fisher(name, "true").diagonal()
    model = _mlp()
    x, _ = _batch(name)
    alone = _true_fisher_of(model, name, x[2:3]).diagonal() / N  # example 2's share
    exact = full - alone
    assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(refreshes) + 1e-12).all()
    assert bool((alone > 1e-6).any())  # leaving example 2 out is visible


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_real_steps_add_finite_noise(name: str, covariance: str) -> None:
    model = _mlp()
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance=covariance, likelihood=name, seed=0
    )
    x, y = _batch(name)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        _loss(name, model(x), y).backward()
        opt.step()
    assert opt.noise_norm is not None and math.isfinite(opt.noise_norm) and opt.noise_norm > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_one_output_model_needs_a_one_output_likelihood() -> None:
    model = nn.Linear(3, 1).to(D)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, fisher="empirical")
    x = torch.randn(N, 3, dtype=D)
    model(x).sum().backward()
    opt.set_targets(torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="likelihood='bernoulli'"):
        opt.step()

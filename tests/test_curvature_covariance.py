"""Tr(K) and the top eigenvalues of the gradient covariance K against float64 brute force:
the dense per-example gradient matrix from one autograd.grad per example."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim._modules import eval_mode
from fisher_optim.curvature import covariance as cov_module
from fisher_optim.curvature import (
    gradient_covariance,
    gradient_covariance_eigenvalues,
    gradient_covariance_trace,
    layers,
)

from .curvature_utils import assert_unchanged, example_grad, loop_likelihood_grads, snapshot
from .test_curvature_per_example import CASES, SIGMA, Scale, _lik, likelihood_case, make_case
from .test_curvature_zoo import ZOO
from .test_curvature_zoo import _check_left_as_found as check_left_as_found
from .test_curvature_zoo import _make as make_zoo


def brute_covariance(model, x, y, output_fn=None):
    """Tr(K) and all eigenvalues (descending) of K = (1/N) Σ (g_i - ḡ)(g_i - ḡ)^T, dense."""
    model = copy.deepcopy(model)
    rows = []
    with eval_mode(model):
        for i in range(len(y)):
            xi = x[i : i + 1]
            out = model(xi)
            out = out if output_fn is None else output_fn(out)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[i].reshape(-1))
            rows.append(example_grad(model, loss))
    g = torch.stack(rows)
    centred = g - g.mean(0)
    k = centred.T @ centred / len(y)  # d x d: fine for test-sized models
    return float(k.trace()), torch.linalg.eigvalsh(k).flip(0)


def assert_matches(cov, trace, eigenvalues, k):
    assert cov.trace == pytest.approx(trace, rel=1e-10)
    torch.testing.assert_close(cov.eigenvalues, eigenvalues[:k], rtol=1e-8, atol=1e-12 * trace)


@pytest.mark.parametrize("name", list(CASES))
def test_trace_and_eigenvalues_match_dense_brute_force(name):
    model, x, y, output_fn = make_case(name, n=9)
    model.train()  # measured in eval mode, BatchNorm with its running statistics
    snap = snapshot(model)
    params = list(model.parameters())
    cov = gradient_covariance(model, (x, y), k=4, output_fn=output_fn)
    assert_unchanged(model, snap)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    trace, eigenvalues = brute_covariance(model, x, y, output_fn)
    assert cov.num_examples == 9
    assert_matches(cov, trace, eigenvalues, 4)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_named_functions_and_loader_input(name):
    model, x, y, _ = make_case(name, n=11)
    trace, eigenvalues = brute_covariance(model, x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # unequal batches: 4, 4, 3
    assert gradient_covariance_trace(model, loader) == pytest.approx(trace, rel=1e-10)
    lam = gradient_covariance_eigenvalues(model, loader, k=3)
    torch.testing.assert_close(lam, eigenvalues[:3], rtol=1e-8, atol=0)
    # the default k is 1: λ_K^1
    lam1 = gradient_covariance_eigenvalues(model, (x, y))
    assert lam1.shape == (1,) and float(lam1[0]) == pytest.approx(float(eigenvalues[0]), rel=1e-8)
    # at most N - 1 nonzero eigenvalues: the centring removes the direction of the mean
    assert abs(float(gradient_covariance(model, (x, y), k=11).eigenvalues[-1])) < 1e-12 * trace


def test_covered_layers_need_no_vmap(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("vmap route used")

    monkeypatch.setattr(cov_module, "cotangent_grads", fail)
    for name in ("mlp", "cnn_bn", "wide", "lm"):
        model, x, y, output_fn = make_case(name)
        gradient_covariance(model, (x, y), output_fn=output_fn)


def test_small_memory_blocks_give_the_same_values(monkeypatch):
    for name in ("cnn_bn", "wide", "zoo1d", "lm"):
        model, x, y, output_fn = make_case(name, n=8)
        full = gradient_covariance(model, (x, y), k=3, output_fn=output_fn)
        monkeypatch.setattr(layers, "MAX_BLOCK_ELEMENTS", 64)
        small = gradient_covariance(model, (x, y), k=3, output_fn=output_fn)
        monkeypatch.undo()
        assert small.trace == pytest.approx(full.trace, rel=1e-12)
        torch.testing.assert_close(small.eigenvalues, full.eigenvalues, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("length", [1, 3, 40])
def test_sequence_linear_by_inner_products_and_by_gradients(length):
    """Short sequences take the inner-product form, long ones the per-example gradients."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x, y = torch.randn(6, length, 3).double(), torch.randint(0, 5, (6, length))
    y[0, 0] = -100  # ignored row
    trace, eigenvalues = brute_covariance(model, x, y)
    assert_matches(gradient_covariance(model, (x, y), k=2), trace, eigenvalues, 2)


def test_shared_module_through_vmap_leaves_parameters_in_place():
    block = nn.Linear(4, 4)
    model = nn.Sequential(block, nn.Tanh(), block, Scale(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 4).double(), torch.randint(0, 3, (7,))
    params = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()]
    snap = snapshot(model)
    cov = gradient_covariance(model, (x, y), k=2)
    assert_unchanged(model, snap)
    assert all(m._parameters[name] is p for m, name, p in params)
    trace, eigenvalues = brute_covariance(model, x, y)
    assert_matches(cov, trace, eigenvalues, 2)


def test_bad_inputs():
    model, x, y, _ = make_case("mlp")
    with pytest.raises(ValueError, match="true targets"):
        gradient_covariance(model, x)
    with pytest.raises(ValueError, match="k must be at most"):
        gradient_covariance(model, (x, y), k=8)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        gradient_covariance_eigenvalues(model, (x, y), k=0)
    with pytest.raises(ValueError, match="no examples"):
        gradient_covariance(model, [])
    with pytest.raises(ValueError, match="one per example"):
        gradient_covariance(model, (x, y[:3]))


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_of_layouts_tied_and_shared_weights(name):
    """Sequence-first transformer layers with T = B, F.linear tying, shared modules."""
    model, x, y = make_zoo(name)
    params, snap = list(model.parameters()), snapshot(model)
    cov = gradient_covariance(model, (x, y), k=2)
    check_left_as_found(model, params, snap)
    trace, eigenvalues = brute_covariance(model, x, y)
    assert_matches(cov, trace, eigenvalues, 2)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("name", ["cnn_bn", "lm"])
def test_each_likelihood_matches_dense_brute_force(name, likelihood):
    model, x, y, output_fn = likelihood_case(name, likelihood)
    g = loop_likelihood_grads(model, x, y, likelihood, output_fn, SIGMA)
    centred = g - g.mean(0)
    k = centred.T @ centred / len(g)
    result = gradient_covariance(
        model, (x, y), k=3, output_fn=output_fn, likelihood=_lik(likelihood)
    )
    assert result.trace == pytest.approx(float(k.trace()), rel=1e-10)
    expected = torch.linalg.eigvalsh(k).flip(0)[:3]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=1e-12)
    trace = gradient_covariance_trace(
        model, (x, y), output_fn=output_fn, likelihood=_lik(likelihood)
    )
    assert trace == pytest.approx(float(k.trace()), rel=1e-10)

"""The per-layer rules (fisher_optim.curvature.layers) against brute force in float64: the
rule of a family gives the per-example squared norms and the Gram matrix of its own
parameters' per-example gradients, compared with a per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim.curvature import covariance as cov_module
from fisher_optim.curvature import (
    layers,
    per_example_grad_norms,
    per_example_gradient_gram,
    target_cotangents,
)
from fisher_optim.curvature import per_example as pe


class Head(nn.Module):
    """``norm`` on ``[B, T, D]`` (or ``[B, D]``), then a linear head and a mean over T."""

    def __init__(self, norm: nn.Module, seq: bool) -> None:
        super().__init__()
        self.inp, self.norm, self.out, self.seq = nn.Linear(3, 6), norm, nn.Linear(6, 4), seq

    def forward(self, x):
        h = self.out(torch.tanh(self.norm(self.inp(x))))
        return h.mean(1) if self.seq else h


def brute_grads(model, x, y):
    """Per-example gradients ``[B, d]``, one example at a time (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def no_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the layer went per example instead of through its rule")

    monkeypatch.setattr(pe, "cotangent_grads", fail)
    monkeypatch.setattr(cov_module, "cotangent_grads", fail)


NORMS = {
    "rmsnorm": lambda: nn.RMSNorm(6),
    "rmsnorm_eps": lambda: nn.RMSNorm(6, eps=1e-3),
    "layernorm": lambda: nn.LayerNorm(6),
}


@pytest.mark.parametrize("seq", [False, True], ids=["flat", "seq"])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_rules_match_brute_force(name, seq, monkeypatch):
    torch.manual_seed(0)
    model = Head(NORMS[name](), seq).double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # not all ones: the weight's gradient matters
    n = 5
    x = torch.randn(n, 7, 3, dtype=torch.float64) if seq else torch.randn(n, 3).double()
    y = torch.randint(4, (n,))
    g = brute_grads(model, x, y)
    no_fallback(monkeypatch)
    torch.testing.assert_close(per_example_grad_norms(model, x, y), g.norm(dim=1))
    gram = per_example_gradient_gram(model, x, target_cotangents(y))
    torch.testing.assert_close(gram, g @ g.T)


def test_every_family_has_one_rule():
    assert layers.RULES[nn.RMSNorm] is layers.RULES.get(nn.RMSNorm)
    assert isinstance(layers.RULES[nn.Conv2d], layers.ConvRule)
    assert layers.RULES[nn.BatchNorm1d] is layers.RULES[nn.BatchNorm3d]
    for rule in set(layers.RULES.values()):
        assert type(rule).sq_norms is not layers.LayerRule.sq_norms
        assert type(rule).gram is not layers.LayerRule.gram


def test_rule_for_refuses_what_it_cannot_take():
    assert layers.rule_for(nn.Embedding(5, 3, max_norm=1.0), set()) is None
    assert layers.rule_for(nn.Embedding(5, 3, scale_grad_by_freq=True), set()) is None
    assert layers.rule_for(nn.RMSNorm(3, elementwise_affine=False), set()) is None  # no params
    lin = nn.Linear(2, 2)
    assert layers.rule_for(lin, {id(lin.weight)}) is None  # registered in another module too
    assert isinstance(layers.rule_for(lin, set()), layers.LinearRule)


# --------------------------------------------------------------------------------------
# sq_grads: Σ_i ∇_p ℓ_i ⊙ ∇_p ℓ_i, against a per-example autograd loop
# --------------------------------------------------------------------------------------

SQ_GRAD_LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), (5, 4)),
    "linear_seq": (lambda: nn.Linear(4, 3), (5, 6, 4)),
    "linear_4d": (lambda: nn.Linear(4, 3), (5, 2, 3, 4)),
    "linear_no_bias": (lambda: nn.Linear(4, 3, bias=False), (5, 6, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (5, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=1), (5, 3, 7, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (5, 4, 6, 6)),
    "conv2d_grouped_wide": (lambda: nn.Conv2d(32, 4, 3, groups=2, dilation=2), (3, 32, 7, 7)),
    "conv2d_reflect": (
        lambda: nn.Conv2d(3, 2, 3, padding="same", padding_mode="reflect"),
        (5, 3, 6, 6),
    ),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3).eval(), (5, 3, 4, 4)),
    "layernorm": (lambda: nn.LayerNorm(4), (5, 6, 4)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((3, 4)), (5, 3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    "rmsnorm": (lambda: nn.RMSNorm(4), (5, 6, 4)),
}


def _randomised(m):
    torch.manual_seed(0)
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        for name in ("running_mean", "running_var"):
            if getattr(m, name, None) is not None:
                getattr(m, name).uniform_(0.5, 1.5)
    return m


def _loop_sq_grads(m, a, g):
    """``Σ_i (∂<m(a_i), g_i>/∂p)^2`` per trainable parameter, one example at a time."""
    params = layers.trained(m)
    out = [torch.zeros_like(p) for p in params]
    for i in range(a.shape[0]):
        z = m(a[i : i + 1])
        for o, d in zip(out, torch.autograd.grad((z * g[i : i + 1]).sum(), params)):
            o += d.square()
    return out


@pytest.mark.parametrize("name", sorted(SQ_GRAD_LAYERS))
def test_sq_grads_match_a_per_example_loop(name):
    make, shape = SQ_GRAD_LAYERS[name]
    m = _randomised(make())
    a = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(m(a).shape, dtype=torch.float64)
    rule = layers.rule_for(m, set())
    got = rule.sq_grads(m, a, g)
    want = _loop_sq_grads(m, a, g)
    assert [t.shape for t in got] == [t.shape for t in want]
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_sq_grads_sum_repeated_tokens(padding_idx):
    m = _randomised(nn.Embedding(6, 3, padding_idx=padding_idx))
    ids = torch.tensor([[1, 2, 1, 1], [0, 5, 5, 3], [4, 4, 4, 4]])
    g = torch.randn(3, 4, 3, dtype=torch.float64)
    (got,) = layers.rule_for(m, set()).sq_grads(m, ids, g)
    (want,) = _loop_sq_grads(m, ids, g)
    torch.testing.assert_close(got, want)


def test_every_family_gives_sums_of_squares():
    for rule in set(layers.RULES.values()):
        assert type(rule).sq_grads is not layers.LayerRule.sq_grads

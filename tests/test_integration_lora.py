"""Parameter-efficient fine-tuning: only parameters with ``requires_grad`` are penalised.

A hand-built LoRA (``W x + B A x`` with ``W`` frozen) on a small MLP: the penalty is
``||∇_{A,B} L||²``, its gradient ``2 H_{AB} g_{AB}`` (the Hessian over the adapters only),
compared with the explicit Hessian in float64; the frozen base gets no gradient and no update.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian

from fisher_optim import FisherPenaltySGD, penalty_gradient
from fisher_optim.likelihoods import sample_labels


class LoRALinear(nn.Module):
    """``base(x) + x Aᵀ Bᵀ``, the base frozen (B starts non-zero so the penalty is not 0)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(0.3 * torch.randn(rank, base.in_features))
        self.B = nn.Parameter(0.3 * torch.randn(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.A.T @ self.B.T


def lora_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        LoRALinear(nn.Linear(5, 8)), nn.Tanh(), LoRALinear(nn.Linear(8, 4))
    ).double()


def brute_force_adapters(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``2 H g`` over the trainable parameters, the frozen ones held fixed."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), labels)

    theta = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    return 2 * hessian(loss)(theta) @ grad(loss)(theta)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_penalty_gradient_is_over_the_adapters_only(mode: str) -> None:
    model, x = lora_mlp(), torch.randn(32, 5, dtype=torch.float64)
    labels = sample_labels(model(x), generator=torch.Generator().manual_seed(7))
    expected = brute_force_adapters(model, x, labels)
    got = penalty_gradient(model, x, mode=mode, generator=torch.Generator().manual_seed(7))
    assert len(got) == 4  # A and B of the two layers, nothing for the frozen base
    got = torch.cat([g.flatten() for g in got])
    rtol = 1e-10 if mode == "exact" else 1e-6
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_frozen_base_gets_no_gradient_and_no_update(mode: str) -> None:
    model = lora_mlp()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = FisherPenaltySGD(
        model, lr=0.1, momentum=0.9, weight_decay=1e-2, alpha=0.5, every=1, mode=mode
    )
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = (
            torch.randn(16, 5, generator=g, dtype=torch.float64),
            torch.randint(4, (16,), generator=g),
        )
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.refreshes == 3 and opt.penalty_value > 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n

"""Brute force and state checks shared by the curvature and monitor tests (float64)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fisher_optim._modules import eval_mode


def randomize_state(model: nn.Module, with_grads: bool = True) -> nn.Module:
    """Non-trivial BatchNorm running statistics, and (some) existing ``.grad``."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    if with_grads:
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0 and p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    """Bitwise: parameters, buffers, ``.grad`` (incl. None), requires_grad, training flags."""
    now = snapshot(model)
    assert now["training"] == snap["training"]
    assert now["requires_grad"] == snap["requires_grad"]
    for kind in ("params", "buffers", "grads"):
        assert now[kind].keys() == snap[kind].keys()
        for k, v in snap[kind].items():
            w = now[kind][k]
            assert (v is None) == (w is None), (kind, k)
            if v is not None:
                assert torch.equal(v, w), (kind, k)


def example_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def loop_sq_norms(model, inputs, targets, output_fn=None) -> torch.Tensor:
    """||∇ℓ(x_i, y_i)||² one example at a time (eval mode, mean CE over rows)."""
    model = copy.deepcopy(model)
    out = []
    with eval_mode(model):
        for i in range(len(targets)):
            xi = (
                inputs[i : i + 1]
                if isinstance(inputs, torch.Tensor)
                else {k: v[i : i + 1] for k, v in inputs.items()}
            )
            o = model(xi) if isinstance(xi, torch.Tensor) else model(**xi)
            o = o if output_fn is None else output_fn(o)
            loss = F.cross_entropy(o.reshape(-1, o.shape[-1]), targets[i].reshape(-1))
            out.append(example_grad(model, loss).square().sum())
    return torch.stack(out)


def loop_exact_fisher(model, x, output_fn=None) -> float:
    """Tr(F) with exact expectation: examples × classes (× positions, all label tuples)."""
    model = copy.deepcopy(model)
    total = 0.0
    with eval_mode(model):
        for i in range(len(x)):
            with torch.no_grad():
                o = model(x[i : i + 1])
                o = o if output_fn is None else output_fn(o)
                probs = torch.softmax(o.reshape(-1, o.shape[-1]), -1)
            rows, c = probs.shape
            # all label tuples (ŷ_1, ..., ŷ_R), no independence shortcut
            for labels in torch.cartesian_prod(*[torch.arange(c)] * rows).reshape(-1, rows):
                weight = float(probs[torch.arange(rows), labels].prod())
                o = model(x[i : i + 1])
                o = o if output_fn is None else output_fn(o)
                loss = F.cross_entropy(o.reshape(-1, c), labels)
                total += weight * float(example_grad(model, loss).square().sum())
    return total / len(x)


def flat_params(model: nn.Module) -> tuple[torch.Tensor, Any]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]

    def unflatten(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = theta.split([s.numel() for s in shapes])
        return {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}

    return torch.cat([p.detach().flatten() for p in params]), unflatten


def full_hessian(model: nn.Module, x, y, loss_fn=F.cross_entropy) -> torch.Tensor:
    """The Hessian of ``loss_fn(model(x), y)`` (eval mode) over the flat trainable params."""
    model = copy.deepcopy(model).eval()
    theta, unflatten = flat_params(model)

    def loss(t):
        return loss_fn(functional_call(model, unflatten(t), (x,)), y)

    return torch.func.hessian(loss)(theta)


def likelihood_loss(likelihood: str, z: torch.Tensor, y: torch.Tensor, sigma: float = 1.0):
    """``ℓ_i`` of one example written out: the mean over its rows ``[R, C]`` with a target
    of ``−log p(y|z)`` (constants dropped); class indices (-100: none) for "categorical",
    one value per output (NaN: none) for "bernoulli" and "gaussian"."""
    z = z.reshape(-1, z.shape[-1])
    if likelihood == "categorical":
        y = y.reshape(-1)
        keep = y != -100
        return F.cross_entropy(z[keep], y[keep]) if bool(keep.any()) else z.sum() * 0
    y = y.reshape(z.shape)
    keep = ~y.isnan().all(-1)
    z, y = z[keep], y[keep]
    if not len(y):
        return z.sum() * 0
    if likelihood == "bernoulli":
        rows = F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)
    else:
        rows = (z - y).square().sum(-1) / (2 * sigma**2)
    return rows.mean()


def loop_likelihood_grads(model, inputs, targets, likelihood, output_fn=None, sigma=1.0):
    """``[N, d]``: ∇_θ ℓ_i (:func:`likelihood_loss`), one autograd.grad per example, eval mode."""
    model = copy.deepcopy(model)
    rows = []
    with eval_mode(model):
        for i in range(len(targets)):
            o = model(inputs[i : i + 1])
            o = o if output_fn is None else output_fn(o)
            rows.append(example_grad(model, likelihood_loss(likelihood, o, targets[i], sigma)))
    return torch.stack(rows)

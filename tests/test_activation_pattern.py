"""ActivationPattern: each piecewise operation, replayed at a shifted input, is the base
point's piece, written out here by hand in float64 (the brute force), with the base point's
value and gradient."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fisher_optim.activation_pattern import ActivationPattern, PatternMismatch

Op = Callable[[Tensor], Tensor]


def _x(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


def _unfold_argmax(x: Tensor, k: int) -> Tensor:
    """Winners of a k×k, stride-k max pool of ``x`` [N, C, H, W], as flat H·W indices."""
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), k, stride=k)  # [N·C, k·k, L]
    pos = cols.argmax(1)  # [N·C, L]
    rows, colsi = pos // k, pos % k
    lh, lw = h // k, w // k
    oy = torch.arange(lh).repeat_interleave(lw) * k
    ox = torch.arange(lw).repeat(lh) * k
    return ((oy + rows) * w + (ox + colsi)).reshape(n, c, lh, lw)


# (name, the operation, the piece at base x evaluated at shifted x1, written by hand)
CASES: list[tuple[str, Op, Callable[[Tensor, Tensor], Tensor]]] = [
    ("relu", F.relu, lambda x, x1: torch.where(x > 0, x1, 0.0)),
    (
        "relu inplace",
        lambda t: F.relu(t.clone(), inplace=True),
        lambda x, x1: torch.where(x > 0, x1, 0.0),
    ),
    ("Tensor.relu", lambda t: t.relu(), lambda x, x1: torch.where(x > 0, x1, 0.0)),
    ("leaky_relu", lambda t: F.leaky_relu(t, 0.2), lambda x, x1: torch.where(x > 0, x1, 0.2 * x1)),
    ("relu6", F.relu6, lambda x, x1: torch.where(x <= 0, 0.0, torch.where(x >= 6, 6.0, x1))),
    (
        "hardtanh",
        lambda t: F.hardtanh(t, -1.5, 0.5),
        lambda x, x1: torch.where(x <= -1.5, -1.5, torch.where(x >= 0.5, 0.5, x1)),
    ),
    (
        "clamp",
        lambda t: t.clamp(-1.0, 2.0),
        lambda x, x1: torch.where(x < -1, -1.0, torch.where(x > 2, 2.0, x1)),
    ),
    ("clamp_min", lambda t: torch.clamp_min(t, 0.3), lambda x, x1: torch.where(x < 0.3, 0.3, x1)),
    (
        "threshold",
        lambda t: F.threshold(t, 0.5, -2.0),
        lambda x, x1: torch.where(x > 0.5, x1, -2.0),
    ),
    (
        "hardswish",
        F.hardswish,
        lambda x, x1: torch.where(
            (x > -3) & (x < 3), x1 * (x1 + 3) / 6, torch.where(x >= 3, x1, 0.0)
        ),
    ),
    (
        "hardsigmoid",
        F.hardsigmoid,
        lambda x, x1: torch.where((x > -3) & (x < 3), x1 / 6 + 0.5, (x >= 3).double()),
    ),
    (
        "elu alpha 2",
        lambda t: F.elu(t, 2.0),
        lambda x, x1: torch.where(x > 0, x1, 2.0 * torch.expm1(x1)),
    ),
    (
        "selu",
        F.selu,
        lambda x, x1: (
            1.0507009873554805 * torch.where(x > 0, x1, 1.6732632423543772 * torch.expm1(x1))
        ),
    ),
    ("abs", torch.abs, lambda x, x1: torch.sign(x) * x1),
    (
        "softshrink",
        lambda t: F.softshrink(t, 0.5),
        lambda x, x1: torch.where(x > 0.5, x1 - 0.5, torch.where(x < -0.5, x1 + 0.5, 0.0)),
    ),
    (
        "maximum",
        lambda t: torch.maximum(t, t.flip(-1) * 0.5),
        lambda x, x1: torch.where(x >= x.flip(-1) * 0.5, x1, x1.flip(-1) * 0.5),
    ),
    (
        "max over dim",
        lambda t: t.max(dim=1).values,
        lambda x, x1: x1.gather(1, x.argmax(1, keepdim=True)).squeeze(1),
    ),
    (
        "max keepdim",
        lambda t: torch.max(t, 1, keepdim=True)[0],
        lambda x, x1: x1.gather(1, x.argmax(1, keepdim=True)),
    ),
    (
        "max all",
        lambda t: t.max().reshape(1),
        lambda x, x1: x1.reshape(-1)[x.reshape(-1).argmax()].reshape(1),
    ),
    (
        "amax",
        lambda t: t.amax(dim=(2, 3)),
        lambda x, x1: x1.flatten(2).gather(2, x.flatten(2).argmax(2, keepdim=True)).squeeze(2),
    ),
    (
        "topk",
        lambda t: t.topk(2, dim=1).values,
        lambda x, x1: x1.gather(1, x.topk(2, dim=1).indices),
    ),
    ("sort", lambda t: t.sort(dim=-1).values, lambda x, x1: x1.gather(-1, x.argsort(dim=-1))),
    (
        "max_pool2d",
        lambda t: F.max_pool2d(t, 2),
        lambda x, x1: (
            x1.flatten(-2)
            .gather(-1, _unfold_argmax(x, 2).flatten(-2))
            .view(*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)
        ),
    ),
    (
        "MaxPool2d module",
        torch.nn.MaxPool2d(2),
        lambda x, x1: (
            x1.flatten(-2)
            .gather(-1, _unfold_argmax(x, 2).flatten(-2))
            .view(*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)
        ),
    ),
    ("mask by comparison", lambda t: t * (t > 0.1), lambda x, x1: x1 * (x > 0.1)),
    (
        "where on comparison",
        lambda t: torch.where(t.abs() < 1, t * t, t),
        lambda x, x1: torch.where(x.abs() < 1, x1 * x1, x1),
    ),
]


@pytest.mark.parametrize("name,op,piece", CASES, ids=[c[0] for c in CASES])
def test_replay_is_the_base_points_piece(name: str, op: Op, piece: Callable) -> None:
    x = _x(3, 4, 4, 4)
    shifted = x + _x(3, 4, 4, 4, seed=1) * 0.7  # large enough that elements change piece
    pattern = ActivationPattern()
    with pattern.record():
        base = op(x)
    assert len(pattern) >= 1
    with pattern.replay():
        again = op(x)
    torch.testing.assert_close(again, base, rtol=1e-15, atol=1e-15)  # same value, to rounding
    with pattern.replay():
        at_shift = op(shifted)
    torch.testing.assert_close(at_shift, piece(x, shifted), rtol=1e-12, atol=1e-12)
    # the piece's gradient at the base point is the operation's own (to 1e-7: torch's
    # hardsigmoid backward multiplies by a float32 1/6, also in float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    w = _x(*base.shape, seed=2)
    (g_op,) = torch.autograd.grad((op(a) * w).sum(), a)
    with pattern.replay():
        (g_replay,) = torch.autograd.grad((op(b) * w).sum(), b)
    torch.testing.assert_close(g_replay, g_op, rtol=1e-7, atol=1e-12)


def test_max_pool_with_indices_and_adaptive_pool() -> None:
    x = _x(2, 3, 6, 6)
    x1 = x + _x(2, 3, 6, 6, seed=1)
    pattern = ActivationPattern()
    with pattern.record():
        out, idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        ada = F.adaptive_max_pool2d(x, 2)
    with pattern.replay():
        out1, idx1 = F.max_pool2d(x1, 3, stride=2, padding=1, return_indices=True)
        ada1 = F.adaptive_max_pool2d(x1, 2)
    assert torch.equal(idx1, idx)
    torch.testing.assert_close(out1, x1.flatten(-2).gather(-1, idx.flatten(-2)).view(out.shape))
    _, ada_idx = F.adaptive_max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(ada1, x1.flatten(-2).gather(-1, ada_idx.flatten(-2)).view(ada.shape))


def test_another_sequence_of_piecewise_calls_raises() -> None:
    x = _x(4, 5)
    pattern = ActivationPattern()
    with pattern.record():
        F.relu(x)
    with pytest.raises(PatternMismatch, match="max_pool|topk|recorded"), pattern.replay():
        x.topk(2)
    with pytest.raises(PatternMismatch, match="made 0 piecewise calls"), pattern.replay():
        x.tanh()


def test_unreplayable_piecewise_operations_are_counted() -> None:
    pattern = ActivationPattern()
    with pattern.record():
        F.rrelu(_x(4, 5), training=False)
        torch.quantile(_x(7), 0.5)
    assert dict(pattern.unreplayed) == {"rrelu": 1, "quantile": 1}

"""What the penalty pass sees: gradient accumulation (the last micro-batch) and BatchNorm
(train-mode batch statistics, running statistics never updated).

Gradient accumulation: several forward/backward calls before one ``step()``. The forward hook
keeps only the latest training-mode input, so the penalty gradient is computed on the *last*
micro-batch, and it is added to the accumulated ``p.grad`` once, in ``step()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD, penalty_gradient

SEED = 11
LR, ALPHA = 0.1, 0.5


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double()


def _micro_batches(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=g, dtype=torch.float64),
            torch.randint(4, (size,), generator=g),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_accumulation_uses_last_micro_batch_once(mode: str) -> None:
    model = _mlp()
    opt = FisherPenaltySGD(model, lr=LR, alpha=ALPHA, every=1, mode=mode, seed=SEED)
    micro = _micro_batches(3)
    opt.zero_grad()
    for x, y in micro:
        (F.cross_entropy(model(x), y) / len(micro)).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)  # a forward of `model` itself would be captured as the batch
    last = penalty_gradient(
        twin, micro[-1][0], mode=mode, generator=torch.Generator().manual_seed(SEED)
    )
    first = penalty_gradient(
        twin, micro[0][0], mode=mode, generator=torch.Generator().manual_seed(SEED)
    )
    opt.step()

    for cached, e, f in zip(opt._cache, last, first):
        assert torch.equal(cached, e)
        assert not torch.equal(cached, f)
    for p, p0, g, h in zip(model.parameters(), before, accumulated, last):
        # p ← p − lr (g + α h) with SGD's fused operations: the penalty is added once
        assert torch.equal(p, p0.add(g.add(h, alpha=ALPHA), alpha=-LR))


def test_accumulation_counts_optimizer_steps_not_micro_batches() -> None:
    model = _mlp()
    opt = FisherPenaltySGD(model, lr=LR, alpha=ALPHA, every=2, seed=SEED)
    for step in range(4):
        opt.zero_grad()
        for x, y in _micro_batches(3, seed=step):
            (F.cross_entropy(model(x), y) / 3).backward()
        opt.step()
        assert opt._batch is None
    assert opt.step_count == 4
    assert opt.refreshes == 2


def _buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_batchnorm_penalty_pass_uses_batch_stats_and_updates_nothing(mode: str) -> None:
    model = _bn_model()
    opt = FisherPenaltySGD(model, lr=LR, momentum=0.9, alpha=ALPHA, every=1, mode=mode, seed=SEED)
    generator = torch.Generator().manual_seed(SEED)
    for step, (x, y) in enumerate(_micro_batches(3, size=6)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # the training forward updates the stats
        running = _buffers(model)
        # a copy with the same weights, BN in train mode (batch statistics)
        twin = copy.deepcopy(model)
        expected = penalty_gradient(twin, x, mode=mode, generator=generator)
        opt.step()
        # the penalty pass(es) left running_mean, running_var, num_batches_tracked untouched
        assert all(torch.equal(b, r) for b, r in zip(model.buffers(), running))
        assert int(model[1].num_batches_tracked) == step + 1
        for cached, e in zip(opt._cache, expected):
            assert torch.equal(cached, e)

    # batch statistics, not the running ones: the eval-mode penalty is different
    twin = copy.deepcopy(model)
    with_batch_stats = penalty_gradient(
        twin, x, mode=mode, generator=torch.Generator().manual_seed(SEED)
    )
    twin.eval()
    with_running_stats = penalty_gradient(
        twin, x, mode=mode, generator=torch.Generator().manual_seed(SEED)
    )
    assert any(not torch.allclose(a, b) for a, b in zip(with_batch_stats, with_running_stats))

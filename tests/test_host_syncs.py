"""Host synchronisations in the optimizers' hot path, counted on every selected device.

``benchmarks.common.syncs.SyncCounter`` counts every operation that makes the host wait for
the device (``item``/``bool``/``float`` of a tensor, ``tolist``, ``nonzero``, boolean-mask
indexing, copies to the host; on CUDA also ``torch.cuda.set_sync_debug_mode``'s reports).
The budget: an ordinary step of FisherPenaltySGD reads nothing back; a refresh reads one
batch of three numbers (penalty value, finiteness check, gradient norm), so the steps
between syncs are ``every``. FisherNoiseSGD: none per ordinary step, two per diagonal
estimate (the trace, and the model-as-found check of the buffers), one per "full" draw.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common.syncs import SyncCounter
from fisher_optim import FisherNoiseSGD, FisherPenaltySGD

STEPS = 21


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).to(device)


def _syncs_per_step(
    model: nn.Module, opt: torch.optim.Optimizer, targets: bool = False
) -> list[int]:
    """Host syncs inside each ``opt.step()`` (the training loop's own are not counted)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g).to(device), torch.randint(5, (8,), generator=g)
    y = y.to(device)
    counts = []
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if targets:
            opt.set_targets(y)
        with SyncCounter() as counter:
            opt.step()
        # on CUDA the runtime's own count also sees syncs inside an operator's kernel
        counts.append(max(counter.count, counter.cuda_warnings))
    return counts


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="exact"),
        dict(mode="finite_difference"),
        dict(mode="exact", spike_factor=None),
        dict(mode="exact", max_grad_norm=1.0),
        dict(mode="exact", penalty="gradient"),
        dict(mode="finite_difference", penalty="input_gradient"),
    ],
    ids=lambda kw: "-".join(f"{v}" for v in kw.values()),
)
def test_penalty_one_sync_per_refresh_none_in_between(device: torch.device, kwargs: dict) -> None:
    model = _model(device)
    opt = FisherPenaltySGD(model, lr=0.01, momentum=0.9, alpha=0.01, every=10, **kwargs)
    counts = _syncs_per_step(model, opt, targets=kwargs.get("penalty") is not None)
    assert counts == [1 if step % 10 == 0 else 0 for step in range(STEPS)]
    assert opt.refreshes == 3


def test_penalty_every_step_refreshes_one_sync_each(device: torch.device) -> None:
    model = _model(device)
    opt = FisherPenaltySGD(model, lr=0.01, alpha=0.01, every=1, mode="finite_difference")
    assert _syncs_per_step(model, opt) == [1] * STEPS


def test_noise_no_sync_between_estimates(device: torch.device) -> None:
    model = _model(device)
    opt = FisherNoiseSGD(model, lr=0.01, small_batch_size=2, every=10)
    counts = _syncs_per_step(model, opt)
    first = counts[0]  # the first estimate also checks how the batch is cut (once)
    assert counts[1:] == [1 if step % 10 == 0 else 0 for step in range(1, STEPS)]
    assert first <= 4
    assert opt.noise_norm is not None and opt.noise_norm > 0  # read lazily, a float
    assert isinstance(opt.noise_norm, float)


def test_noise_full_covariance_one_sync_per_draw(device: torch.device) -> None:
    model = _model(device)
    opt = FisherNoiseSGD(model, lr=0.01, small_batch_size=2, covariance="full")
    assert _syncs_per_step(model, opt) == [1] * STEPS


def test_counter_sees_each_kind_of_sync() -> None:
    x = torch.arange(4.0)
    with SyncCounter() as counter:
        y = x * 2  # no sync
        float(y.sum())
        bool(y[0] == 0)
        y.tolist()
        y[y > 2]
        torch.nonzero(y)
    assert dict(counter.ops) == {
        "_local_scalar_dense": 2,
        "tolist": 1,
        "index(bool mask)": 1,
        "nonzero": 1,
    }
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0, 3.0]  # unpatched

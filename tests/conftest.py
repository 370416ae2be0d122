"""Shared fixtures: tiny models and batches, float64 where the test compares numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


def tiny_mlp(dtype: torch.dtype = torch.float64, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 4)).to(dtype)


def small_cnn(dtype: torch.dtype = torch.float64, bn: bool = True) -> nn.Module:
    """A small CNN with smooth activations (and BatchNorm): conv-BN-tanh-avgpool-conv-GELU-fc."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6) if bn else nn.Identity(),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    ).to(dtype)


def seeded_mlp() -> nn.Module:
    """A fixed-seed 6-16-5 tanh MLP (float32), the same every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))


def seeded_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a fixed stream: 8 inputs of size 6 and targets in 0..4."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randint(5, (8,), generator=g)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

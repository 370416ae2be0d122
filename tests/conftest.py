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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

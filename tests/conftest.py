"""Shared fixtures: tiny models and batches, float64 where the test compares numbers."""

from __future__ import annotations

import os

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


#: Environment variable naming the devices of the ``device`` fixture, comma-separated:
#: ``FISHER_OPTIM_TEST_DEVICES=cpu,cuda``. CPU is always included; CUDA only when named here
#: (and skipped, not failed, when no GPU is present).
DEVICES_ENV = "FISHER_OPTIM_TEST_DEVICES"
KNOWN_DEVICES = ("cpu", "cuda")


def selected_devices() -> list[str]:
    """The device types named by :data:`DEVICES_ENV` (default ``cpu``), CPU first."""
    names = [d.strip() for d in os.environ.get(DEVICES_ENV, "cpu").split(",") if d.strip()]
    unknown = sorted(set(names) - set(KNOWN_DEVICES))
    if unknown:
        raise ValueError(
            f"{DEVICES_ENV} names unknown devices {unknown}; valid: {', '.join(KNOWN_DEVICES)} "
            f"(e.g. {DEVICES_ENV}=cpu,cuda)"
        )
    return ["cpu", *(d for d in KNOWN_DEVICES if d != "cpu" and d in names)]


@pytest.fixture(params=selected_devices())
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each selected device in turn: CPU always, CUDA when selected and present."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{DEVICES_ENV} selects cuda, but CUDA is not available")
    return torch.device(request.param)

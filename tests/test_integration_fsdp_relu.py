"""FSDP2 (gloo, two processes) on a ReLU/max-pool CNN: the sharded finite difference, on the
base point's activation pattern, against the unsharded float64 exact penalty gradient of
the global batch with the same labels."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fisher_optim.batch import Batch
from fisher_optim.differentiation import exact_penalty_gradient, finite_difference_penalty_gradient
from fisher_optim.penalty import PenaltyObjective

from .distributed_utils import run_on_ranks

WORLD, LOCAL = 2, 16

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and hasattr(fsdp, "fully_shard")),
    reason="torch.distributed with gloo and FSDP2 (fully_shard) is not available",
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * LOCAL, 3, 16, 16, generator=g)
    return x, torch.randint(10, (WORLD * LOCAL,), generator=g)


def _scenario(rank: int, work_dir: str) -> dict[str, Any]:
    model = _model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    x, labels = _data()
    out = {}
    for replay in (True, False):
        objective = PenaltyObjective(model, Batch((x[rank * LOCAL : (rank + 1) * LOCAL],)))
        objective.labels = labels[rank * LOCAL : (rank + 1) * LOCAL]
        grads = finite_difference_penalty_gradient(objective, replay=replay).grads
        out[replay] = [g.full_tensor() for g in grads]
    return out


def test_sharded_difference_on_relu_network_matches_unsharded_exact() -> None:
    ranks = run_on_ranks(_scenario, WORLD)
    model = copy.deepcopy(_model()).double()
    x, labels = _data()
    objective = PenaltyObjective(model, Batch((x.double(),)))
    objective.labels = labels
    exact = torch.cat([g.flatten() for g in exact_penalty_gradient(objective).grads])
    for replay, bound in ((True, 0.01), (False, None)):
        got = torch.cat([g.flatten().double() for g in ranks[0][replay]])
        other = torch.cat([g.flatten().double() for g in ranks[1][replay]])
        assert torch.equal(got, other)  # every rank holds the same global-batch gradient
        error = ((got - exact).norm() / exact.norm()).item()
        if bound is not None:
            assert error < bound, error

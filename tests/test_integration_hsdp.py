"""HSDP on CPU (gloo, four processes): ``fully_shard`` over a 2-D device mesh, 2 replicas × 2
shards, with the finite-difference penalty.

The backward averages the gradient over all four ranks' slices of the global batch, and the
finite difference sums its norms over the shard dimension only, so the update equals a
brute-force one (explicit double backprop) on the whole batch in one process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherNoiseSGD, FisherPenaltySGD

from .distributed_utils import run_on_ranks
from .test_integration_fsdp import _sampled_labels
from .test_integration_noise_ranks import SEED as NOISE_SEED
from .test_integration_noise_ranks import _brute_force, _check

WORLD = 4
LOCAL_BATCH = 3
STEPS = 3
SEED = 1234
LR, ALPHA = 0.1, 0.5

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and hasattr(fsdp, "fully_shard")),
    reason="torch.distributed with gloo and FSDP2 (fully_shard) is not available",
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(3, (WORLD * LOCAL_BATCH,), generator=g)


def _scenarios(rank: int, work_dir: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))

    def sharded() -> nn.Module:
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer, mesh=mesh)
        return fsdp.fully_shard(model, mesh=mesh)

    def train(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[Any, Any]]:
        logged = []
        for step in range(STEPS):
            x, y = (t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH] for t in _global_batch(step))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            logged.append((getattr(opt, "noise_norm", None), getattr(opt, "fisher_trace", None)))
        return logged

    model = sharded()
    opt = FisherPenaltySGD(model, lr=LR, alpha=ALPHA, every=1, seed=SEED, mode="finite_difference")
    train(model, opt)
    noisy = sharded()
    noise_opt = FisherNoiseSGD(noisy, lr=LR, small_batch_size=2, every=2, seed=NOISE_SEED)
    logged = train(noisy, noise_opt)
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "placements": [str(p.placements) for p in model.parameters()],
        "refreshes": opt.refreshes,
        "penalty_value": opt.penalty_value,
        "noise": {
            "params": [p.full_tensor().detach().clone() for p in noisy.parameters()],
            "logged": logged,
        },
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_scenarios, WORLD)


def _reference(alpha: float = ALPHA) -> tuple[list[torch.Tensor], float]:
    """θ ← θ − lr (∇L + α ∇P) on the whole batch, ∇P by explicit double backprop; and the
    last refresh's P."""
    model = _model()
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        x, y = _global_batch(step)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        logits = model(x)
        labels = _sampled_labels(logits.detach(), generator)
        g = torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True)
        value = sum(t.pow(2).sum() for t in g)
        hv = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, d, h in zip(params, grads, hv):
                p -= LR * (d + alpha * h)
    return [p.detach() for p in params], float(value)


@pytest.mark.slow  # four processes: about 45 s on two cores
def test_hsdp_update_equals_one_process_on_the_global_batch(ranks: list[dict]) -> None:
    (expected, value), (unpenalised, _) = _reference(), _reference(alpha=0.0)
    start = [p.detach() for p in _model().parameters()]
    scale = sum(float((q - s).pow(2).sum()) for q, s in zip(expected, start)) ** 0.5
    assert (
        sum(float((p - q).pow(2).sum()) for p, q in zip(expected, unpenalised)) ** 0.5
        > 1e-3 * scale
    )
    for rank in ranks:
        assert rank["refreshes"] == STEPS
        assert "Replicate()" in rank["placements"][0] and "Shard(dim=0)" in rank["placements"][0]
        error = sum(float((p - q).pow(2).sum()) for p, q in zip(rank["params"], expected)) ** 0.5
        assert error < 1e-6 * scale
        # the norms are summed over the shards, not over the replicas too
        assert rank["penalty_value"] == pytest.approx(value, rel=1e-6)


@pytest.mark.slow  # the same four processes
def test_hsdp_fisher_noise_equals_one_process_on_the_global_batch(ranks: list[dict]) -> None:
    """FisherNoiseSGD over the 2-D mesh: the estimate summed over all four ranks' examples,
    ``||n||`` over the shards only; the brute force of tests/test_integration_noise_ranks.py
    on the whole batch (the same learning rate, small batch and refresh schedule)."""
    expected = _brute_force(make=_model, batches=_global_batch, steps=STEPS)
    for rank in ranks:
        _check(rank["noise"], expected, _model())

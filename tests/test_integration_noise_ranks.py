"""FisherNoiseSGD on two gloo ranks (FSDP2 and DDP, CPU, float64) equals one process on the
global batch.

The reference is brute force on the unsharded model and the whole batch of 12 examples in
one process, written out here: per-example gradients by one backward per example,
``diag F = (1/M) Σ_i g_i ⊙ g_i`` (``Tr F`` for ``"trace"``), the labels drawn as one process
draws them for the whole batch (one uniform per row from the refresh's generator), the
noise ``n = scale · sqrt(diag F) ⊙ ξ`` with ``ξ`` one flat standard normal draw over all
parameter entries from the optimizer's generator, and ``θ ← θ − lr (∇L + n)``. Under FSDP2
each rank holds a shard of every parameter, the estimate is all-reduced and each rank adds
its shard of ``n``; the update, the estimate and ``||n||`` match the reference to float64
rounding, on both layouts. A resume through ``torch.distributed.checkpoint`` is bitwise.
All the scenarios run inside one ``torch.multiprocessing.spawn`` (module-scoped fixture).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherNoiseSGD
from fisher_optim.fisher_noise_sgd import mixed_seed

from .distributed_utils import run_on_ranks
from .test_integration_fsdp import (
    WORLD,
    _full,
    _global_batch,
    _model,
    _ordered,
    _relative,
    _shard,
    _sharded,
    fsdp,
)

STEPS = 4
SEED = 77
LR, M_S, EVERY = 0.1, 2, 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and hasattr(fsdp, "fully_shard")),
    reason="torch.distributed with gloo and FSDP2 (fully_shard) is not available",
)

# name -> FisherNoiseSGD keywords
CASES: dict[str, dict[str, Any]] = {
    "diagonal": dict(covariance="diagonal"),
    "trace": dict(covariance="trace"),
    "empirical": dict(covariance="diagonal", fisher="empirical"),
    "head": dict(covariance="diagonal", estimate_batch_size=4),
}


def _optimizer(model: nn.Module, **kwargs: Any) -> FisherNoiseSGD:
    kwargs.setdefault("every", EVERY)
    return FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, seed=SEED, **kwargs)


def _train(
    model: nn.Module, opt: FisherNoiseSGD, rank: int, steps: range, head: int | None = None
) -> list[tuple[float | None, float | None]]:
    """Train on this rank's slice of each global batch; ``(||n||, Tr F)`` per step."""
    logged = []
    for step in steps:
        x, y = _global_batch(step)
        opt.zero_grad()
        F.cross_entropy(model(_shard(x, rank)), _shard(y, rank)).backward()
        opt.set_targets(_shard(y, rank))
        opt.step()
        logged.append((opt.noise_norm, opt.fisher_trace))
    return logged


def _params(model: nn.Module) -> list[torch.Tensor]:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return [p.detach().clone() for p in model.module.parameters()]
    return _full(model)


FULL = dict(covariance="full", every=1)


def _run(rank: int, kwargs: dict[str, Any], ddp: bool = False) -> dict[str, Any]:
    model = nn.parallel.DistributedDataParallel(_model()) if ddp else _sharded()
    opt = _optimizer(model, **kwargs)
    logged = _train(model, opt, rank, range(STEPS))
    return {"params": _params(model), "logged": logged, "refreshes": opt.refreshes}


def _checkpoint(rank: int, path: str) -> dict[str, Any]:
    """Train 6 steps straight, or 3, save model and optimizer through
    torch.distributed.checkpoint (get_state_dict, dcp.save), rebuild, load (dcp.load,
    set_state_dict) and train 3 more: step 3 reuses the estimate of step 2 from the
    checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    kw = dict(momentum=0.9)
    model = _sharded()
    opt = _optimizer(model, **kw)
    get_state_dict(model, opt)  # initialises the empty state: must not count as a step
    _train(model, opt, rank, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    cache_type = type(optim_sd["param_groups"][0]["fisher_optim"]["cache"][0]).__name__
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    straight = _train(model, opt, rank, range(3, 6)), _full(model), opt.refreshes

    model2 = _sharded()
    opt2 = _optimizer(model2, **kw)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    resumed = _train(model2, opt2, rank, range(3, 6)), _full(model2), opt2.refreshes
    return {"cache_type": cache_type, "straight": straight, "resumed": resumed}


def _scenarios(rank: int, work_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {name: _run(rank, kw) for name, kw in CASES.items()}
    results["ddp"] = _run(rank, CASES["diagonal"], ddp=True)
    results["ddp_head"] = _run(rank, CASES["head"], ddp=True)
    results["ddp_full"] = _run(rank, FULL, ddp=True)
    results["full"] = _run(rank, FULL)
    results["dcp"] = _checkpoint(rank, str(Path(work_dir) / "checkpoint"))
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_scenarios, WORLD)


# ------------------------------------------------------------------ one process, by hand


def _labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ŷ ~ softmax: one uniform per row, the first class whose cumulative probability
    exceeds it (the documented rule)."""
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, generator=generator)
    cdf = torch.softmax(logits.float(), -1).double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def _brute_force(
    covariance: str = "diagonal",
    fisher: str = "true",
    estimate_batch_size: int | None = None,
    noise: bool = True,
    every: int = EVERY,
    make: Callable[[], nn.Module] = _model,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = _global_batch,
    steps: int = STEPS,
) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
    """θ ← θ − lr (∇L + n) on the whole batch of 12 (see the module docstring); the
    parameters and ``(||n||, Tr F)`` of every step (``make``: the model, ``batches``: the
    global batch of each of ``steps`` steps). ``"full"``: ``n = scale · (1/sqrt(M))
    Σ_i z_i g_i``, the labels and then ``z`` (one normal per example) drawn from the step's
    generator, and ``Tr F`` the single-draw estimate ``||Σ_i z_i g_i||² / M``."""
    model = make()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    xi_generator = torch.Generator().manual_seed(SEED)
    refreshes, diag, trace, logged = 0, None, None, []
    for step in range(steps):
        x, y = batches(step)
        scale = math.sqrt((len(x) - M_S) / (len(x) * M_S))
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        if step % every == 0:
            refreshes += 1
            xe, ye = (_ordered(t, estimate_batch_size) for t in (x, y))
            if estimate_batch_size is not None:
                xe, ye = xe[:estimate_batch_size], ye[:estimate_batch_size]
            if fisher == "true":
                label_generator = torch.Generator().manual_seed(mixed_seed(SEED, refreshes))
                ye = _labels(model(xe).detach(), label_generator)
            rows = []
            for xi, yi in zip(xe, ye):
                g = torch.autograd.grad(F.cross_entropy(model(xi[None]), yi[None]), params)
                rows.append(torch.cat([t.reshape(-1) for t in g]))
            per_example = torch.stack(rows)
            diag = per_example.pow(2).mean(0)
            trace = float(diag.sum())
            if covariance == "trace":
                diag = torch.full_like(diag, trace / d)
        if covariance == "full":
            z = torch.randn(len(xe), dtype=torch.float64, generator=label_generator)
            v = (z[:, None] * per_example).sum(0) / math.sqrt(len(xe))
            n, trace = scale * v, float(v.pow(2).sum())
        else:
            xi = torch.randn(d, dtype=torch.float64, generator=xi_generator)
            n = scale * diag.sqrt() * xi
        logged.append((float(n.norm()), trace))
        with torch.no_grad():
            offset = 0
            for p, g in zip(params, grads):
                step_noise = n[offset : offset + p.numel()].view_as(p)
                p -= LR * (g + (step_noise if noise else 0))
                offset += p.numel()
    return [p.detach() for p in params], logged


def _check(
    rank: dict,
    expected: tuple[list[torch.Tensor], list[tuple[float, float]]],
    start: nn.Module | None = None,
) -> None:
    """The update (relative to the brute force's, from ``start``), ``||n||`` and ``Tr F`` of
    every step to float64 rounding."""
    params, logged = expected
    assert _relative(rank["params"], params, _model() if start is None else start) < 1e-9
    for (norm, trace), (norm_ref, trace_ref) in zip(rank["logged"], logged, strict=True):
        assert norm == pytest.approx(norm_ref, rel=1e-9)
        assert trace == pytest.approx(trace_ref, rel=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp2_update_equals_one_process_on_the_global_batch(ranks: list[dict], name: str) -> None:
    """The 2-rank sharded update, ``||n||`` and ``Tr F`` of every step equal the brute-force
    one-process ones to float64 rounding; the noise moves the parameters far more."""
    expected = _brute_force(**CASES[name])
    without_noise = _brute_force(**CASES[name], noise=False)[0]
    assert _relative(without_noise, expected[0], _model()) > 1e-2
    for rank in ranks:
        assert rank[name]["refreshes"] == STEPS // EVERY
        _check(rank[name], expected)
    for p, q in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
        assert torch.equal(p, q)


DDP_CASES = {"ddp": CASES["diagonal"], "ddp_head": CASES["head"], "ddp_full": FULL}


@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_update_equals_one_process_on_the_global_batch(ranks: list[dict], name: str) -> None:
    """Under DDP the labels (and the full covariance's z) are those one process draws for
    the whole batch, too."""
    expected = _brute_force(**DDP_CASES[name])
    for rank in ranks:
        _check(rank[name], expected)


def test_one_process_equals_the_brute_force() -> None:
    """The library on the whole batch in this process, no process group."""
    model = _model()
    opt = _optimizer(model)
    logged = []
    for step in range(STEPS):
        x, y = _global_batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        logged.append((opt.noise_norm, opt.fisher_trace))
    _check({"params": [p.detach() for p in model.parameters()], "logged": logged}, _brute_force())


def test_fsdp2_full_covariance_equals_one_process(ranks: list[dict]) -> None:
    """``"full"`` on the gathered parameters, ``Σ_i z_i g_i`` all-reduced, each rank adding
    its shard: the brute-force one-process update, every step a refresh."""
    expected = _brute_force(**FULL)
    for rank in ranks:
        assert rank["full"]["refreshes"] == STEPS
        _check(rank["full"], expected)


def test_distributed_checkpoint_resume_is_bitwise(ranks: list[dict]) -> None:
    for rank in ranks:
        result = rank["dcp"]
        assert result["cache_type"] == "DTensor"
        (logged, params, refreshes), (logged2, params2, refreshes2) = (
            result["straight"],
            result["resumed"],
        )
        assert logged == logged2 and refreshes == refreshes2 == 3
        assert all(torch.equal(p, q) for p, q in zip(params, params2))

"""DistributedDataParallel on CPU (gloo, two processes).

The penalty gradient is computed per rank on the local batch through the unwrapped module (no
DDP reducer hook fires) and averaged over the ranks with one all-reduce per refresh, so every
rank adds the same ``alpha * mean_r ∇||g_r||²`` and the parameters stay bitwise identical.

All the scenarios run inside one ``torch.multiprocessing.spawn`` (module-scoped fixture), so
the processes and the process group start only once.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD, penalty_gradient

from .distributed_utils import run_on_ranks

WORLD = 2
LOCAL_BATCH = 6
STEPS = 5
SEED = 1234

HAS_NOISE = importlib.util.find_spec("fisher_optim.fisher_noise_sgd") is not None

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _global_batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 5, generator=g).to(dtype)
    y = torch.randint(4, (WORLD * LOCAL_BATCH,), generator=g)
    return x, y


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


# name -> (optimizer, dtype, optimizer kwargs); "penalty" is FisherPenaltySGD.
SCENARIOS: dict[str, tuple[str, torch.dtype, dict[str, Any]]] = {
    "fp_exact": ("penalty", torch.float32, dict(mode="exact", every=2)),
    "fp_fd": ("penalty", torch.float32, dict(mode="finite_difference", every=2)),
    # deterministic penalties, compared with a single-process reference (float64)
    "gp_exact": ("penalty", torch.float64, dict(mode="exact", every=1, penalty="gradient")),
    "gpr_fd": (
        "penalty",
        torch.float64,
        dict(mode="finite_difference", every=1, penalty="random_label"),
    ),
}
if HAS_NOISE:
    SCENARIOS["noise"] = ("noise", torch.float32, dict(small_batch_size=2, every=2))
    SCENARIOS["noise_full"] = ("noise", torch.float32, dict(small_batch_size=2, covariance="full"))


def _make_optimizer(kind: str, model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    if kind == "penalty":
        return FisherPenaltySGD(model, lr=0.1, alpha=0.5, seed=SEED, **kwargs)
    from fisher_optim.fisher_noise_sgd import FisherNoiseSGD

    return FisherNoiseSGD(model, lr=0.1, seed=SEED, **kwargs)


def _run_rank(rank: int, kind: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp = nn.parallel.DistributedDataParallel(_model(dtype))
    buckets = {"n": 0}

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        # counts DDP's own gradient reductions
        buckets["n"] += 1
        buckets["inside"] = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            buckets["inside"] = False

    ddp.register_comm_hook(None, counting_hook)
    opt = _make_optimizer(kind, ddp, kwargs)

    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kw: Any) -> Any:
        if not buckets.get("inside"):  # not DDP's gradient reduction (the hook above)
            calls["n"] += 1
        return real_all_reduce(*args, **kw)

    dist.all_reduce = counting_all_reduce
    try:
        for step in range(STEPS):
            x, y = _global_batch(step, dtype)
            opt.zero_grad()
            F.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank)).backward()
            if kwargs.get("penalty") == "gradient":
                opt.set_targets(_shard(y, rank))
            opt.step()
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "params": [p.detach().clone() for p in ddp.module.parameters()],
        "all_reduces": calls["n"],
        "ddp_buckets": buckets["n"],
        "refreshes": getattr(opt, "refreshes", None),
        "penalty_value": getattr(opt, "penalty_value", None),
    }


def _bare_model_warnings(rank: int) -> list[str]:
    """Messages warned when the optimizer is built on the model without its DDP wrapper."""
    import warnings

    model = _model(torch.float32)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, every=1)
    x, y = _global_batch(0, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(_shard(x, rank)), _shard(y, rank)).backward()
            opt.step()
    return [str(w.message) for w in caught]


def _scenarios(rank: int, work_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {
        name: _run_rank(rank, kind, dtype, kwargs)
        for name, (kind, dtype, kwargs) in SCENARIOS.items()
    }
    results["bare_model_warnings"] = _bare_model_warnings(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_scenarios, WORLD)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parameters_bitwise_identical_across_ranks(ranks: list[dict], name: str) -> None:
    first, second = ranks[0][name], ranks[1][name]
    initial = list(_model(SCENARIOS[name][1]).parameters())
    assert any(not torch.equal(p, q) for p, q in zip(first["params"], initial))  # it trained
    for p, q in zip(first["params"], second["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if SCENARIOS[n][0] == "penalty"])
def test_one_all_reduce_per_refresh_and_no_reducer_hook(ranks: list[dict], name: str) -> None:
    kwargs = SCENARIOS[name][2]
    expected_refreshes = -(-STEPS // kwargs["every"])
    for rank in ranks:
        result = rank[name]
        assert result["refreshes"] == expected_refreshes
        assert result["all_reduces"] == expected_refreshes
        # DDP reduced gradients once per training backward (one bucket for this tiny model);
        # the penalty passes went through the unwrapped module and fired no reducer hook.
        assert result["ddp_buckets"] == STEPS


@pytest.mark.parametrize("name", ["gp_exact", "gpr_fd"])
def test_equals_single_process_mean_of_rank_penalties(ranks: list[dict], name: str) -> None:
    """θ ← θ − lr (mean_r ∇L_r + α mean_r ∇||∇L_r||²), simulated in this process."""
    _, dtype, kwargs = SCENARIOS[name]
    model = _model(dtype)
    params = list(model.parameters())
    generators = [torch.Generator().manual_seed(SEED) for _ in range(WORLD)]
    for step in range(STEPS):
        x, y = _global_batch(step, dtype)
        grads = [torch.zeros_like(p) for p in params]
        penalties = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            xr, yr = _shard(x, r), _shard(y, r)
            for acc, g in zip(grads, torch.autograd.grad(F.cross_entropy(model(xr), yr), params)):
                acc += g / WORLD
            pen = penalty_gradient(
                model,
                xr,
                penalty=kwargs["penalty"],
                mode=kwargs["mode"],
                targets=yr if kwargs["penalty"] == "gradient" else None,
                generator=generators[r],
            )
            for acc, g in zip(penalties, pen):
                acc += g / WORLD
        with torch.no_grad():
            for p, g, h in zip(params, grads, penalties):
                p -= 0.1 * (g + 0.5 * h)
    # Summing the ranks' penalties in another order changes the last bit; the finite
    # difference (step ~1e-7 |θ| in float64) amplifies such differences over the steps.
    tol = dict(rtol=1e-10, atol=1e-12) if kwargs["mode"] == "exact" else dict(rtol=1e-7, atol=1e-9)
    for rank in ranks:
        for p, q in zip(rank[name]["params"], params):
            torch.testing.assert_close(p, q, **tol)


def test_penalty_estimator_is_mean_of_squared_norms_not_squared_norm_of_mean() -> None:
    """Documented estimator: mean_r ||g_r||² (what DDP computes), which differs from
    ||mean_r g_r||² (the penalty of the global batch)."""
    model = _model(torch.float64)
    x, y = _global_batch(0, torch.float64)
    params = list(model.parameters())

    def grad_of(xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(F.cross_entropy(model(xs), ys), params)

    per_rank = [grad_of(_shard(x, r), _shard(y, r)) for r in range(WORLD)]
    mean_sq = sum(sum(g.pow(2).sum() for g in gs) for gs in per_rank) / WORLD
    global_g = grad_of(x, y)
    sq_mean = sum(g.pow(2).sum() for g in global_g)
    assert float(mean_sq) > float(sq_mean)  # Jensen: the mean of squares is larger


def test_a_model_without_its_ddp_wrapper_is_warned_about_once(ranks: list[dict]) -> None:
    for rank in ranks:
        messages = [m for m in rank["bare_model_warnings"] if "DistributedDataParallel" in m]
        assert len(messages) == 1 and "replicas drift apart" in messages[0]

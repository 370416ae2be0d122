"""DistributedDataParallel on CPU (gloo, two processes): one objective on every layout.

Under DDP the penalty is that of the global batch, ``||ḡ||²`` with ``ḡ`` the mean gradient
over all ranks' examples, and the sampled labels are those one process draws for the whole
batch. So the update on two ranks equals, to float64 rounding, a brute-force update
(explicit double backprop, written out here) on the whole batch in one process, and the
library's own update there; for true targets (GP), sampled labels (FP), the input-gradient
penalty (GPx), exact and finite difference, with and without ``penalty_batch_size`` and
``penalty_scale="per_row"``. An optimizer built on the model before the DDP wrap (nanoGPT's
order) gives the wrapped model's update.

All the scenarios run inside one ``torch.multiprocessing.spawn`` (module-scoped fixture).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD

from .distributed_utils import run_on_ranks

WORLD = 2
LOCAL_BATCH = 6
STEPS = 3
SEED = 1234
LR, ALPHA = 0.1, 0.5

HAS_NOISE = importlib.util.find_spec("fisher_optim.fisher_noise_sgd") is not None

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _global_batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 5, generator=g).to(dtype)
    y = torch.randint(4, (WORLD * LOCAL_BATCH,), generator=g)
    return x, y


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


# name -> FisherPenaltySGD keywords (float64, every step a refresh)
PENALTY: dict[str, dict[str, Any]] = {
    f"{short}_{mode}": dict(penalty=penalty, mode=full, every=1)
    for short, penalty in (("fp", "fisher"), ("gp", "gradient"), ("gpx", "input_gradient"))
    for mode, full in (("exact", "exact"), ("fd", "finite_difference"))
}
PENALTY["fp_exact_head"] = dict(mode="exact", every=1, penalty_batch_size=4)
PENALTY["fp_fd_head"] = dict(mode="finite_difference", every=1, penalty_batch_size=4)
PENALTY["fp_exact_per_row"] = dict(mode="exact", every=1, penalty_scale="per_row")
PENALTY["fp_fd_every2"] = dict(mode="finite_difference", every=2, momentum=0.9)


def _penalty_optimizer(model: nn.Module, kwargs: dict[str, Any]) -> FisherPenaltySGD:
    return FisherPenaltySGD(model, lr=LR, alpha=ALPHA, seed=SEED, **kwargs)


def _needs_targets(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("penalty") in ("gradient", "input_gradient")


def _train(call: nn.Module, opt: torch.optim.Optimizer, xs: list, ys: list, targets: bool) -> None:
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(call(x), y).backward()
        if targets:
            opt.set_targets(y)
        opt.step()


def _local_batches(rank: int) -> tuple[list, list]:
    batches = [_global_batch(s) for s in range(STEPS)]
    return [_shard(x, rank) for x, _ in batches], [_shard(y, rank) for _, y in batches]


def _run_penalty(rank: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    ddp = nn.parallel.DistributedDataParallel(_model())
    opt = _penalty_optimizer(ddp, kwargs)
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return real_all_reduce(*args, **kw)

    xs, ys = _local_batches(rank)
    dist.all_reduce = counting_all_reduce  # DDP's reducer runs in C++: not counted
    try:
        _train(ddp, opt, xs, ys, _needs_targets(kwargs))
    finally:
        dist.all_reduce = real_all_reduce
    return {
        "params": [p.detach().clone() for p in ddp.module.parameters()],
        "all_reduces": calls["n"],
        "refreshes": opt.refreshes,
    }


def _run_bare(rank: int) -> dict[str, Any]:
    """nanoGPT's order: the optimizer on the bare model, then the DDP wrap."""
    model = _model()
    opt = _penalty_optimizer(model, PENALTY["fp_exact"])
    ddp = nn.parallel.DistributedDataParallel(model)
    xs, ys = _local_batches(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(ddp, opt, xs, ys, False)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "warnings": [str(w.message) for w in caught],
    }


def _run_unwrapped(rank: int) -> list[str]:
    """An optimizer on a model never wrapped, in a group of 2: warned about once."""
    model = _model()
    opt = _penalty_optimizer(model, PENALTY["fp_exact"])
    xs, ys = _local_batches(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, xs[:2], ys[:2], False)
    return [str(w.message) for w in caught]


def _run_noise(rank: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    from fisher_optim import FisherNoiseSGD

    ddp = nn.parallel.DistributedDataParallel(_model(torch.float32))
    opt = FisherNoiseSGD(ddp, lr=LR, seed=SEED, **kwargs)
    batches = [_global_batch(s, torch.float32) for s in range(STEPS)]
    _train(
        ddp,
        opt,
        [_shard(x, rank) for x, _ in batches],
        [_shard(y, rank) for _, y in batches],
        False,
    )
    return {"params": [p.detach().clone() for p in ddp.module.parameters()]}


NOISE = {
    "noise": dict(small_batch_size=2, every=2),
    "noise_full": dict(small_batch_size=2, covariance="full"),
}


def _scenarios(rank: int, work_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {name: _run_penalty(rank, kw) for name, kw in PENALTY.items()}
    results["bare"] = _run_bare(rank)
    results["unwrapped_warnings"] = _run_unwrapped(rank)
    if HAS_NOISE:
        for name, kw in NOISE.items():
            results[name] = _run_noise(rank, kw)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_scenarios, WORLD)


# ------------------------------------------------------------------ one process, by hand


def _ordered(x: torch.Tensor, head: int | None) -> torch.Tensor:
    """The global batch as one process sees it: with a penalty batch of ``head`` examples
    (``head / R`` from the front of each rank's slice), those examples first."""
    if head is None:
        return x
    share = head // WORLD
    parts = [_shard(x, r) for r in range(WORLD)]
    return torch.cat([p[:share] for p in parts] + [p[share:] for p in parts])


def _sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ŷ ~ softmax: one uniform per row, the first class whose cumulative probability
    exceeds it (the documented rule)."""
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, generator=generator)
    cdf = torch.softmax(logits.float(), -1).double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def _brute_force(kwargs: dict[str, Any], alpha: float = ALPHA) -> list[torch.Tensor]:
    """θ ← θ − lr (∇L + α ∇P) on the whole batch, ∇P by explicit double backprop."""
    model = _model()
    params = list(model.parameters())
    penalty = kwargs.get("penalty", "fisher")
    head = kwargs.get("penalty_batch_size")
    generator = torch.Generator().manual_seed(SEED)
    momentum = kwargs.get("momentum", 0.0)
    buffers = [torch.zeros_like(p) for p in params]
    cache = None
    for step in range(STEPS):
        x, y = _global_batch(step)
        x, y = _ordered(x, head), _ordered(y, head)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        if step % kwargs["every"] == 0:
            xp, yp = (x, y) if head is None else (x[:head], y[:head])
            if penalty == "input_gradient":
                xp = xp.clone().requires_grad_(True)
            logits = model(xp)
            if penalty == "fisher":
                labels = _sampled_labels(logits.detach(), generator)
                loss = F.cross_entropy(logits, labels)
                if kwargs.get("penalty_scale") == "per_row":
                    loss = loss * len(labels) ** 0.5
            else:
                loss = F.cross_entropy(logits, yp)
            wrt = [xp] if penalty == "input_gradient" else params
            g = torch.autograd.grad(loss, wrt, create_graph=True)
            cache = torch.autograd.grad(sum(t.pow(2).sum() for t in g), params)
        with torch.no_grad():
            for p, b, g, h in zip(params, buffers, grads, cache):
                d = g + alpha * h
                b.mul_(momentum).add_(d) if momentum else b.copy_(d)
                p -= LR * b
    return [p.detach() for p in params]


def _one_process(kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The library on the whole batch in this process (no process group)."""
    model = _model()
    opt = _penalty_optimizer(model, kwargs)
    head = kwargs.get("penalty_batch_size")
    batches = [_global_batch(s) for s in range(STEPS)]
    xs = [_ordered(x, head) for x, _ in batches]
    ys = [_ordered(y, head) for _, y in batches]
    _train(model, opt, xs, ys, _needs_targets(kwargs))
    return [p.detach() for p in model.parameters()]


def _relative(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """``||got − expected|| / ||expected − θ₀||``: the error relative to the update."""
    start = [p.detach() for p in _model().parameters()]
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(got, expected))
    den = sum(float((b - s).pow(2).sum()) for b, s in zip(expected, start))
    return (num / den) ** 0.5


@pytest.mark.parametrize("name", list(PENALTY))
def test_two_ranks_equal_one_process_on_the_global_batch(ranks: list[dict], name: str) -> None:
    kwargs = PENALTY[name]
    expected = _brute_force(kwargs)
    # the penalty moves the parameters far more than the tolerance
    assert _relative(_brute_force(kwargs, alpha=0.0), expected) > 1e-3
    assert _relative(_one_process(kwargs), expected) < 1e-6
    for rank in ranks:
        assert _relative(rank[name]["params"], expected) < 1e-6
    for p, q in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
        assert torch.equal(p, q)  # the replicas stay bitwise identical


@pytest.mark.parametrize("name", [n for n in PENALTY if n.startswith("fp_")])
def test_all_reduces_per_refresh(ranks: list[dict], name: str) -> None:
    """Exact: ḡ and H̄ḡ (2). Forward difference (float64's default): the two passes' gradients
    (2), plus the exact check of the first refresh (2)."""
    kwargs = PENALTY[name]
    refreshes = -(-STEPS // kwargs["every"])
    extra = 2 if kwargs["mode"] == "finite_difference" else 0
    for rank in ranks:
        assert rank[name]["refreshes"] == refreshes
        assert rank[name]["all_reduces"] == 2 * refreshes + extra


def test_optimizer_built_before_the_ddp_wrap_gives_the_wrapped_update(ranks: list[dict]) -> None:
    for rank in ranks:
        assert not [m for m in rank["bare"]["warnings"] if "DistributedDataParallel" in m]
        for p, q in zip(rank["bare"]["params"], rank["fp_exact"]["params"]):
            assert torch.equal(p, q)


def test_a_model_never_wrapped_is_averaged_with_a_warning(ranks: list[dict]) -> None:
    for rank in ranks:
        messages = [m for m in rank["unwrapped_warnings"] if "DistributedDataParallel" in m]
        assert len(messages) == 1 and "averages its term over all of them" in messages[0]


@pytest.mark.skipif(not HAS_NOISE, reason="FisherNoiseSGD is not available")
@pytest.mark.parametrize("name", list(NOISE))
def test_fisher_noise_replicas_stay_bitwise_identical(ranks: list[dict], name: str) -> None:
    first, second = ranks[0][name]["params"], ranks[1][name]["params"]
    initial = list(_model(torch.float32).parameters())
    assert any(not torch.equal(p, q) for p, q in zip(first, initial))  # it trained
    assert all(torch.equal(p, q) for p, q in zip(first, second))

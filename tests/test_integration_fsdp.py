"""FSDP2 (``fully_shard``) on CPU (gloo, two processes): the finite-difference and exact penalty.

Each rank holds a shard of every parameter; the penalty gradient is taken from two sharded
backwards (:mod:`fisher_optim._fsdp`), so it is the penalty of the *global* batch, and the
labels are those one process draws for the whole batch (:mod:`fisher_optim._global_rows`).
The reference is brute force on the unsharded model and the whole batch in one process
(explicit double backprop). All the scenarios run inside one
``torch.multiprocessing.spawn`` (module-scoped fixture).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
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
STEPS = 4
SEED = 1234
LR, ALPHA, EVERY = 0.1, 0.5, 2

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and hasattr(fsdp, "fully_shard")),
    reason="torch.distributed with gloo and FSDP2 (fully_shard) is not available",
)


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)  # the last layer's 3 rows split unevenly (2 + 1) over the ranks
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)
    ).to(dtype)


def _lora_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    """LoRA adapters on a frozen base (tests/test_integration_lora.py)."""
    from .test_integration_lora import LoRALinear

    torch.manual_seed(0)
    return nn.Sequential(LoRALinear(nn.Linear(5, 8)), nn.Tanh(), LoRALinear(nn.Linear(8, 3))).to(
        dtype
    )


def _sharded(
    dtype: torch.dtype = torch.float64, make: Callable[..., nn.Module] = _model, **kwargs: Any
) -> nn.Module:
    """fully_shard per block (the model's direct children with parameters), then the root."""
    model = make(dtype)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fsdp.fully_shard(layer, **kwargs)
    return fsdp.fully_shard(model, **kwargs)


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(3, (WORLD * LOCAL_BATCH,), generator=g)


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rank: int,
    steps: range,
    dtype: torch.dtype = torch.float64,
    autocast: bool = False,
) -> None:
    """On this rank's slice of each global batch (in ``dtype``, under bfloat16 autocast)."""
    for step in steps:
        x, y = _global_batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(_shard(x.to(dtype), rank)), _shard(y, rank))
        loss.backward()
        opt.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _optimizer(
    model: nn.Module, mode: str = "finite_difference", **kwargs: Any
) -> FisherPenaltySGD:
    return FisherPenaltySGD(model, lr=LR, alpha=ALPHA, every=EVERY, seed=SEED, mode=mode, **kwargs)


def _resume(rank: int) -> dict[str, Any]:
    """Train 8 steps straight, or 4 steps, checkpoint (model and optimizer state dicts of
    DTensors), rebuild, load and train 4 more: bitwise the same, safeguard included (a
    tight spike factor and guard_early make it act)."""
    kw = dict(momentum=0.9, spike_factor=1.05, spike_window=2, guard_early=True)
    model = _sharded()
    opt = _optimizer(model, **kw)
    _train(model, opt, rank, range(4))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, rank, range(4, 8))
    straight = _full(model), opt.refreshes, opt.spikes, opt.unjudged_refreshes, opt.penalty_value

    model2 = _sharded()
    opt2 = _optimizer(model2, **kw)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, rank, range(4, 8))
    resumed = (
        _full(model2),
        opt2.refreshes,
        opt2.spikes,
        opt2.unjudged_refreshes,
        opt2.penalty_value,
    )
    return {"straight": straight, "resumed": resumed}


def _checkpoint_api(rank: int, path: str) -> dict[str, Any]:
    """The same resume through torch.distributed.checkpoint.state_dict: get/set_model_ and
    get/set_optimizer_state_dict (sharded DTensor state dicts), written with dcp.save and
    read back with dcp.load; the get on a fresh optimizer changes nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    kw = dict(momentum=0.9)
    model = _sharded()
    opt = _optimizer(model, **kw)
    get_state_dict(model, opt)  # initialises the empty state: must not count as a step
    fresh = opt.step_count, opt.refreshes, opt.param_groups[0]["lr"]
    _train(model, opt, rank, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    sharded_cache = type(optim_sd["param_groups"][0]["fisher_optim"]["cache"][0]).__name__
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    _train(model, opt, rank, range(3, STEPS + 1))
    straight = _full(model), opt.refreshes, opt.step_count

    model2 = _sharded()
    opt2 = _optimizer(model2, **kw)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _train(model2, opt2, rank, range(3, STEPS + 1))
    resumed = _full(model2), opt2.refreshes, opt2.step_count
    return {
        "fresh": fresh,
        "sharded_cache": sharded_cache,
        "straight": straight,
        "resumed": resumed,
    }


def _scenarios(rank: int, work_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    model = _sharded()
    opt = _optimizer(model)
    _train(model, opt, rank, range(STEPS))
    lora = _sharded(make=_lora_model)
    lora_opt = _optimizer(lora)
    _train(lora, lora_opt, rank, range(STEPS))
    results["lora"] = {
        "params": _full(lora),
        "frozen_grads": [p.grad is None for p in lora.parameters() if not p.requires_grad],
    }
    results["fd"] = {
        "params": _full(model),
        "refreshes": opt.refreshes,
        "value": opt.penalty_value,
        "grad_dtype": type(opt._cache[0]).__name__,
    }
    head = _sharded()
    head_opt = _optimizer(head, penalty_batch_size=4)
    _train(head, head_opt, rank, range(STEPS))
    results["fd_head"] = {
        "params": _full(head),
        "refreshes": head_opt.refreshes,
        "grad_dtype": type(head_opt._cache[0]).__name__,
    }
    exact = _sharded()
    exact_opt = _optimizer(exact, mode="exact")
    _train(exact, exact_opt, rank, range(STEPS))
    results["exact"] = {
        "params": _full(exact),
        "refreshes": exact_opt.refreshes,
        "grad_dtype": type(exact_opt._cache[0]).__name__,
    }
    try:
        _optimizer(_sharded(), penalty="input_gradient")
    except ValueError as e:
        results["gpx_error"] = str(e)
    mp_policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    try:
        _optimizer(_sharded(torch.float32, mp_policy=mp_policy))
    except TypeError as e:
        results["bf16_error"] = str(e)
    try:
        _optimizer(_sharded(torch.float32, mp_policy=mp_policy), mode="exact")
    except ValueError as e:
        results["bf16_exact_error"] = str(e)
    for name, autocast in (("exact_fp32", False), ("exact_autocast", True)):
        model32 = _sharded(torch.float32)
        opt32 = _optimizer(model32, mode="exact")
        _train(model32, opt32, rank, range(STEPS), torch.float32, autocast)
        results[name] = _full(model32)
    results["resume"] = _resume(rank)
    results["dcp"] = _checkpoint_api(rank, str(Path(work_dir) / "checkpoint"))
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_scenarios, WORLD)


def _ordered(x: torch.Tensor, head: int | None) -> torch.Tensor:
    """The global batch as one process sees it: with a penalty batch of ``head`` examples
    (``head / R`` from the front of each rank's slice), those examples first."""
    if head is None:
        return x
    parts = [_shard(x, r) for r in range(WORLD)]
    share = head // WORLD
    return torch.cat([p[:share] for p in parts] + [p[share:] for p in parts])


def _reference(
    alpha: float = ALPHA, make: Callable[..., nn.Module] = _model, head: int | None = None
) -> list[torch.Tensor]:
    """θ ← θ − lr (∇L + α ∇P), P the penalty of the whole batch (of its first ``head``
    examples), every 2 steps, in one process: the unsharded model, labelled as one process
    labels the whole batch (one generator), ∇P by explicit double backprop; only the
    trainable parameters move and are penalised."""
    model = make(torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(SEED)
    cache = None
    for step in range(STEPS):
        x, y = (_ordered(t, head) for t in _global_batch(step))
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        if step % EVERY == 0:
            logits = model(x if head is None else x[:head])
            labels = _sampled_labels(logits.detach(), generator)
            g = torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True)
            cache = torch.autograd.grad(sum(t.pow(2).sum() for t in g), params)
        with torch.no_grad():
            for p, g, h in zip(params, grads, cache):
                p -= LR * (g + alpha * h)
    return [p.detach() for p in model.parameters()]


def _sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ŷ ~ softmax: one uniform per row, the first class whose cumulative probability
    exceeds it (the documented rule)."""
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, generator=generator)
    cdf = torch.softmax(logits.float(), -1).double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def _relative(got: list[torch.Tensor], expected: list[torch.Tensor], start: nn.Module) -> float:
    """``||got − expected|| / ||expected − θ₀||``: the error relative to the update."""
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(got, expected))
    den = sum(float((b - s.detach()).pow(2).sum()) for b, s in zip(expected, start.parameters()))
    return (num / den) ** 0.5


def _one_process(head: int | None) -> list[torch.Tensor]:
    """The library on the whole batch in this process (no process group, no sharding)."""
    model = _model()
    opt = _optimizer(model, penalty_batch_size=head)
    for step in range(STEPS):
        x, y = (_ordered(t, head) for t in _global_batch(step))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("head", [None, 4])
def test_sharded_update_equals_one_process_on_the_global_batch(
    ranks: list[dict], head: int | None
) -> None:
    """Sampled labels, finite difference, with and without penalty_batch_size: the 2-rank
    update equals the brute-force one-process update (and the library's) to 1e-6."""
    name = "fd" if head is None else "fd_head"
    expected = _reference(head=head)
    # the penalty moves the parameters far more than the tolerance below
    assert _relative(_reference(alpha=0.0, head=head), expected, _model()) > 1e-3
    assert _relative(_one_process(head), expected, _model()) < 1e-6
    for rank in ranks:
        got = rank[name]["params"]
        assert rank[name]["refreshes"] == STEPS // EVERY
        assert rank[name]["grad_dtype"] == "DTensor"
        assert _relative(got, expected, _model()) < 1e-6
    for p, q in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
        assert torch.equal(p, q)


def test_lora_on_fsdp2_penalises_only_the_adapters(ranks: list[dict]) -> None:
    """Sharded adapters on a sharded frozen base: the update equals the unsharded one, the
    base is bitwise unchanged and gets no gradient."""
    expected = _reference(make=_lora_model)
    initial = list(_lora_model().parameters())
    for rank in ranks:
        got = rank["lora"]["params"]
        assert all(rank["lora"]["frozen_grads"]) and len(rank["lora"]["frozen_grads"]) == 4
        assert _relative(got, expected, _lora_model()) < 1e-6
        for p, p0 in zip(got, initial):
            assert torch.equal(p, p0) == (not p0.requires_grad)


def test_exact_mode_equals_brute_force_and_the_finite_difference(ranks: list[dict]) -> None:
    """mode="exact" on the gathered parameters: the 2-rank update equals the brute-force
    one-process update to 1e-6, and the sharded finite-difference update to 1e-4."""
    expected = _reference()
    for rank in ranks:
        got = rank["exact"]["params"]
        assert rank["exact"]["refreshes"] == STEPS // EVERY
        assert rank["exact"]["grad_dtype"] == "DTensor"
        assert _relative(got, expected, _model()) < 1e-6
        assert _relative(got, rank["fd"]["params"], _model()) < 1e-4


def test_input_gradient_penalty_is_refused(ranks: list[dict]) -> None:
    for rank in ranks:
        assert "penalty='input_gradient' is not supported" in rank["gpx_error"]


def test_bf16_mixed_precision_is_refused(ranks: list[dict]) -> None:
    for rank in ranks:
        assert "MixedPrecisionPolicy(param_dtype=torch.bfloat16)" in rank["bf16_error"]


def test_exact_mode_refuses_a_bf16_param_dtype_naming_the_fixes(ranks: list[dict]) -> None:
    """Exact mode runs on the gathered parameters without FSDP2's casts: a bfloat16
    param_dtype is refused at construction, naming float32 and autocast."""
    for rank in ranks:
        message = rank["bf16_exact_error"]
        assert "mode='exact'" in message and "param_dtype=torch.bfloat16" in message
        assert "param_dtype=None) or torch.float32" in message and "torch.autocast" in message


def test_exact_mode_under_bf16_autocast_is_near_float32(ranks: list[dict]) -> None:
    """The named alternative: float32 parameters, the forward under bfloat16 autocast (which
    exact mode follows). Float32 is the brute force to float32 rounding (1e-5, measured
    1.2e-6); autocast's update is within 3% of it (bfloat16's 8-bit mantissa; measured
    0.28%, while the penalty moves the update by 42%)."""
    expected = _reference()
    for rank in ranks:
        assert _relative(rank["exact_fp32"], expected, _model()) < 1e-5
        assert _relative(rank["exact_autocast"], expected, _model()) < 3e-2


def test_resume_is_bitwise(ranks: list[dict]) -> None:
    for rank in ranks:
        straight, resumed = rank["resume"]["straight"], rank["resume"]["resumed"]
        assert straight[1:] == resumed[1:]
        assert straight[1] > 8 // EVERY  # the safeguard added refreshes
        assert all(torch.equal(p, q) for p, q in zip(straight[0], resumed[0]))
    assert ranks[0]["resume"]["straight"][1:] == ranks[1]["resume"]["straight"][1:]


def test_distributed_checkpoint_state_dict_resumes_bitwise(ranks: list[dict]) -> None:
    for rank in ranks:
        result = rank["dcp"]
        assert result["fresh"] == (0, 0, LR)  # the state-initialising get was not a step
        assert result["sharded_cache"] == "DTensor"
        straight, resumed = result["straight"], result["resumed"]
        assert straight[1:] == resumed[1:] == (3, STEPS + 1)
        assert all(torch.equal(p, q) for p, q in zip(straight[0], resumed[0]))

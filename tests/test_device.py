"""The core numerics on every selected device (``device`` fixture: CPU always; CUDA with
``FISHER_OPTIM_TEST_DEVICES=cpu,cuda``), against float64 brute force on the CPU.

A GPU run of the suite's device-dependent part is one command::

    FISHER_OPTIM_TEST_DEVICES=cpu,cuda python -m pytest tests/test_device.py -q

* the penalty gradient ``2 H g``, exact and by finite difference, against the full float64
  Hessian (the labels the library drew on the device are read back and reused);
* ``fisher_trace`` (exact labels) and ``per_example_grad_norms`` against per-example loops;
* the spike safeguard and the NaN skip with device tensors;
* AMP: float16 autocast with ``GradScaler``, bfloat16 autocast;
* ``torch.compile`` with the finite difference (``inductor`` on CUDA, ``aot_eager`` on the
  CPU, where inductor's C++ compile takes a minute);
* DDP across two GPUs on NCCL (skipped with fewer than two GPUs; gloo on the CPU is covered by
  ``test_integration_ddp.py``).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim import Batch, FisherPenaltySGD, penalty_gradient
from fisher_optim.curvature import fisher_trace, per_example_grad_norms
from fisher_optim.differentiation import compute_penalty_gradient
from fisher_optim.penalty import PenaltyObjective

from .conftest import seeded_batch, seeded_mlp, small_cnn, tiny_mlp

MODES = ("exact", "finite_difference")


def _inputs(net: str, n: int = 8) -> Tensor:
    shape = (n, 5) if net == "mlp" else (n, 3, 8, 8)
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _net(net: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    return tiny_mlp(dtype) if net == "mlp" else small_cnn(dtype, bn=True)


def _flat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t).detach().double().cpu().reshape(-1)
            for t, p in zip(tensors, like)
        ]
    )


def _brute_penalty_gradient(model: nn.Module, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(2 H g, ||g||²)`` of the mean cross-entropy with ``labels``, from the full float64
    Hessian of the flattened parameters (a copy of ``model``, in its training mode)."""
    model = copy.deepcopy(model).double().cpu()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat: Tensor) -> Tensor:
        tensors = {n: c.view_as(p) for n, c, p in zip(names, flat.split(sizes), params)}
        out = torch.func.functional_call(model, tensors, (x.double().cpu(),))
        return F.cross_entropy(out, labels.cpu())

    theta = torch.cat([p.reshape(-1) for p in params])
    g = torch.autograd.functional.jacobian(loss, theta)
    hessian = torch.autograd.functional.hessian(loss, theta)
    return 2 * hessian @ g, g @ g


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_penalty_gradient_matches_the_float64_hessian(
    device: torch.device, net: str, mode: str
) -> None:
    """float64 on the device: exact to rounding, the forward difference to its O(r) error."""
    reference = _net(net)
    model = copy.deepcopy(reference).to(device)
    x = _inputs(net)
    objective = PenaltyObjective(
        model, Batch((x.to(device),)), generator=torch.Generator(device).manual_seed(0)
    )
    with torch.enable_grad():
        result = compute_penalty_gradient(objective, mode)
    assert objective.labels is not None and objective.labels.device.type == device.type
    expected, value = _brute_penalty_gradient(reference, x, objective.labels)
    got = _flat(result.grads, list(model.parameters()))
    assert _rel(got, expected) < (1e-10 if mode == "exact" else 1e-5)
    torch.testing.assert_close(result.value.double().cpu(), value, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_float32_penalty_gradient_is_close_to_float64(device: torch.device, mode: str) -> None:
    reference = tiny_mlp(torch.float64)
    model = copy.deepcopy(reference).float().to(device)
    x = _inputs("mlp", 32)
    labels = torch.randint(4, (32,), generator=torch.Generator().manual_seed(2))
    grads = penalty_gradient(
        model, x.float().to(device), penalty="gradient", targets=labels.to(device), mode=mode
    )
    expected, _ = _brute_penalty_gradient(reference, x, labels)
    got = _flat(grads, list(model.parameters()))
    # exact: float32 rounding; finite difference: its documented few-percent float32 error
    assert _rel(got, expected) < (1e-4 if mode == "exact" else 0.1)
    assert F.cosine_similarity(got, expected, dim=0) > 0.995


def test_fisher_trace_exact_labels_matches_a_per_example_loop(device: torch.device) -> None:
    reference = small_cnn(torch.float64, bn=True).eval()
    with torch.no_grad():  # non-trivial running statistics (fisher_trace runs in eval mode)
        reference[1].running_mean.uniform_(-0.5, 0.5)
        reference[1].running_var.uniform_(0.5, 2.0)
    model = copy.deepcopy(reference).train().to(device)
    x = _inputs("cnn", 6)
    got = fisher_trace(model, x.to(device), labels="exact", chunk_size=4)
    assert model.training  # left as found

    params = list(reference.parameters())
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(x)):
        logits = reference(x[i : i + 1])
        probs = logits.softmax(-1)[0].detach()
        for c in range(logits.shape[-1]):
            g = torch.autograd.grad(
                F.cross_entropy(logits, torch.tensor([c])), params, retain_graph=True
            )
            total += probs[c] * sum(t.square().sum() for t in g)
    assert got == pytest.approx(float(total) / len(x), rel=1e-10)


def test_per_example_grad_norms_match_a_loop(device: torch.device) -> None:
    reference = small_cnn(torch.float64, bn=False)
    model = copy.deepcopy(reference).to(device)
    x = _inputs("cnn", 7)
    y = torch.randint(5, (7,), generator=torch.Generator().manual_seed(3))
    got = per_example_grad_norms(model, x.to(device), y.to(device), chunk_size=3)
    assert got.device.type == device.type
    params = list(reference.parameters())
    expected = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), params)
        expected.append(torch.cat([t.reshape(-1) for t in grads]).norm())
    expected = torch.stack(expected)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-10, atol=0)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_safeguard_scales_a_spike_and_the_next_step_refreshes(device: torch.device) -> None:
    model = seeded_mlp().to(device)
    opt = FisherPenaltySGD(
        model, lr=0.01, alpha=0.1, every=4, spike_factor=2.0, spike_window=4, seed=0
    )
    opt.guard.history.extend([1e-9] * 4)  # a tiny median: the first refresh is a spike
    x, y = (t.to(device) for t in seeded_batch(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, opt, x, y)
    assert any("spike" in str(w.message) for w in caught)
    assert opt.spikes == 1 and opt.refreshes == 1
    norm = torch.stack([c.norm() for c in opt._cache if c is not None]).norm()
    assert norm.device.type == device.type
    assert float(norm) == pytest.approx(2.0 * 1e-9, rel=1e-5)  # scaled to factor · median
    _step(model, opt, x, y)  # used once: step 1 refreshes although every=4
    assert opt.refreshes == 2


def test_a_non_finite_penalty_is_skipped_and_changes_nothing(device: torch.device) -> None:
    model = seeded_mlp().to(device)
    opt = FisherPenaltySGD(model, lr=0.0, alpha=0.1, every=1, seed=0)
    x, y = (t.to(device) for t in seeded_batch(0))
    x[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x[1:]), y[1:]).backward()  # a finite loss gradient...
    model(x)  # ...and a captured batch whose penalty is NaN
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_refreshes == 1 and opt._cache is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _amp_run(
    device: torch.device, dtype: torch.dtype, mode: str, scaler: torch.amp.GradScaler | None
) -> tuple[nn.Module, FisherPenaltySGD]:
    model = seeded_mlp().to(device)
    opt = FisherPenaltySGD(model, lr=0.05, momentum=0.9, alpha=0.5, every=2, mode=mode, seed=1)
    for step in range(4):
        x, y = (t.to(device) for t in seeded_batch(step))
        opt.zero_grad()
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt


@pytest.mark.parametrize("mode", MODES)
def test_float16_autocast_with_grad_scaler(device: torch.device, mode: str) -> None:
    """The scaler unscales before our step, so the run equals the unscaled one (up to fp16
    gradients that underflow without the scale); the cache is float32."""
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=1)
    scaled, scaled_opt = _amp_run(device, torch.float16, mode, scaler)
    plain, plain_opt = _amp_run(device, torch.float16, mode, None)
    assert scaler.get_scale() > 2.0**10  # no step was skipped
    assert scaled_opt.refreshes == plain_opt.refreshes == 2
    assert scaled_opt.skipped_refreshes == 0
    assert all(c.dtype == torch.float32 for c in scaled_opt._cache)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_autocast_trains(device: torch.device, mode: str) -> None:
    model, opt = _amp_run(device, torch.bfloat16, mode, None)
    reference = seeded_mlp()
    assert opt.refreshes == 2 and opt.skipped_refreshes == 0
    assert opt.penalty_value is not None and opt.penalty_value > 0
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        assert not torch.equal(p.cpu(), q)


def test_compiled_model_with_the_finite_difference(device: torch.device) -> None:
    """float64, so that the difference quotient does not amplify the compiled kernels'
    different rounding (in float32 it would: ε·||∇L|| / r is a few percent)."""
    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    eager = seeded_mlp().double().to(device)
    compiled = torch.compile(seeded_mlp().double().to(device), backend=backend)
    kwargs = dict(lr=0.05, momentum=0.9, alpha=0.5, every=2, mode="finite_difference", seed=3)
    eager_opt = FisherPenaltySGD(eager, **kwargs)
    compiled_opt = FisherPenaltySGD(compiled, **kwargs)
    assert compiled_opt.module is compiled  # the difference passes run compiled
    try:
        for step in range(3):
            x, y = seeded_batch(step)
            x, y = x.double().to(device), y.to(device)
            _step(eager, eager_opt, x, y)
            _step(compiled, compiled_opt, x, y)
    finally:
        torch._dynamo.reset()
    assert compiled_opt.refreshes == eager_opt.refreshes == 2
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- DDP on NCCL
DDP_WORLD = 2


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{init_file}", rank=rank, world_size=DDP_WORLD
    )
    try:
        model = nn.parallel.DistributedDataParallel(seeded_mlp().cuda(rank), device_ids=[rank])
        opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, every=2, seed=5)
        for step in range(3):
            x, y = seeded_batch(10 * step + rank)  # a different shard per rank
            _step(model, opt, x.cuda(rank), y.cuda(rank))
        torch.save(
            {
                "params": [p.detach().cpu() for p in model.module.parameters()],
                "refreshes": opt.refreshes,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_on_nccl_keeps_the_replicas_identical(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("NCCL needs CUDA (DDP on gloo: test_integration_ddp.py)")
    if torch.cuda.device_count() < DDP_WORLD or not dist.is_nccl_available():
        pytest.skip(f"DDP on NCCL needs {DDP_WORLD} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(str(Path(tmp) / "init"), tmp), nprocs=DDP_WORLD, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(DDP_WORLD)]
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"] == 2
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)
    assert not torch.equal(ranks[0]["params"][0], seeded_mlp()[0].weight.detach())

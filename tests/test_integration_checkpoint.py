"""Checkpoint and resume: model + optimizer + LR scheduler + GradScaler, saved mid-run with
``torch.save`` and loaded into freshly built objects (``torch.load`` with its default
``weights_only=True``), continue bitwise like the uninterrupted run on CPU.

The optimizer's own state (step counter, cached penalty gradient / Fisher estimate, seed and
generator states) travels in ``state_dict()["param_groups"][0]["fisher_optim"]``. With
``every=3`` the save is at step 4, which is not a refresh step, so the resumed run must use the restored cache.
"""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD

STEPS, SAVE_AT, EVERY = 8, 4, 3
HAS_NOISE = importlib.util.find_spec("fisher_optim.fisher_noise_sgd") is not None


def _penalty_exact(model: nn.Module) -> torch.optim.Optimizer:
    return FisherPenaltySGD(model, lr=0.05, momentum=0.9, alpha=0.5, every=EVERY, mode="exact")


def _penalty_fd(model: nn.Module) -> torch.optim.Optimizer:
    return FisherPenaltySGD(
        model, lr=0.05, momentum=0.9, alpha=0.5, every=EVERY, mode="finite_difference"
    )


def _noise(model: nn.Module) -> torch.optim.Optimizer:
    from fisher_optim.fisher_noise_sgd import FisherNoiseSGD

    return FisherNoiseSGD(model, lr=0.05, momentum=0.9, small_batch_size=2, every=EVERY)


FACTORIES = {"penalty_exact": _penalty_exact, "penalty_fd": _penalty_fd}
if HAS_NOISE:
    FACTORIES["noise_diagonal"] = _noise


def _build(name: str, torch_seed: int):
    """Everything fresh; ``torch_seed`` sets the initial weights and the optimizer's default
    seed, so a resumed run only matches if the checkpoint restores them."""
    torch.manual_seed(torch_seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 5))
    opt = FACTORIES[name](model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return model, opt, scheduler, scaler


def _train(model, opt, scheduler, scaler, steps) -> None:
    model.train()
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(5, (8,), generator=g)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()


def _save(model, opt, scheduler, scaler) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_is_bitwise_identical(name: str) -> None:
    full = _build(name, torch_seed=0)
    _train(*full, range(STEPS))

    first = _build(name, torch_seed=0)
    _train(*first, range(SAVE_AT))
    saved_opt = first[1]
    assert saved_opt.step_count % EVERY != 0  # the next step reuses the cache
    blob = _save(*first)
    del first

    model, opt, scheduler, scaler = _build(name, torch_seed=12345)
    assert opt.seed != saved_opt.seed  # a fresh optimizer, with other defaults
    checkpoint = torch.load(io.BytesIO(blob))  # weights_only=True: plain tensors and numbers
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])

    assert opt.step_count == SAVE_AT and opt.seed == saved_opt.seed
    assert opt.refreshes == saved_opt.refreshes
    assert all(torch.equal(a, b) for a, b in zip(opt._cache, saved_opt._cache))
    assert opt.param_groups[0]["lr"] == saved_opt.param_groups[0]["lr"]
    assert opt.state is opt.base_optimizer.state  # still shared after loading

    _train(model, opt, scheduler, scaler, range(SAVE_AT, STEPS))
    full_model, full_opt, _, full_scaler = full
    assert opt.step_count == full_opt.step_count == STEPS
    assert opt.refreshes == full_opt.refreshes
    assert scaler.get_scale() == full_scaler.get_scale()
    for (key, a), b in zip(model.state_dict().items(), full_model.state_dict().values()):
        assert torch.equal(a, b), key
    for a, b in zip(opt._cache, full_opt._cache):
        assert torch.equal(a, b)

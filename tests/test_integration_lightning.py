"""Training loops of other libraries: PyTorch Lightning (automatic optimization, with
``accumulate_grad_batches`` and gradient clipping) and Hugging Face Accelerate
(``accelerator.prepare``), on CPU.

Lightning calls ``optimizer.step(closure)``; the closure runs ``training_step`` and
``backward``, and our ``step`` edits the gradients after the closure, before the base
optimizer's update. Accelerate wraps the optimizer in ``AcceleratedOptimizer``, whose ``step``
calls ours. In both cases the optimizer is built on the module whose ``forward`` receives the
batch (here ``self.net``), so that its forward pre-hook sees the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim import FisherPenaltySGD

N, BATCH, EVERY = 48, 8, 2  # 6 steps per epoch, refreshes at steps 0, 2, 4


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(4, (N,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_lightning_automatic_optimization(mode: str) -> None:
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return FisherPenaltySGD(
                self.net, lr=0.05, momentum=0.9, alpha=0.1, every=EVERY, mode=mode
            )

    module = Classifier()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(_dataset(), batch_size=BATCH))
    opt = trainer.optimizers[0]
    assert isinstance(opt, FisherPenaltySGD)
    assert opt.step_count == N // BATCH
    assert opt.refreshes == -(-(N // BATCH) // EVERY) and opt.skipped_refreshes == 0
    assert opt.penalty_value is not None and opt._batch is None
    assert all(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


LR, CLIP = 0.5, 0.01


def _clipped_classifier(L, optimizer):
    """A LightningModule recording the norm of the gradient each optimizer step applied
    (``(θ_before − θ_after) / lr``, plain SGD)."""

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()
            self.applied: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return optimizer(self.net)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            before = torch.cat([p.detach().flatten() for p in self.net.parameters()])
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            after = torch.cat([p.detach().flatten() for p in self.net.parameters()])
            self.applied.append(float(((before - after) / LR).norm()))

    return Classifier()


def _fit(L, module, **trainer_kwargs):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(_dataset(), batch_size=BATCH))
    return trainer.optimizers[0]


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_lightning_clipping_recipe_bounds_the_applied_gradient_with_accumulation(mode: str):
    """The recipe: ``gradient_clip_val=None`` and ``max_grad_norm`` on the optimizer, which
    clips loss gradient + alpha * penalty gradient; with ``accumulate_grad_batches=2``."""
    L = pytest.importorskip("lightning")
    module = _clipped_classifier(
        L,
        lambda net: FisherPenaltySGD(
            net, lr=LR, alpha=0.1, every=EVERY, mode=mode, max_grad_norm=CLIP
        ),
    )
    opt = _fit(L, module, accumulate_grad_batches=2)
    steps = N // BATCH // 2
    assert opt.step_count == steps and opt.refreshes == -(-steps // EVERY)
    assert len(module.applied) == steps and max(module.applied) <= CLIP * (1 + 1e-5)

    # Lightning's own clipping runs before step() and sees only the loss gradient
    module = _clipped_classifier(
        L, lambda net: FisherPenaltySGD(net, lr=LR, alpha=10.0, every=EVERY, mode=mode)
    )
    _fit(L, module, gradient_clip_val=CLIP, accumulate_grad_batches=2)
    assert max(module.applied) > 2 * CLIP


def test_lightning_alpha_zero_with_max_grad_norm_equals_gradient_clip_val_bitwise():
    L = pytest.importorskip("lightning")
    ours = _clipped_classifier(
        L, lambda net: FisherPenaltySGD(net, lr=LR, momentum=0.9, alpha=0.0, max_grad_norm=CLIP)
    )
    _fit(L, ours, accumulate_grad_batches=2)
    base = _clipped_classifier(
        L, lambda net: torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    )
    _fit(L, base, accumulate_grad_batches=2, gradient_clip_val=CLIP)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), base.parameters()))


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_accelerate_prepare(mode: str) -> None:
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FisherPenaltySGD(model, lr=0.05, momentum=0.9, alpha=0.1, every=EVERY, mode=mode)
    loader = DataLoader(_dataset(), batch_size=BATCH)
    model, prepared_opt, loader = accelerator.prepare(model, opt, loader)
    assert isinstance(prepared_opt, accelerate.optimizer.AcceleratedOptimizer)
    assert prepared_opt.optimizer is opt
    for x, y in loader:
        prepared_opt.zero_grad()
        accelerator.backward(F.cross_entropy(model(x), y))
        prepared_opt.step()
    assert opt.step_count == N // BATCH
    assert opt.refreshes == -(-(N // BATCH) // EVERY) and opt.skipped_refreshes == 0
    assert opt._batch is None
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))

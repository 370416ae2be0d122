"""``torch.compile``-d models.

* ``mode="finite_difference"`` runs its two gradient passes through the compiled module;
* ``mode="exact"`` needs a double backward, which compiled graphs do not support, so the
  penalty pass runs through the eager ``_orig_mod`` (same parameters) while training's forward
  stays compiled.

The tests use ``backend="aot_eager"`` (Dynamo capture + AOTAutograd, no code generation): on
this 2-core CI machine the default inductor backend spends about a minute compiling C++ for
even a tiny MLP. The optimizer does not depend on the backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fisher_optim import FisherPenaltySGD, penalty_gradient

from .conftest import seeded_batch as _batch
from .conftest import seeded_mlp as _model

SEED = 3
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["finite_difference", "exact"])
def test_compiled_model_trains_like_the_eager_one(mode: str) -> None:
    eager = _model()
    compiled = torch.compile(_model(), backend=BACKEND)
    kwargs = dict(lr=0.05, momentum=0.9, alpha=0.5, every=2, mode=mode, seed=SEED)
    eager_opt = FisherPenaltySGD(eager, **kwargs)
    compiled_opt = FisherPenaltySGD(compiled, **kwargs)
    if mode == "exact":
        assert compiled_opt.module is compiled._orig_mod  # the eager module, same parameters
    else:
        assert compiled_opt.module is compiled  # the penalty passes are compiled too

    for step in range(5):
        x, y = _batch(step)
        if step == 0:  # the first refresh, on the initial parameters
            expected = penalty_gradient(
                eager, x, mode=mode, generator=torch.Generator().manual_seed(SEED)
            )
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert opt._batch is None
        if step == 0:
            for cached, e in zip(compiled_opt._cache, expected):
                torch.testing.assert_close(cached, e, rtol=1e-4, atol=1e-6)
    assert compiled_opt.refreshes == eager_opt.refreshes == 3
    assert compiled_opt.skipped_refreshes == 0
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_exact_mode_penalty_is_bitwise_the_eager_one() -> None:
    """Exact mode on a compiled model computes exactly what penalty_gradient computes on the
    eager module (the penalty pass does not go through the compiled graph)."""
    compiled = torch.compile(_model(), backend=BACKEND)
    opt = FisherPenaltySGD(compiled, lr=0.05, alpha=0.5, every=1, mode="exact", seed=SEED)
    x, y = _batch(0)
    opt.zero_grad()
    F.cross_entropy(compiled(x), y).backward()
    expected = penalty_gradient(
        compiled._orig_mod, x, mode="exact", generator=torch.Generator().manual_seed(SEED)
    )
    opt.step()
    for cached, e in zip(opt._cache, expected):
        assert torch.equal(cached, e)


def test_activation_pattern_is_replayed_through_the_compiled_module():
    """A ReLU/max-pool CNN large enough to cross kinks at the default step: compiled, the
    finite difference is within 1% of the eager exact gradient on the same labels, as eager."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def flat(grads):
        return torch.cat([g.flatten() for g in grads])

    exact = flat(penalty_gradient(net, x, generator=torch.Generator().manual_seed(2)))
    compiled = torch.compile(net, backend=BACKEND)
    fd = flat(
        penalty_gradient(
            compiled, x, mode="finite_difference", generator=torch.Generator().manual_seed(2)
        )
    )
    assert ((fd - exact).norm() / exact.norm()).item() < 0.01

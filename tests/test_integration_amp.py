"""Mixed precision on CPU: ``torch.autocast("cpu", dtype=torch.bfloat16)`` and ``GradScaler``.

* exact mode: the penalty pass runs under the autocast the training forward ran under;
* finite_difference mode: the penalty passes run in full precision (a difference of two
  half-precision gradients would be rounding noise);
* ``scaler.step(opt)`` unscales the gradients first, then our ``step`` adds the (unscaled,
  float32) cached penalty gradient; a step the scaler skips (inf/NaN gradients) never reaches
  our ``step``, so it consumes nothing: step counter, refresh counter and cache are unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fisher_optim import FisherPenaltySGD, penalty_gradient

from .conftest import seeded_batch as _batch
from .conftest import seeded_mlp as _model

SEED = 7


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_bf16_autocast_penalty_precision(mode: str) -> None:
    """The cached penalty gradient equals penalty_gradient computed under bf16 autocast (exact)
    or in float32 (finite difference) on the same batch with the same labels."""
    model = _model()
    opt = FisherPenaltySGD(model, lr=0.05, alpha=0.1, every=2, mode=mode, seed=SEED)
    reference_model = copy.deepcopy(model)
    x, y = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    opt.zero_grad()
    F.cross_entropy(logits.float(), y).backward()
    opt.step()

    generator = torch.Generator().manual_seed(SEED)
    if mode == "exact":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = penalty_gradient(reference_model, x, mode=mode, generator=generator)
    else:
        expected = penalty_gradient(reference_model, x, mode=mode, generator=generator)
    for cached, e in zip(opt._cache, expected):
        assert cached.dtype == torch.float32
        assert torch.equal(cached, e)

    # ... and, exact: differs from the float32 one (so the test can tell them apart);
    # finite difference: the functional engine switches autocast off itself, so it is the same
    generator = torch.Generator().manual_seed(SEED)
    if mode == "exact":
        other = penalty_gradient(reference_model, x, mode=mode, generator=generator)
        assert any(not torch.equal(c, o) for c, o in zip(opt._cache, other))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            other = penalty_gradient(reference_model, x, mode=mode, generator=generator)
        assert all(torch.equal(c, o) for c, o in zip(opt._cache, other))


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_bf16_autocast_training_loop(mode: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FisherPenaltySGD(model, lr=0.05, momentum=0.9, alpha=0.1, every=2, mode=mode)
    for step in range(5):
        x, y = _batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert opt.refreshes == 3 and opt.skipped_refreshes == 0
    assert opt.penalty_value is not None and opt.penalty_value > 0
    for p, q in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and p.dtype == torch.float32
        assert not torch.equal(p, q)


def _train(model, opt, steps, scaler=None, skip_at=(), autocast=False):
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if step in skip_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_grad_scaler_update_equals_unscaled_update(mode: str, autocast: bool) -> None:
    """Scaling by a power of two and unscaling is exact, so the parameters are bitwise those of
    the same run without a scaler: the penalty gradient is added after unscaling."""
    scaled_model, plain_model = _model(), _model()
    kwargs = dict(lr=0.05, momentum=0.9, alpha=0.5, every=3, mode=mode, seed=SEED)
    scaled_opt = FisherPenaltySGD(scaled_model, **kwargs)
    plain_opt = FisherPenaltySGD(plain_model, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    _train(scaled_model, scaled_opt, 6, scaler=scaler, autocast=autocast)
    _train(plain_model, plain_opt, 6, autocast=autocast)
    assert scaler.get_scale() > 2.0**12  # the scale grew: several scales were exercised
    assert scaled_opt.refreshes == plain_opt.refreshes == 2
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_step_skipped_by_grad_scaler_consumes_nothing(mode: str) -> None:
    model = _model()
    opt = FisherPenaltySGD(model, lr=0.05, momentum=0.9, alpha=0.5, every=3, mode=mode, seed=SEED)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _train(model, opt, 2, scaler=scaler)
    state = (opt.step_count, opt.refreshes, opt.penalty_value)
    cache = [c.clone() for c in opt._cache]
    params = [p.detach().clone() for p in model.parameters()]

    x, y = _batch(100)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: inf in the gradients
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert (opt.step_count, opt.refreshes, opt.penalty_value) == state
    assert all(torch.equal(c, d) for c, d in zip(opt._cache, cache))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))

    # Training goes on as if the skipped iteration had not happened: the same as a run
    # without it (the scale differs, but scaling by powers of two is exact).
    reference_model = _model()
    reference_opt = FisherPenaltySGD(
        reference_model, lr=0.05, momentum=0.9, alpha=0.5, every=3, mode=mode, seed=SEED
    )
    _train(reference_model, reference_opt, 2)
    for step in range(2, 5):
        for m, o, s in ((model, opt, scaler), (reference_model, reference_opt, None)):
            x, y = _batch(step)
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            if s is None:
                loss.backward()
                o.step()
            else:
                s.scale(loss).backward()
                s.step(o)
                s.update()
    assert opt.step_count == reference_opt.step_count == 5
    assert opt.refreshes == reference_opt.refreshes == 2
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)

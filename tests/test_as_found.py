"""A measurement leaves the model exactly as found, also when a forward changes a parameter
in place: ``nn.Embedding(max_norm=...)`` / ``nn.EmbeddingBag(max_norm=...)`` renormalise the
rows they look up, in place (issue 27, defect 4).

Every public measurement is run on a model whose embedding rows have norms above
``max_norm``; afterwards its parameters, buffers, ``.grad`` (bitwise), ``requires_grad`` and
train/eval flags are those it had, and the value measured is that of the renormalised
model. The same on ``spectral_norm`` / ``weight_norm`` layers in training mode (in-place
updates of power-iteration buffers). A forward that changes a parameter in place in a way
fisher_optim cannot undo makes a measurement raise. Training is left as it is: the user's
forward still renormalises, FisherPenaltySGD's step changes the parameters by the base
optimizer's update only (its penalty pass leaves the model as found), and the optimizers'
own passes do not raise on a forward that clamps its weight.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim import (
    CurvatureMonitor,
    FisherMonitor,
    FisherNoiseSGD,
    FisherPenaltySGD,
    penalty_gradient,
)
from fisher_optim._as_found import left_as_found
from fisher_optim.curvature import (
    HessianOperator,
    fisher_trace,
    gradient_covariance,
    gradient_covariance_eigenvalues,
    gradient_covariance_trace,
    group_gradient_stats,
    hessian_eigenvalues,
    hessian_trace,
    minibatch_fisher_trace,
    per_example_grad_norms,
    per_example_gradient_gram,
    per_example_sq_norms,
    target_cotangents,
    top_hessian_eigenvalue,
)

from .curvature_utils import (
    assert_unchanged,
    full_hessian,
    loop_sq_norms,
    randomize_state,
    snapshot,
)

VOCAB, D, CLASSES, T, B = 9, 4, 3, 3, 6


class Renormalising(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, C]``: an Embedding with ``max_norm`` (mean over
    positions), then a head (``"embedding"``); the head tied to the embedding (``"tied"``,
    ``C = VOCAB``); or an EmbeddingBag with ``max_norm`` (``"bag"``: no double backward,
    first-order measurements only)."""

    def __init__(self, kind: str = "embedding") -> None:
        super().__init__()
        self.kind = kind
        self.emb = (nn.EmbeddingBag if kind == "bag" else nn.Embedding)(VOCAB, D, max_norm=1.0)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.emb(ids) if self.kind == "bag" else self.emb(ids).mean(1))
        return F.linear(h, self.emb.weight) if self.kind == "tied" else self.head(h)


def _setup(kind: str = "embedding") -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Renormalising(kind).double()
    with torch.no_grad():  # every row well above max_norm
        model.emb.weight.mul_(3.0)
    randomize_state(model)
    x = torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    classes = VOCAB if kind == "tied" else CLASSES
    y = torch.randint(classes, (B,), generator=torch.Generator().manual_seed(2))
    assert float(model.emb.weight.detach().norm(dim=1).min()) > 1.5
    return model, x, y


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


MEASUREMENTS: dict[str, Callable[[nn.Module, Tensor, Tensor], Any]] = {
    "fisher_trace": lambda m, x, y: fisher_trace(m, x, generator=_gen()),
    "fisher_trace_exact": lambda m, x, y: fisher_trace(m, x, labels="exact"),
    "minibatch_fisher_trace": lambda m, x, y: minibatch_fisher_trace(m, x, generator=_gen()),
    "per_example_grad_norms": lambda m, x, y: per_example_grad_norms(m, x, y),
    "per_example_sq_norms": lambda m, x, y: per_example_sq_norms(m, x, target_cotangents(y)),
    "group_gradient_stats": lambda m, x, y: group_gradient_stats(m, x, y, torch.arange(B) % 2),
    "hessian_trace": lambda m, x, y: hessian_trace(m, (x, y), num_probes=2, generator=_gen()),
    "hessian_trace_batches": lambda m, x, y: hessian_trace(
        m, [(x[:3], y[:3]), (x[3:], y[3:])], num_probes=2, generator=_gen()
    ),
    "hessian_operator": lambda m, x, y: HessianOperator(m, (x, y), F.cross_entropy).matvec(
        torch.ones(sum(p.numel() for p in m.parameters()), dtype=torch.float64)
    ),
    "hessian_eigenvalues": lambda m, x, y: hessian_eigenvalues(m, (x, y), 2, generator=_gen()),
    "top_hessian_eigenvalue": lambda m, x, y: top_hessian_eigenvalue(m, (x, y), generator=_gen()),
    "gradient_covariance": lambda m, x, y: gradient_covariance(m, (x, y), k=2),
    "gradient_covariance_trace": lambda m, x, y: gradient_covariance_trace(m, (x, y)),
    "gradient_covariance_eigenvalues": lambda m, x, y: gradient_covariance_eigenvalues(
        m, (x, y), 2
    ),
    "per_example_gradient_gram": lambda m, x, y: per_example_gradient_gram(
        m, x, target_cotangents(y)
    ),
    "penalty_gradient": lambda m, x, y: penalty_gradient(m, x, generator=_gen()),
    "penalty_gradient_fd": lambda m, x, y: penalty_gradient(
        m, x, mode="finite_difference", generator=_gen()
    ),
    "FisherMonitor": lambda m, x, y: FisherMonitor(m, x).measure(),
    "CurvatureMonitor": lambda m, x, y: CurvatureMonitor(
        m, (x, y), ("trace_F", "trace_K", "lambda_K", "lambda_H"), top_k=2
    ).measure(),
}


#: The measurements that need no second derivative (EmbeddingBag has none).
FIRST_ORDER = [
    "fisher_trace", "fisher_trace_exact", "minibatch_fisher_trace", "per_example_grad_norms",
    "per_example_sq_norms", "group_gradient_stats", "gradient_covariance",
    "gradient_covariance_trace", "gradient_covariance_eigenvalues", "per_example_gradient_gram",
    "penalty_gradient_fd", "FisherMonitor",
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kind"),
    [(n, k) for k in ("embedding", "tied") for n in MEASUREMENTS]
    + [(n, "bag") for n in FIRST_ORDER],
)
@pytest.mark.parametrize("training", [True, False])
def test_measurement_leaves_renormalising_embeddings_as_found(
    name: str, kind: str, training: bool
) -> None:
    model, x, y = _setup(kind)
    model.train(training)
    params, snap = list(model.parameters()), snapshot(model)
    MEASUREMENTS[name](model, x, y)
    assert_unchanged(model, snap)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def _renormalised_copy(model: nn.Module, x: Tensor) -> nn.Module:
    """A copy whose looked-up rows were renormalised by a forward, then ``max_norm=None``:
    the plain model the measurement must see."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain(x)
    plain.emb.max_norm = None
    return plain


@pytest.mark.parametrize("kind", ["embedding", "tied"])
def test_measurement_sees_the_renormalised_rows(kind: str) -> None:
    """The value measured is that of the model as its forward uses it (rows renormalised):
    brute force on the renormalised copy (per-example loop, dense float64 Hessian)."""
    model, x, y = _setup(kind)
    plain = _renormalised_copy(model, x)
    torch.testing.assert_close(
        per_example_grad_norms(model, x, y).square(),
        loop_sq_norms(plain, x, y),
        rtol=1e-10,
        atol=1e-14,
    )
    dense = full_hessian(plain, x, y)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=_gen())
    op = HessianOperator(model.eval(), (x, y), F.cross_entropy)
    for _ in range(2):  # the cached graph is reused: still the renormalised model's
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def _numbers(result: Any) -> list[float]:
    """The numbers of a measurement's result (not eigenvectors, whose sign is arbitrary,
    nor timings)."""
    if isinstance(result, Tensor):
        return result.detach().double().flatten().tolist()
    if isinstance(result, (int, float)):
        return [float(result)]
    if isinstance(result, dict):
        skip = {"time", "duration", "group_ids"}
        return [x for k in sorted(result) if k not in skip for x in _numbers(result[k])]
    if isinstance(result, (list, tuple)):
        fields = getattr(result, "_fields", None)
        if fields is not None:
            items = [getattr(result, f) for f in fields if not f.startswith("eigenvector")]
        else:
            items = list(result)
        return [x for item in items if item is not None for x in _numbers(item)]
    return []


@pytest.mark.parametrize("name", list(MEASUREMENTS))
@pytest.mark.parametrize("kind", ["embedding", "tied"])
def test_measurement_equals_that_of_the_renormalised_model(name: str, kind: str) -> None:
    """Every pass of a measurement sees the rows as renormalised (nested passes write
    nothing back until the measurement ends): its value is that of the renormalised copy
    with ``max_norm=None``. (Not over several batches with a tied head: each batch's
    forward renormalises its own rows, and the head of the first sees only those.)"""
    if kind == "tied" and name == "hessian_trace_batches":
        pytest.skip("several batches with a tied head: each sees its own rows renormalised")
    model, x, y = _setup(kind)
    plain = _renormalised_copy(model, x)
    got, expected = MEASUREMENTS[name](model, x, y), MEASUREMENTS[name](plain, x, y)
    torch.testing.assert_close(
        torch.tensor(_numbers(got)), torch.tensor(_numbers(expected)), rtol=1e-8, atol=1e-12
    )


def test_training_forward_still_renormalises() -> None:
    model, x, _ = _setup()
    before = model.emb.weight.detach().clone()
    model(x)
    rows = x.unique()
    assert not torch.equal(model.emb.weight[rows], before[rows])
    assert float(model.emb.weight[rows].norm(dim=1).max()) <= 1.0


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_penalty_step_changes_parameters_by_the_update_only(mode: str) -> None:
    """FisherPenaltySGD: the user's forward renormalises (training, as without the wrapper);
    the penalty pass changes nothing, so a step is exactly ``θ - lr (∇L + α ∇P)``."""
    model, x, y = _setup()
    model.zero_grad(set_to_none=True)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, mode=mode)
    F.cross_entropy(model(x), y).backward()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    opt.step()
    penalty = dict(zip(dict(model.named_parameters()), opt._cache, strict=True))
    for k, p in model.named_parameters():
        expected = before[k] - 0.1 * (grads[k] + 0.5 * penalty[k])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-14)


def _normed(kind: str) -> nn.Module:
    """A head whose first layer is reparametrised: ``spectral_norm`` (old and new API: a
    training-mode forward updates its power-iteration buffers in place) or ``weight_norm``."""
    from torch.nn.utils import parametrizations

    wrap = {
        "spectral_norm": nn.utils.spectral_norm,
        "parametrizations.spectral_norm": parametrizations.spectral_norm,
        "weight_norm": nn.utils.weight_norm,
        "parametrizations.weight_norm": parametrizations.weight_norm,
    }[kind]
    torch.manual_seed(0)
    return nn.Sequential(wrap(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, CLASSES)).double()


NORMED = ["spectral_norm", "parametrizations.spectral_norm", "weight_norm",
          "parametrizations.weight_norm"]  # fmt: skip


@pytest.mark.parametrize("name", list(MEASUREMENTS))
@pytest.mark.parametrize("kind", NORMED)
def test_measurement_leaves_reparametrised_layers_as_found(name: str, kind: str) -> None:
    model = randomize_state(_normed(kind)).train()
    x = torch.randn(B, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(CLASSES, (B,), generator=torch.Generator().manual_seed(2))
    params, snap = list(model.parameters()), snapshot(model)
    MEASUREMENTS[name](model, x, y)
    assert_unchanged(model, snap)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["spectral_norm", "parametrizations.spectral_norm"])
def test_penalty_pass_leaves_power_iteration_buffers_as_training_left_them(
    mode: str, kind: str
) -> None:
    """The training forward advances spectral_norm's power iteration (once per forward, as
    without the penalty); the penalty's own forwards do not."""
    model = _normed(kind).train()
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(CLASSES, (B,))
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, mode=mode)
    F.cross_entropy(model(x), y).backward()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    opt.step()
    assert opt.refreshes == 1
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


class Clamping(nn.Module):
    """A forward that clamps its own weight in place: nothing fisher_optim knows to undo."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
        return self.lin(x)


def test_an_in_place_change_that_cannot_be_undone_raises() -> None:
    model = Clamping()
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"lin\.weight.*in place"):
        per_example_grad_norms(model, x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(RuntimeError, match=r"lin\.weight.*in place"), left_as_found(model):
        model(x)


@pytest.mark.parametrize("optimizer", ["penalty_exact", "penalty_fd", "noise"])
def test_training_with_a_forward_that_changes_parameters_in_place_is_unchanged(
    optimizer: str,
) -> None:
    """The optimizers' own passes are training: a forward that clamps its weight may, as
    without them (no error); the step is the base optimizer's on the clamped weight."""
    model = Clamping()
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    if optimizer == "noise":
        opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, seed=0)
        opt.set_targets(y)
    else:
        mode = "exact" if optimizer == "penalty_exact" else "finite_difference"
        opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, mode=mode)
    F.cross_entropy(model(x), y).backward()
    clamped = model.lin.weight.detach().clone()
    opt.step()
    assert bool(clamped.abs().max() <= 0.1) and not torch.equal(model.lin.weight, clamped)


def test_an_exception_inside_is_not_masked() -> None:
    model, x, _ = _setup()
    snap = snapshot(model)
    with pytest.raises(KeyError), left_as_found(model):
        model(x)
        raise KeyError("inside")
    assert_unchanged(model, snap)

"""The shared argument checks, and the wrong inputs a new user makes: each is refused (or
warned about once) with a message naming the argument and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fisher_optim import (
    FisherNoiseSGD,
    FisherPenaltySGD,
    GhostBatchNorm,
    fisher_penalty,
    penalty_gradient,
)
from fisher_optim.validate import (
    check_bool,
    check_function_or_none,
    check_keywords,
    check_positive_int,
    check_positive_int_or_none,
)

CONSTRUCTORS = [
    lambda m, **kw: FisherPenaltySGD(m, lr=0.1, alpha=0.1, **kw),
    lambda m, **kw: FisherNoiseSGD(m, lr=0.1, small_batch_size=2, **kw),
]
#: Both optimizers, refreshing at every step.
EVERY_STEP = pytest.mark.parametrize(
    "make",
    [
        lambda m: FisherPenaltySGD(m, lr=0.1, alpha=0.1, every=1),
        lambda m: FisherNoiseSGD(m, lr=0.1, small_batch_size=2, every=1),
    ],
    ids=["FisherPenaltySGD", "FisherNoiseSGD"],
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _backward(model: nn.Module, x: torch.Tensor | None = None) -> None:
    x = torch.randn(8, 4) if x is None else x
    out = model(x)
    y = torch.randint(3, out.shape[:-1])
    nn.functional.cross_entropy(out, y).backward()


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "3", None])
def test_check_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match=rf"every must be a positive integer, got {value!r}"):
        check_positive_int("every", value)


@pytest.mark.parametrize("value", [0, True, 2.5])
def test_check_positive_int_or_none(value: object) -> None:
    check_positive_int_or_none("n", None)
    with pytest.raises(ValueError, match="n must be a positive integer or None"):
        check_positive_int_or_none("n", value)


def test_check_bool_and_function() -> None:
    check_bool("flag", False)
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        check_bool("flag", 1)
    check_function_or_none("target_mask", None)
    check_function_or_none("target_mask", len)
    with pytest.raises(TypeError, match="target_mask must be a function called like the model"):
        check_function_or_none("target_mask", torch.ones(3))


def test_check_keywords_suggests_the_closest() -> None:
    with pytest.raises(TypeError, match="'evry'; did you mean 'every'"):
        check_keywords("X", {"evry": 1}, ["every", "alpha"])
    with pytest.raises(TypeError, match="'zzz'; it takes alpha, every"):
        check_keywords("X", {"zzz": 1}, ["every", "alpha"])


@pytest.mark.parametrize("make", CONSTRUCTORS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": True}, "every must be a positive integer, got True"),
        ({"every": 0}, "every must be a positive integer, got 0"),
        ({"target_mask": 3}, "target_mask must be a function called like the model"),
    ],
)
def test_constructors_share_the_checks(make, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError if "every" in kwargs else TypeError, match=message):
        make(_net(), **kwargs)


def test_batch_sizes_are_positive_integers() -> None:
    with pytest.raises(ValueError, match="penalty_batch_size must be a positive integer or None"):
        FisherPenaltySGD(_net(), lr=0.1, alpha=0.1, penalty_batch_size=2.5)
    with pytest.raises(ValueError, match="estimate_batch_size must be a positive integer or None"):
        FisherNoiseSGD(_net(), lr=0.1, small_batch_size=2, estimate_batch_size=2.5)
    with pytest.raises(ValueError, match="small_batch_size must be a positive integer"):
        FisherNoiseSGD(_net(), lr=0.1, small_batch_size=True)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm(3, virtual_batch_size=0)


@pytest.mark.parametrize("make", CONSTRUCTORS)
def test_every_parameter_frozen(make) -> None:
    model = _net().requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter of the model is frozen.*requires_grad_"):
        make(model)


def test_every_parameter_frozen_in_the_functions() -> None:
    for f in (fisher_penalty, penalty_gradient):
        with pytest.raises(
            ValueError, match=r"every parameter of the model is frozen.*requires_gr"
        ):
            f(_net().requires_grad_(False), torch.randn(8, 4))


def test_frozen_after_construction() -> None:
    model = _net()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
    model.requires_grad_(False)
    model(torch.randn(8, 4))
    with pytest.raises(ValueError, match="every parameter of the optimizer is frozen"):
        opt.step()


@pytest.mark.parametrize("option", [{"fd_scheme": "central"}, {"fd_step": 1e-3}])
def test_fd_options_refused_in_exact_mode(option: dict) -> None:
    (name,) = option
    with pytest.raises(ValueError, match=rf"{name}=.* mode='exact' does not take: remove {name}"):
        FisherPenaltySGD(_net(), lr=0.1, alpha=0.1, mode="exact", **option)
    FisherPenaltySGD(_net(), lr=0.1, alpha=0.1, mode="finite_difference", **option)
    with pytest.raises(ValueError, match=rf"{name}=.* mode='exact' does not take: remove {name}"):
        penalty_gradient(_net(), torch.randn(8, 4), mode="exact", **option)


@pytest.mark.parametrize("make", CONSTRUCTORS)
def test_typo_in_a_keyword_names_the_wrapper(make) -> None:
    with pytest.raises(
        TypeError, match=r"\(with base optimizer SGD\).*'evry'; did you mean 'every'"
    ):
        make(_net(), evry=10)
    with pytest.raises(TypeError, match="'momentun'; did you mean 'momentum'"):
        make(_net(), momentun=0.9)


UNBATCHED = (
    r"shape \(3,\) for inputs whose first dimension is 4.*unbatched example.*x\.unsqueeze\(0\)"
)


@EVERY_STEP
def test_unbatched_input_is_told_to_batch(make) -> None:
    model = _net()
    opt = make(model)
    _backward(model, torch.randn(4))
    with pytest.raises(ValueError, match=UNBATCHED) as error:
        opt.step()
    assert "output_fn" not in str(error.value)  # not a model with one output per example


def test_unbatched_input_to_the_functions() -> None:
    for f in (fisher_penalty, penalty_gradient):
        with pytest.raises(ValueError, match=UNBATCHED) as error:
            f(_net(), torch.randn(4))
        assert "output_fn" not in str(error.value)


def test_one_output_per_example_is_told_about_output_fn() -> None:
    """A 1-D output as long as the batch: one number per example, or an unbatched call."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(0\).*output_fn=lambda out: out\.unsq"):
        fisher_penalty(model, torch.randn(8, 4))


@EVERY_STEP
def test_nan_inputs_say_the_weights_are_hit(make) -> None:
    model = _net()
    opt = make(model)
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    _backward(model, x)
    with pytest.warns(RuntimeWarning) as record:
        opt.step()
    (message,) = [str(w.message) for w in record]
    assert "loss gradient in p.grad is not finite either" in message
    assert "torch.isfinite(x).all()" in message
    assert "Training continues" not in message


def test_nan_penalty_alone_continues() -> None:
    """A non-finite penalty with a finite loss gradient: dropped, training continues."""
    model = _net()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
    model(torch.full((8, 4), float("inf")))  # the batch the penalty is taken on
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning, match="no parameter was changed by it. Training continues"):
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@EVERY_STEP
def test_outer_module_never_called_hints_at_submodules(make) -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

    outer = Outer()
    opt = make(outer)
    _backward(outer.backbone)
    with pytest.raises(RuntimeError, match=r"model\.backbone\(x\)\), build the optimizer on that"):
        opt.step()


@pytest.mark.parametrize("second", ["FisherPenaltySGD", "FisherNoiseSGD"])
def test_two_optimizers_on_one_model_warn_once(second: str) -> None:
    model = _net()
    first = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
    other = (
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
        if second == "FisherPenaltySGD"
        else FisherNoiseSGD(model, lr=0.1, small_batch_size=2, every=1)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            for opt in (first, other):
                opt.zero_grad()
                _backward(model)
                opt.step()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "another optimizer on this model, a FisherPenaltySGD, steps too" in messages[0]
    assert "Build one such optimizer per model" in messages[0]


def test_replacing_an_optimizer_does_not_warn() -> None:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
            for _ in range(2):
                opt.zero_grad()
                _backward(model)
                opt.step()

"""What is penalized: the Fisher penalty and the gradient-norm penalties it is compared with.

Every penalty here is the squared norm of a gradient of a *surrogate loss* ``L``:

================== ====================================== ======================= ===========
``penalty``         surrogate loss ``L``                   gradient taken w.r.t.   paper name
================== ====================================== ======================= ===========
``"fisher"``        mean CE(f(x), ŷ), ŷ ~ softmax(f(x))     parameters θ            FP
``"random_label"``  mean CE(f(x), ŷ), ŷ uniform             parameters θ            GPr
``"gradient"``      mean loss_fn(f(x), y), true targets     parameters θ            GP
``"input_gradient"`` mean loss_fn(f(x), y), true targets    inputs x                GPx
================== ====================================== ======================= ===========

so ``P = ||∇ L||²``. For ``"fisher"`` this is ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²``, the
term the FP paper adds to the loss (Jastrzebski et al., ICML 2021, Eq. 3/5). The labels are
drawn once per evaluation and then frozen, so that a finite difference compares gradients of
the same function.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(4, 3)
>>> p = fisher_penalty(model, torch.randn(8, 4))
>>> bool(p > 0), p.requires_grad
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim._logits import OutputFn, as_logits, sample_labels
from fisher_optim._modules import frozen_batchnorm_stats, trainable_parameters

PENALTIES = ("fisher", "random_label", "gradient", "input_gradient")
LossFn = Callable[[Tensor, Tensor], Tensor]


def check_penalty(penalty: str) -> str:
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    return penalty


def needs_targets(penalty: str) -> bool:
    """Whether ``penalty`` uses the true targets (GP and GPx do; FP and GPr do not)."""
    return check_penalty(penalty) in ("gradient", "input_gradient")


@dataclass
class Batch:
    """The positional and keyword inputs of one model call, plus optional targets."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Tensor | None = None

    def first_tensor(self) -> Tensor:
        for a in (*self.args, *self.kwargs.values()):
            if isinstance(a, Tensor):
                return a
        raise ValueError("the model was called without any tensor input")

    def head(self, n: int | None) -> Batch:
        """The first ``n`` examples: every tensor whose first dimension is the batch size."""
        if n is None:
            return self
        size = self.first_tensor().shape[0]

        def cut(a: Any) -> Any:
            return a[:n] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == size else a

        return Batch(
            tuple(cut(a) for a in self.args),
            {k: cut(v) for k, v in self.kwargs.items()},
            None if self.targets is None else cut(self.targets),
        )


class PenaltyObjective:
    """The surrogate loss ``L`` of one penalty on one batch, with its labels frozen.

    ``loss()`` runs the model on the batch (BatchNorm running statistics untouched) and
    returns ``L``. The first call draws the labels (for ``"fisher"`` from the logits of that
    very forward); later calls, e.g. at shifted parameters or shifted inputs, reuse them.
    ``wrt()`` gives the tensors whose gradient norm is penalized.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Batch,
        *,
        penalty: str = "fisher",
        params: Sequence[Tensor] | None = None,
        output_fn: OutputFn | None = None,
        loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.penalty = check_penalty(penalty)
        if needs_targets(penalty) and batch.targets is None:
            raise ValueError(
                f"penalty={penalty!r} uses the true targets; pass targets=... "
                "(with FisherPenaltySGD: call opt.set_targets(y) before opt.step())"
            )
        self.model = model
        self.batch = batch
        self.params = list(trainable_parameters(model) if params is None else params)
        self.output_fn = output_fn
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        self.generator = generator
        self.labels: Tensor | None = None
        targets = batch.targets if needs_targets(penalty) else None
        self.targets = None if targets is None else targets.reshape(-1)
        self.inputs: Tensor | None = None
        if penalty == "input_gradient":
            x = batch.first_tensor()
            if not x.is_floating_point():
                raise TypeError("penalty='input_gradient' needs a floating-point first input")
            self.inputs = x.detach().requires_grad_(True)

    def wrt(self) -> list[Tensor]:
        return [self.inputs] if self.inputs is not None else self.params

    def _call(self, input_shift: Tensor | None = None) -> Any:
        args, kwargs = self.batch.args, self.batch.kwargs
        if self.inputs is not None:
            x = self.inputs if input_shift is None else self.inputs + input_shift
            args, kwargs = _replace_first_tensor(args, kwargs, self.batch.first_tensor(), x)
        with frozen_batchnorm_stats(self.model):
            return self.model(*args, **kwargs)

    def loss(self, input_shift: Tensor | None = None) -> Tensor:
        logits = as_logits(self._call(input_shift), self.output_fn)
        if self.targets is not None:
            return self.loss_fn(logits, self.targets)
        if self.labels is None:
            kind = "sample" if self.penalty == "fisher" else "uniform"
            self.labels = sample_labels(logits, kind, self.generator)
        return F.cross_entropy(_upcast(logits), self.labels)


def _replace_first_tensor(
    args: tuple[Any, ...], kwargs: dict[str, Any], old: Tensor, new: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    for i, a in enumerate(args):
        if a is old:
            return (*args[:i], new, *args[i + 1 :]), kwargs
    key = next(k for k, v in kwargs.items() if v is old)
    return args, {**kwargs, key: new}


def _upcast(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half-precision logits are upcast for the loss)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def squared_norm(tensors: Sequence[Tensor | None]) -> Tensor:
    """``Σ ||t||²`` over the tensors that are not None, accumulated in at least float32.

    A 0-dim tensor, differentiable.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("no gradient to take the norm of: no parameter reaches the loss")
    return torch.stack([_upcast(t).pow(2).sum() for t in present]).sum()


def fisher_penalty(
    model: nn.Module,
    inputs: Tensor | Batch,
    *,
    penalty: str = "fisher",
    targets: Tensor | None = None,
    output_fn: OutputFn | None = None,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """The penalty ``P = ||∇ L||²`` as a differentiable scalar, to add to a loss.

    With the default ``penalty="fisher"`` this is ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²``,
    ŷ_i ~ p_θ(y|x_i) (FP paper, Eq. 3). ``loss + alpha * fisher_penalty(model, x)`` followed by
    ``backward()`` differentiates it exactly (double backprop). ``inputs`` is the model's input
    tensor, or a :class:`Batch` for models called with several arguments.
    """
    batch = inputs if isinstance(inputs, Batch) else Batch((inputs,), {}, targets)
    if targets is not None:
        batch = Batch(batch.args, batch.kwargs, targets)
    objective = PenaltyObjective(
        model, batch, penalty=penalty, params=params, output_fn=output_fn,
        loss_fn=loss_fn, generator=generator,
    )
    wrt = objective.wrt()
    grads = torch.autograd.grad(objective.loss(), wrt, create_graph=True, allow_unused=True)
    return squared_norm(grads)

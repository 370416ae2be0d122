"""One batch of a model call, and the one rule by which it is cut into examples.

A :class:`Batch` holds the positional and keyword inputs of one model call, plus optional
targets. The rule, for the measurements and the training wrappers alike:

* Its *examples* are counted by the first dimension of its first tensor input
  (:func:`num_examples`).
* A batch that is *cut* into examples (per-example gradients and their chunks, every
  measurement of :mod:`fisher_optim.curvature` that takes examples one by one,
  ``FisherPenaltySGD(penalty_batch_size=...)``, ``FisherNoiseSGD`` with per-example
  gradients or ``estimate_batch_size``: every :meth:`Batch.slice`) must hold the examples
  in the first dimension of *every* tensor input with a dimension, and of its targets
  (:func:`batch_size`, else ``ValueError`` naming the tensor and the fix). A tensor of
  another first dimension is not guessed to be shared: it may as well hold the examples
  in another dimension (a sequence-first ``[T, B, D]`` input with a ``[B, T]`` mask). Only
  0-d tensors and values that are not tensors (flags, ``use_cache=False``) are passed whole.
* A tensor shared by all examples whose first dimension happens to equal the number of
  examples (a ``[T, T]`` mask, a ``[T, 1]`` table with ``T == B``) cannot be told apart
  from one that holds examples, and is never guessed about either: pass it through the
  model itself (an attribute, ``functools.partial`` or a wrapper module). Every place that
  cuts a batch checks the consequence: the model run on the first and the last example
  alone must reproduce their outputs in the batch, else ``ValueError``
  (:func:`fisher_optim.curvature.examples.check_examples_alone`; the wrappers check once per
  input layout, :meth:`fisher_optim.wrapper.GradientWrapper.cut`).
* A batch that is run *whole* (``FisherPenaltySGD`` without ``penalty_batch_size``,
  ``FisherNoiseSGD(covariance="full")`` without ``estimate_batch_size``, Hessian-vector
  products) is passed to the model exactly as the training loop called it: nothing is
  cut, so nothing needs deciding, and shared tensors of any shape are fine there.

>>> import torch
>>> b = Batch((torch.zeros(4, 3), torch.tensor(2.0)), {"scale": 2.0}, torch.arange(4))
>>> part = b.slice(1, 3)
>>> part.args[0].shape, part.args[1].shape, part.kwargs, part.targets.tolist()
(torch.Size([2, 3]), torch.Size([]), {'scale': 2.0}, [1, 2])
>>> Batch((torch.zeros(4, 3), torch.ones(2, 2))).slice(0, 1)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: every tensor of a batch that is cut into examples must hold them ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = [
    "Batch",
    "Inputs",
    "InputsAndTargets",
    "batch_size",
    "call_model",
    "cut_examples",
    "holds_examples",
    "is_single_batch",
    "iter_batches",
    "model_inputs",
    "num_examples",
    "slice_batch",
]


def holds_examples(value: Any, n: int) -> bool:
    """Whether ``value`` is a tensor whose first dimension is the number of examples ``n``:
    what a cut batch cuts (its other tensors are 0-d, :func:`batch_size`)."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n


def cut_examples(value: Any, n: int, start: int, stop: int) -> Any:
    """``value[start:stop]`` if it holds the ``n`` examples (:func:`holds_examples`), else
    ``value`` unchanged."""
    return value[start:stop] if holds_examples(value, n) else value


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

    def num_examples(self) -> int:
        """The first dimension of the first tensor input."""
        x = self.first_tensor()
        if x.dim() == 0:
            raise ValueError("the model's first tensor input is 0-dimensional: no batch dimension")
        return x.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        """Examples ``start:stop``: every tensor (targets included) is cut
        (:func:`cut_examples`), every other value kept; ``ValueError`` unless each holds the
        examples in its first dimension (:func:`batch_size`)."""
        n = batch_size(self)
        return Batch(
            tuple(cut_examples(a, n, start, stop) for a in self.args),
            {k: cut_examples(v, n, start, stop) for k, v in self.kwargs.items()},
            None if self.targets is None else cut_examples(self.targets, n, start, stop),
        )

    def head(self, n: int | None) -> Batch:
        """The first ``n`` examples (:meth:`slice`); the batch itself, run whole, for None
        or an ``n`` of at least its number of examples."""
        return self if n is None or n >= self.num_examples() else self.slice(0, n)


Inputs = Tensor | Mapping[str, Any] | Batch
"""A batch of inputs: a tensor (examples in dimension 0), a mapping of keyword arguments
(a Hugging Face batch), or a :class:`Batch`."""
InputsAndTargets = tuple[Inputs, Tensor | None]


def model_inputs(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of the model call on ``x``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, Batch):
        return tuple(x.args), dict(x.kwargs)
    return (), dict(x)


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, ``model(**x)`` for a mapping, ``model(*args, **kwargs)`` for a ``Batch``."""
    args, kwargs = model_inputs(x)
    return model(*args, **kwargs)


def num_examples(x: Inputs) -> int:
    """The number of examples of a batch of inputs: the first dimension of its first tensor
    (:meth:`Batch.num_examples`; :func:`batch_size`, for a batch that is cut, also checks
    the others)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the inputs are a 0-dimensional tensor: no batch dimension")
        return x.shape[0]
    if isinstance(x, Batch):
        return x.num_examples()
    return Batch((), dict(x)).num_examples()


def _named_tensors(x: Inputs) -> list[tuple[str, Tensor]]:
    args, kwargs = model_inputs(x)
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    if isinstance(x, Batch) and x.targets is not None:
        named.append(("the targets", x.targets))
    return [(k, v) for k, v in named if isinstance(v, Tensor)]


def batch_size(x: Inputs) -> int:
    """The number of examples of a batch that is cut into examples (see the module): the
    first dimension of its first tensor input, which every tensor input with a dimension
    (and a ``Batch``'s targets) must share, else ``ValueError`` naming the one that does not.
    """
    n = num_examples(x)
    for key, v in _named_tensors(x):
        if v.dim() > 0 and v.shape[0] != n:
            raise ValueError(
                "every tensor of a batch that is cut into examples must hold them in its "
                f"first dimension: {key!s} has shape {tuple(v.shape)}, the batch has {n} "
                "examples (the first dimension of its first tensor). Pass inputs shared by "
                "all examples through the model itself (an attribute, functools.partial or "
                "a wrapper module), not in the batch"
            )
    return n


def slice_batch(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch, by the one slicing rule of
    :func:`cut_examples` (see the module)."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Batch):
        return x.slice(start, stop)
    n = batch_size(x)
    return {k: cut_examples(v, n, start, stop) for k, v in x.items()}


def _split(batch: Any) -> InputsAndTargets:
    if isinstance(batch, Batch):
        return Batch(batch.args, batch.kwargs), batch.targets
    if isinstance(batch, (Tensor, Mapping)):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        "a batch must be a tensor, a mapping of tensors, or a tuple/list (inputs, targets, "
        f"...); got {type(batch).__name__}"
    )


def iter_batches(data: Any) -> Iterator[InputsAndTargets]:
    """Yield ``(inputs, targets or None)`` for each batch of ``data`` (see module doc).

    >>> import torch
    >>> [(x.shape[0], y) for x, y in iter_batches(torch.zeros(4, 2))]
    [(4, None)]
    >>> len(list(iter_batches([(torch.zeros(3, 2), torch.zeros(3))] * 2)))
    2
    """
    if is_single_batch(data):
        yield _split(data)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a tensor, a mapping, a tuple (x, y) or an iterable of batches; "
            f"got {type(data).__name__}"
        )
    for batch in data:
        yield _split(batch)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one batch (rather than an iterable of batches)."""
    return isinstance(data, (Tensor, Mapping, tuple, Batch))

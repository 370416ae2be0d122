"""One batch of a model call, and the one rule by which it is cut into examples.

A :class:`Batch` holds the positional and keyword inputs of one model call, plus optional
targets. Its *examples* are counted by the first dimension of its first tensor input; a
tensor whose first dimension is that number holds the examples and is cut when the batch
is (:func:`cut_examples`); any other value (a 0-d tensor, a flag, a tensor of another first
dimension) is passed whole. A tensor shared by all examples whose first dimension happens
to equal the number of examples cannot be told apart: it must be passed through the model
itself (an attribute or ``functools.partial``); every per-example measurement checks that
the model on the first example alone reproduces that example's output in the batch, and
raises otherwise (:func:`fisher_optim.curvature.examples.check_first_example`).

>>> import torch
>>> b = Batch((torch.zeros(4, 3), torch.ones(2, 2)), {"scale": 2.0}, torch.arange(4))
>>> part = b.slice(1, 3)
>>> part.args[0].shape, part.args[1].shape, part.kwargs, part.targets.tolist()
(torch.Size([2, 3]), torch.Size([2, 2]), {'scale': 2.0}, [1, 2])
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
    the one rule by which a batch is cut."""
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
        """Examples ``start:stop``: every tensor (targets included) whose first dimension is
        the number of examples is cut (:func:`cut_examples`), every other value kept."""
        n = self.num_examples()
        return Batch(
            tuple(cut_examples(a, n, start, stop) for a in self.args),
            {k: cut_examples(v, n, start, stop) for k, v in self.kwargs.items()},
            None if self.targets is None else cut_examples(self.targets, n, start, stop),
        )

    def head(self, n: int | None) -> Batch:
        """The first ``n`` examples (the whole batch for None): :meth:`slice`."""
        return self if n is None else self.slice(0, n)


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
    (:meth:`Batch.num_examples`; ``curvature._data.batch_size`` also checks the others)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the inputs are a 0-dimensional tensor: no batch dimension")
        return x.shape[0]
    if isinstance(x, Batch):
        return x.num_examples()
    return Batch((), dict(x)).num_examples()


def slice_batch(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch, by the one slicing rule of
    :func:`cut_examples` (see the module)."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Batch):
        return x.slice(start, stop)
    n = num_examples(x)
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

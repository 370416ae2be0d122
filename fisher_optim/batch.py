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

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Batch", "cut_examples"]


def cut_examples(value: Any, n: int, start: int, stop: int) -> Any:
    """``value[start:stop]`` if ``value`` is a tensor holding ``n`` examples in its first
    dimension, else ``value`` unchanged: the one slicing rule of a batch."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[start:stop]
    return value


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

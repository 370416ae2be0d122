"""Shared plumbing of the measurements: chunks of a batch, devices, the labels a batch carries.

A *batch of inputs* is a tensor whose first dimension indexes examples, a mapping of
such tensors (keyword arguments of the model, as for Hugging Face models), or a
:class:`fisher_optim.Batch` (positional and keyword arguments). Every tensor of a mapping
or a ``Batch`` holds the examples in its first dimension (0-d tensors and other values,
such as ``use_cache=False``, are passed as they are): the one rule of
:mod:`fisher_optim.batch` for a batch that is cut into examples (:func:`batch_size`).
*Data* is one batch or an iterable of batches:

* a tensor or a mapping: one batch of inputs, without targets (a mapping's ``"labels"``,
  as Hugging Face batches carry them, serve as the targets of the Hessian measurements);
* a ``Batch``: one batch, with its ``targets``;
* a tuple ``(x, y, ...)``: one batch, with targets ``y``;
* anything else iterable (a list, a ``DataLoader``): batches, each of the kinds above, or
  a tuple/list ``(x, y, ...)`` as a ``DataLoader`` yields them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, Inputs, batch_size

__all__ = ["iter_chunks", "labels_of", "model_device", "to_device"]


def iter_chunks(x: Inputs, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` index pairs that cut a batch into chunks of ``chunk_size``."""
    n = batch_size(x)
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """Move a batch of inputs (or a target tensor) to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)

    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, Tensor) else v

    if isinstance(x, Batch):
        return Batch(
            tuple(move(a) for a in x.args),
            {k: move(v) for k, v in x.kwargs.items()},
            None if x.targets is None else move(x.targets),
        )
    return {k: move(v) for k, v in x.items()}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def labels_of(x: Inputs) -> Tensor | None:
    """The targets a batch of inputs carries itself: a mapping's ``"labels"`` (a Hugging
    Face batch), a ``Batch``'s ``targets``; else None."""
    if isinstance(x, Batch):
        return x.targets
    if isinstance(x, Mapping) and isinstance(x.get("labels"), Tensor):
        return x["labels"]
    return None

"""Shared plumbing of the measurements: batches, devices, argument checks.

A *batch of inputs* is a tensor whose first dimension indexes examples, or a mapping of
such tensors (keyword arguments of the model, as for Hugging Face models). *Data* is one
batch or an iterable of batches:

* a tensor or a mapping: one batch of inputs, without targets;
* a tuple ``(x, y, ...)``: one batch, with targets ``y``;
* anything else iterable (a list, a ``DataLoader``): batches, each a tensor, a mapping,
  or a tuple/list ``(x, y, ...)`` as a ``DataLoader`` yields them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Tensor]
Batch = tuple[Inputs, Tensor | None]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _split(batch: Any) -> Batch:
    if isinstance(batch, (Tensor, Mapping)):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        "a batch must be a tensor, a mapping of tensors, or a tuple/list (inputs, targets, "
        f"...); got {type(batch).__name__}"
    )


def iter_batches(data: Any) -> Iterator[Batch]:
    """Yield ``(inputs, targets or None)`` for each batch of ``data`` (see module doc).

    >>> [(x.shape[0], y) for x, y in iter_batches(torch.zeros(4, 2))]
    [(4, None)]
    >>> len(list(iter_batches([(torch.zeros(3, 2), torch.zeros(3))] * 2)))
    2
    """
    if isinstance(data, (Tensor, Mapping, tuple)):
        yield _split(data)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a tensor, a mapping, a tuple (x, y) or an iterable of batches; "
            f"got {type(data).__name__}"
        )
    for batch in data:
        yield _split(batch)


def batch_size(x: Inputs) -> int:
    """Number of examples in a batch of inputs."""
    if isinstance(x, Tensor):
        return x.shape[0]
    first = next(iter(x.values()), None)
    if not isinstance(first, Tensor):
        raise TypeError("a mapping batch must hold tensors")
    return first.shape[0]


def slice_batch(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch."""
    if isinstance(x, Tensor):
        return x[start:stop]
    return {k: v[start:stop] for k, v in x.items()}


def iter_chunks(x: Inputs, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` index pairs that cut a batch into chunks of ``chunk_size``."""
    n = batch_size(x)
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """Move a batch of inputs (or a target tensor) to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, or ``model(**x)`` for a mapping batch."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")

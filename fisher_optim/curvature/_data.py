"""Shared plumbing of the measurements: batches, devices, argument checks.

A *batch of inputs* is a tensor whose first dimension indexes examples, a mapping of
such tensors (keyword arguments of the model, as for Hugging Face models), or a
:class:`fisher_optim.Batch` (positional and keyword arguments). Every tensor of a mapping
or a ``Batch`` holds the examples in its first dimension (other values, such as
``use_cache=False``, are passed as they are); a tensor that does not is an error, never
guessed about, and one shared by all examples whose first dimension happens to equal the
batch size is caught by the first-example check (:mod:`.examples`): pass such tensors
through the model. *Data* is one batch or an iterable of batches:

* a tensor or a mapping: one batch of inputs, without targets (a mapping's ``"labels"``,
  as Hugging Face batches carry them, serve as the targets of the Hessian measurements);
* a ``Batch``: one batch, with its ``targets``;
* a tuple ``(x, y, ...)``: one batch, with targets ``y``;
* anything else iterable (a list, a ``DataLoader``): batches, each of the kinds above, or
  a tuple/list ``(x, y, ...)`` as a ``DataLoader`` yields them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._modules import unwrap
from .._targets import IGNORE_INDEX, TargetMask, is_causal_lm, is_hugging_face, target_rows
from ..batch import Batch as CallBatch
from ..batch import cut_examples
from ..validate import check_choice, check_positive_int

__all__ = [
    "CallBatch",
    "Inputs",
    "InputsAndTargets",
    "batch_size",
    "call_model",
    "check_choice",
    "check_positive_int",
    "is_single_batch",
    "iter_batches",
    "iter_chunks",
    "labels_of",
    "model_device",
    "model_inputs",
    "num_examples",
    "slice_batch",
    "to_device",
]

Inputs = Tensor | Mapping[str, Any] | CallBatch
InputsAndTargets = tuple[Inputs, Tensor | None]


def _split(batch: Any) -> InputsAndTargets:
    if isinstance(batch, CallBatch):
        return CallBatch(batch.args, batch.kwargs), batch.targets
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
    return isinstance(data, (Tensor, Mapping, tuple, CallBatch))


def model_inputs(x: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of the model call on ``x``."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, CallBatch):
        return tuple(x.args), dict(x.kwargs)
    return (), dict(x)


def _named_tensors(x: Inputs) -> list[tuple[str, Tensor]]:
    args, kwargs = model_inputs(x)
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [(k, v) for k, v in named if isinstance(v, Tensor)]


def batch_size(x: Inputs) -> int:
    """Number of examples in a batch of inputs: the first dimension of its tensors, which
    must agree (``ValueError`` naming the tensor that does not)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the inputs are a 0-dimensional tensor: no batch dimension")
        return x.shape[0]
    named = _named_tensors(x)
    if not named:
        raise TypeError("a batch must hold at least one tensor")
    n = None
    for key, v in named:
        size = v.shape[0] if v.dim() > 0 else None
        if n is None:
            n = size
        if size is None or size != n:
            raise ValueError(
                f"every tensor of a batch must hold the examples in its first dimension: "
                f"{key!s} has shape {tuple(v.shape)}, the batch has {n} examples. Pass "
                "inputs shared by all examples through the model (e.g. functools.partial or "
                "a wrapper module), not in the batch"
            )
    assert n is not None
    return n


def num_examples(x: Inputs) -> int:
    """The number of examples of a batch of inputs: the first dimension of its first tensor
    (:meth:`fisher_optim.Batch.num_examples`; :func:`batch_size` also checks the others)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the inputs are a 0-dimensional tensor: no batch dimension")
        return x.shape[0]
    if isinstance(x, CallBatch):
        return x.num_examples()
    return CallBatch((), dict(x)).num_examples()


def slice_batch(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch, by the one slicing rule of
    :func:`fisher_optim.batch.cut_examples` (see the module)."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, CallBatch):
        return x.slice(start, stop)
    n = num_examples(x)
    return {k: cut_examples(v, n, start, stop) for k, v in x.items()}


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

    if isinstance(x, CallBatch):
        return CallBatch(
            tuple(move(a) for a in x.args),
            {k: move(v) for k, v in x.kwargs.items()},
            None if x.targets is None else move(x.targets),
        )
    return {k: move(v) for k, v in x.items()}


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(x)``, ``model(**x)`` for a mapping, ``model(*args, **kwargs)`` for a ``Batch``."""
    args, kwargs = model_inputs(x)
    return model(*args, **kwargs)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _core(model: nn.Module) -> nn.Module:
    """The module behind DDP / ``torch.compile`` wrappers (what the target rules inspect)."""
    return getattr(unwrap(model), "_orig_mod", unwrap(model))


def target_row_mask(
    model: nn.Module, x: Inputs, n: int, rows: int, target_mask: TargetMask | None = None
) -> Tensor | None:
    """``[n, rows]``: which logit rows of ``model(x)`` have a target, or None for all.

    The conventions of :mod:`fisher_optim._targets` (Hugging Face models: padding,
    labels ``-100``, the causal shift; every row for other models; or the explicit
    ``target_mask``, called like the model), for logits of ``n`` examples with ``rows``
    rows each (``[n, C]`` when ``rows == 1``, except for a causal language model, whose
    logits are always ``[n, T, V]``).
    """
    args, kwargs = model_inputs(x)
    shape = (*rows_shape(model, n, rows), 1)
    mask = target_rows(_core(model), args, kwargs, shape, target_mask)
    return None if mask is None else mask.reshape(n, rows)


def rows_shape(model: nn.Module, n: int, rows: int) -> tuple[int, ...]:
    """The shape of the logits without their class dimension, for ``n`` examples of
    ``rows`` rows each: ``(n,)`` for one row (a classifier), else ``(n, rows)``; always
    ``(n, rows)`` for a Hugging Face causal language model (logits ``[B, T, V]``)."""
    return (n, rows) if rows > 1 or is_causal_lm(_core(model)) else (n,)


def row_targets(
    model: nn.Module,
    x: Inputs,
    y: Tensor,
    rows_shape: tuple[int, ...],
    target_mask: TargetMask | None = None,
) -> Tensor:
    """The true class of every logit row (``rows_shape``), ``IGNORE_INDEX`` where it has none.

    ``y`` holds one class per row; for a Hugging Face causal language model it is the
    model's ``labels`` (unshifted, the Hugging Face convention) and row ``t`` gets
    ``y[t + 1]``, the last row none. Rows that :mod:`fisher_optim._targets` finds without
    a target (padding, ..., or where ``target_mask`` says so) get ``IGNORE_INDEX`` too.
    """
    numel = 1
    for s in rows_shape:
        numel *= s
    if y.numel() != numel:
        raise ValueError(
            f"targets of shape {tuple(y.shape)} for logits with rows {tuple(rows_shape)}: "
            "pass one class index per row of the logits"
        )
    y = y.reshape(rows_shape)
    core = _core(model)
    if is_hugging_face(core) and is_causal_lm(core) and len(rows_shape) > 1:
        pad = torch.full((*rows_shape[:-1], 1), IGNORE_INDEX, dtype=y.dtype, device=y.device)
        y = torch.cat([y[..., 1:], pad], dim=-1)
    args, kwargs = model_inputs(x)
    mask = target_rows(core, args, kwargs, (*rows_shape, 1), target_mask)
    return y if mask is None else torch.where(mask.to(y.device), y, IGNORE_INDEX)


def labels_of(x: Inputs) -> Tensor | None:
    """The targets a batch of inputs carries itself: a mapping's ``"labels"`` (a Hugging
    Face batch), a ``Batch``'s ``targets``; else None."""
    if isinstance(x, CallBatch):
        return x.targets
    if isinstance(x, Mapping) and isinstance(x.get("labels"), Tensor):
        return x["labels"]
    return None

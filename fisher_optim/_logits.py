"""Turning model outputs into flat logits.

Shared by the penalty (what is penalized) and the curvature measurements: both need
``[N, C]`` logits, and labels sampled from them by a likelihood
(:mod:`fisher_optim.likelihoods`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

OutputFn = Callable[[Any], Tensor]


def as_logits(
    output: Any, output_fn: OutputFn | None = None, examples: int | None = None
) -> Tensor:
    """Map a model output to logits of shape ``[N, C]``.

    ``output_fn`` picks the logits out of whatever the model returns (a dict, a tuple, a
    Hugging Face ``ModelOutput``); by default the output itself is the logits, or its
    ``logits`` (see :func:`pick_logits`). Logits of shape ``[..., C]`` (a language model's
    ``[B, T, V]``) are flattened so that every position is one row, and so gets its own label.

    >>> import torch
    >>> as_logits(torch.zeros(2, 3, 5)).shape
    torch.Size([6, 5])
    """
    logits = pick_logits(output, output_fn, examples)
    return logits.reshape(-1, logits.shape[-1])


def pick_logits(
    output: Any, output_fn: OutputFn | None = None, examples: int | None = None
) -> Tensor:
    """The logits ``[..., C]`` of a model output, not flattened.

    ``output_fn(output)`` if given; else the output itself if it is a tensor; else its
    ``"logits"`` entry (a dict, a Hugging Face ``ModelOutput``) or ``.logits`` attribute (a
    dataclass), so that Hugging Face models need no ``output_fn``. ``examples``, the number
    of examples the model was called on, if known, tells an output without a batch dimension
    (:func:`check_batched`) from one number per example.

    >>> import torch
    >>> pick_logits({"loss": torch.tensor(0.0), "logits": torch.zeros(2, 3, 5)}).shape
    torch.Size([2, 3, 5])
    """
    logits = model_output(output, output_fn)
    if examples is not None:
        check_batched(logits, examples)
    if logits.dim() == 1 and output_fn is None:
        raise ValueError(
            f"the model's output has shape {tuple(logits.shape)}: one dimension, where "
            "logits [batch, ..., num_classes] have two or more. If the model was called on "
            "one unbatched example, call it on a batch (x.unsqueeze(0) for one example): the "
            "first dimension of the input holds the examples. If it returns one number per "
            "example, give it a class dimension with output_fn=lambda out: out.unsqueeze(-1) "
            "(and likelihood='bernoulli' or 'gaussian')"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape [..., num_classes], got {tuple(logits.shape)}; "
            "pass output_fn=... that returns the class logits"
        )
    return logits


def check_batched(output: Tensor, examples: int) -> None:
    """Refuse a one-dimensional output whose length is not the number of examples the model
    was called on: the model ran on one unbatched example (an ``nn.Linear`` takes a ``[4]``
    input as one example and returns ``[C]``).

    >>> import torch
    >>> check_batched(torch.zeros(3), examples=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: the model's output has shape (3,) for inputs whose first dimension is 4: ...
    """
    if output.dim() == 1 and output.shape[0] != examples:
        raise ValueError(
            f"the model's output has shape {tuple(output.shape)} for inputs whose first "
            f"dimension is {examples}: it has no batch dimension, so the model was called on "
            "one unbatched example. Call it on a batch, the examples in the first dimension "
            "of the input (x.unsqueeze(0) for one example)"
        )


def model_output(output: Any, output_fn: OutputFn | None = None) -> Tensor:
    """The tensor a loss receives from ``output``, any shape (see :func:`pick_logits`).

    >>> import torch
    >>> model_output({"logits": torch.zeros(4)}).shape
    torch.Size([4])
    """
    logits = output if output_fn is None else output_fn(output)
    if output_fn is None and not isinstance(logits, Tensor):
        if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
            logits = output["logits"]
        elif isinstance(getattr(output, "logits", None), Tensor):
            logits = output.logits
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the model output is a {type(logits).__name__}, not a tensor of logits "
            "(nor has it a tensor 'logits'); pass output_fn=... that maps the model's output "
            "to logits"
        )
    return logits


def check_cross_entropy_outputs(logits: Tensor, what: str) -> None:
    """Refuse cross-entropy over one output: it is identically 0 (a softmax over one class is
    1), so every gradient computed from it would silently be 0."""
    if logits.shape[-1] < 2:
        raise ValueError(
            f"{what} uses the cross-entropy of the true targets, but the model has "
            f"{logits.shape[-1]} output per row: over one class the cross-entropy is "
            "identically 0 and so is every gradient of it. Give the model one output per class "
            "(2 for a binary task), or measure a one-output model through the Fisher with "
            "likelihood='bernoulli' or 'gaussian'"
        )

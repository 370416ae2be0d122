"""Turning model outputs into flat logits, and drawing labels from them.

Shared by the penalty (what is penalized) and the curvature measurements: both need
``[N, C]`` logits and labels sampled from the model's predictive distribution
``p_θ(y|x) = softmax(logits)`` (the *true* Fisher, not the empirical one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

OutputFn = Callable[[Any], Tensor]

LABEL_KINDS = ("sample", "uniform")


def as_logits(output: Any, output_fn: OutputFn | None = None) -> Tensor:
    """Map a model output to logits of shape ``[N, C]``.

    ``output_fn`` picks the logits out of whatever the model returns (a dict, a tuple, a
    Hugging Face ``ModelOutput``); by default the output itself is the logits. Logits of
    shape ``[..., C]`` (a language model's ``[B, T, V]``) are flattened so that every
    position is one row, and so gets its own label.

    >>> as_logits(torch.zeros(2, 3, 5)).shape
    torch.Size([6, 5])
    """
    logits = output if output_fn is None else output_fn(output)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the model output is a {type(logits).__name__}, not a tensor of logits; "
            "pass output_fn=... that maps the model's output to logits"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape [..., num_classes], got {tuple(logits.shape)}; "
            "pass output_fn=... that returns the class logits"
        )
    return logits.reshape(-1, logits.shape[-1])


def sample_labels(
    logits: Tensor, kind: str = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """Draw one label per row of ``logits`` (``[N, C]``), without gradient.

    ``kind="sample"``: ŷ ~ softmax(logits), the model's own predictive distribution
    (FP paper, Eq. 2). ``kind="uniform"``: ŷ uniform over the C classes (the GPr penalty).

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_labels(torch.tensor([[0.0, 50.0], [50.0, 0.0]]), generator=g).tolist()
    [1, 0]
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    with torch.no_grad():
        if kind == "uniform":
            return torch.randint(
                logits.shape[-1], (logits.shape[0],), device=logits.device, generator=generator
            )
        probs = torch.softmax(logits.detach().float(), dim=-1)
        # Rows with non-finite logits get uniform labels: the loss at them is then non-finite
        # and the caller (e.g. FisherPenaltySGD) skips the result, instead of crashing here.
        bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(bad, torch.ones_like(probs), probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

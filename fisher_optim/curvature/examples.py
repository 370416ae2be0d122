"""The examples of a batch, one at a time: the check that they are independent, and their
gradients by ``torch.func.vmap(grad)`` or a loop.

Every tensor of a batch holds the examples in its first dimension (see
:mod:`fisher_optim.curvature._data`); a tensor shared by all examples (an attention mask
``[T, T]``, a table ``[T, 1]``) whose first dimension happens to equal the batch size
cannot be told apart from one that holds examples, and is never guessed about: pass it
through the model itself (an attribute, ``functools.partial`` or a wrapper module), not in
the batch. What is checked instead is the consequence: the model run on the first example
alone (its tensors cut as every per-example pass cuts them) must reproduce that example's
output in the batch (:func:`check_first_example`), else ``ValueError``. The same check
catches examples that interact (BatchNorm with batch statistics, a model that mixes rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SHARED_INPUT_HINT", "check_first_example", "same_values"]

SHARED_INPUT_HINT = (
    "every tensor input whose first dimension is the batch size is taken as holding the "
    "examples; pass inputs shared by all examples (e.g. a [T, T] mask, or a [T, 1] table "
    "with T equal to the batch size) through the model itself (an attribute or "
    "functools.partial), not in the batch, and make sure examples do not interact (eval mode)"
)


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` have one shape and equal values up to rounding (relative
    ``sqrt(eps)`` of ``a``'s dtype, at the scale of ``a``'s largest finite entry)."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b.to(a.device))
    tol = torch.finfo(a.dtype).eps ** 0.5
    finite = torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0)  # a diverged model: NaN/Inf
    scale = float(finite.max()) if a.numel() else 0.0
    return torch.allclose(
        a, b.to(device=a.device, dtype=a.dtype), rtol=tol, atol=tol * scale, equal_nan=True
    )


def check_first_example(first: Tensor, alone: Tensor, n: int, who: str) -> None:
    """Raise ``ValueError`` unless ``alone`` (the model's output for the first example run
    alone) equals ``first`` (that example's rows of the output for the whole batch of ``n``).

    >>> check_first_example(torch.ones(1, 3), torch.ones(1, 3), 4, "a doctest")
    >>> check_first_example(torch.ones(1, 3), torch.zeros(1, 3), 4, "a doctest")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: a doctest: the model run on the first example alone does not reproduce ...
    """
    first, alone = first.detach(), alone.detach()
    if not bool(torch.isfinite(first).all()) or same_values(first, alone):
        return  # non-finite: nothing to compare (the measurement reports it as it is)
    raise ValueError(
        f"{who}: the model run on the first example alone does not reproduce that "
        f"example's output in the batch of {n} (shapes {tuple(alone.shape)} and "
        f"{tuple(first.shape)}), so per-example gradients would be wrong: " + SHARED_INPUT_HINT
    )

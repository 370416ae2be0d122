"""The examples of a batch, one at a time: the check that they are independent, and their
gradients by ``torch.func.vmap(grad)`` or a loop.

Every tensor of a batch holds the examples in its first dimension (see
:mod:`fisher_optim.batch`); a tensor shared by all examples (an attention mask
``[T, T]``, a table ``[T, 1]``) whose first dimension happens to equal the batch size
cannot be told apart from one that holds examples, and is never guessed about: pass it
through the model itself (an attribute, ``functools.partial`` or a wrapper module), not in
the batch. What is checked instead is the consequence: the model run on the first and on
the last example alone (their tensors cut as every per-example pass cuts them) must
reproduce those examples' outputs in the batch (:func:`check_examples_alone`), else
``ValueError``. The same check catches examples that interact (BatchNorm with batch
statistics, a running mean or causal attention across the batch dimension: such mixing
leaves one end of the batch untouched, never both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._as_found import left_as_found, renormalising_parameters, substituted_parameters
from .._logits import OutputFn, as_logits
from ..batch import Inputs, call_model, holds_examples, model_inputs, num_examples, slice_batch

__all__ = [
    "SHARED_INPUT_HINT",
    "ExampleLoss",
    "check_examples_alone",
    "renormalise_first",
    "example_grads",
    "probe_indices",
    "same_values",
    "values_close",
]

ExampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``(logits [R, C] of one example, its entry of the per-example extra) -> scalar loss``."""

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
    return bool(values_close(a, b))  # one host read


def values_close(a: Tensor, b: Tensor) -> Tensor:
    """:func:`same_values` of two tensors of one shape as a 0-dim bool tensor on ``a``'s
    device (nothing read back, so that several checks cost one host read): for floating
    tensors ``torch.allclose`` (``equal_nan``) with ``rtol = sqrt(eps)`` of ``a``'s dtype
    and ``atol = rtol · max finite |a|``; equality otherwise."""
    if not a.is_floating_point():
        return (a == b.to(a.device)).all()
    b = b.to(device=a.device, dtype=a.dtype)
    if not a.numel():
        return torch.ones((), dtype=torch.bool, device=a.device)
    tol = torch.finfo(a.dtype).eps ** 0.5
    scale = torch.nan_to_num(a.abs(), nan=0.0, posinf=0.0).max()  # a diverged model: NaN/Inf
    near = (a - b).abs() <= tol * scale + tol * b.abs()
    same = (a == b) | (a.isnan() & b.isnan())  # infinities of one sign, NaNs
    return torch.where(a.isfinite() & b.isfinite(), near, same).all()


def probe_indices(n: int) -> tuple[int, ...]:
    """The examples run alone to check a batch of ``n``: the first and the last. A model
    that mixes examples in one direction only (a running mean over the batch, attention
    across the batch dimension with a causal mask) leaves one end untouched, never both."""
    return (0,) if n == 1 else (0, n - 1) if n > 1 else ()


def check_examples_alone(pairs: Sequence[tuple[int, Tensor, Tensor]], n: int, who: str) -> None:
    """Raise ``ValueError`` unless, for each ``(i, in_batch, alone)``, ``alone`` (the model's
    output for example ``i`` run alone) equals ``in_batch`` (that example's rows of the
    output for the whole batch of ``n``), up to rounding. One host read for all pairs; a
    pair whose batch rows are not finite is not judged (a diverged model is reported as it
    is elsewhere).

    >>> ones = torch.ones(1, 3)
    >>> check_examples_alone([(0, ones, ones), (3, ones, ones)], 4, "a doctest")
    >>> check_examples_alone([(0, ones, ones), (3, ones, 0 * ones)], 4, "a doctest")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: a doctest: the model run on the last example (index 3) alone does not ...
    """
    verdicts = []
    for _, in_batch, alone in pairs:
        in_batch, alone = in_batch.detach(), alone.detach()
        finite = torch.isfinite(in_batch).all() if in_batch.is_floating_point() else None
        if in_batch.shape != alone.shape:
            verdicts.append(torch.zeros((), dtype=torch.bool, device=in_batch.device))
        else:
            close = values_close(in_batch, alone)
            verdicts.append(close if finite is None else ~finite | close)
    if not verdicts:
        return
    oks = torch.stack([v.to(verdicts[0].device) for v in verdicts]).tolist()  # one host read
    for (i, in_batch, alone), ok in zip(pairs, oks, strict=True):
        if not ok:
            which = "first example" if i == 0 else f"last example (index {i})"
            raise ValueError(
                f"{who}: the model run on the {which} alone does not reproduce that "
                f"example's output in the batch of {n} (shapes {tuple(alone.shape)} and "
                f"{tuple(in_batch.shape)}), so per-example gradients would be wrong: "
                "examples must not interact (a running mean or attention across the batch "
                "dimension mixes them; so does BatchNorm in training mode), and "
                + SHARED_INPUT_HINT
            )


def renormalise_first(model: nn.Module, inputs: Inputs) -> None:
    """Run the whole batch once, without gradients, when a forward of ``model`` rescales
    embedding rows in place (``max_norm``, :func:`~fisher_optim._as_found.renormalising_parameters`):
    the rows the batch renormalises are then renormalised before the first example runs
    alone, as that example's output in the batch sees them (a head tied to the embedding
    reads every row). The caller's ``left_as_found`` writes the rows back; the buffers this
    forward changes (a power iteration's vectors, running statistics) are restored at once."""
    if renormalising_parameters(model):
        with torch.no_grad(), left_as_found(model):
            call_model(model, inputs)


def example_grads(
    model: nn.Module,
    x: Inputs,
    extra: Tensor,
    params: list[Tensor],
    loss: ExampleLoss,
    output_fn: OutputFn | None = None,
    start: int = 0,
) -> list[Tensor]:
    """``∇_params loss(logits_i, extra[i - start])`` for the examples ``i`` in
    ``start : start + len(extra)`` of the batch ``x``: one tensor ``[len(extra), *p.shape]``
    per parameter (zeros where the loss does not reach it), ``logits_i`` the rows
    ``[R, C]`` of ``as_logits(model(x_i))``.

    The examples are cut by the one slicing rule (:func:`fisher_optim.batch.cut_examples`,
    decided on the whole batch ``x``). By ``torch.func.vmap(grad)`` over single examples,
    the parameters substituted by identity
    (:func:`fisher_optim._as_found.substituted_parameters`, so a model with a module
    registered twice is left exactly as found); a model that ``vmap`` cannot run
    (data-dependent control flow, as in the attention-mask code of Hugging Face models) is
    run one example at a time instead. Exact either way.
    """
    try:
        return _vmap_grads(model, x, extra, params, loss, output_fn, start)
    except Exception:  # noqa: BLE001 - the loop below reruns the model and re-raises its errors
        pass
    rows = []
    with torch.enable_grad():
        for i, e in enumerate(extra, start):
            logits = as_logits(call_model(model, slice_batch(x, i, i + 1)), output_fn)
            grads = torch.autograd.grad(loss(logits, e), params, allow_unused=True)
            rows.append([torch.zeros_like(p) if d is None else d for d, p in zip(grads, params)])
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def _vmap_grads(
    model: nn.Module,
    x: Inputs,
    extra: Tensor,
    params: list[Tensor],
    loss: ExampleLoss,
    output_fn: OutputFn | None,
    start: int,
) -> list[Tensor]:
    from torch.func import grad, vmap

    keys = [id(p) for p in params]
    n, stop = num_examples(x), start + extra.shape[0]
    flat, spec = tree_flatten(model_inputs(x))
    slots = [i for i, v in enumerate(flat) if holds_examples(v, n)]

    def surrogate(theta: tuple[Tensor, ...], tensors: tuple[Tensor, ...], e: Tensor) -> Tensor:
        leaves = list(flat)
        for i, t in zip(slots, tensors, strict=True):
            leaves[i] = t.unsqueeze(0)
        args, kwargs = tree_unflatten(leaves, spec)
        with substituted_parameters(model, dict(zip(keys, theta, strict=True))):
            out = model(*args, **kwargs)
        return loss(as_logits(out, output_fn), e)

    theta = tuple(p.detach() for p in params)
    tensors = tuple(flat[i][start:stop] for i in slots)
    with torch.no_grad():
        return list(vmap(grad(surrogate), in_dims=(None, 0, 0))(theta, tensors, extra))

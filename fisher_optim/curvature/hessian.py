"""Hessian-vector products of a model's loss over data, and random probe vectors.

``H v`` by double backprop (Pearlmutter 1994): ``H v = ∇_θ <∇_θ L(θ), v>``, with
``torch.autograd.grad(..., create_graph=True)``; ``.grad`` is never touched. The loss is
the mean over all examples, ``L = Σ_b n_b L_b / Σ_b n_b`` for batches ``b`` of ``n_b``
examples, each ``L_b = loss_fn(output_b, y_b)`` a mean over its batch.

With the default ``loss_fn=F.cross_entropy`` and integer targets, ``L_b`` is the mean
cross-entropy over the logit rows that have a target: logits ``[..., C]`` are taken as rows
(a language model's ``[B, T, V]`` included), rows whose target is ``-100`` are ignored, and
for a Hugging Face model the conventions of :mod:`fisher_optim.targets` apply (padding
excluded; a causal LM's targets are its ``labels`` shifted by one, as its own loss does).
The targets may come with the batch: ``(x, y)``, a :class:`fisher_optim.Batch` with
``targets``, or a Hugging Face batch dict carrying ``"labels"``. Attention runs on the
math kernel of scaled-dot-product attention (the fused kernels have no double backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._as_found import left_as_found, renormalised_on_copies
from .._logits import OutputFn, pick_logits
from .._modules import math_attention, trainable_parameters
from ..batch import Inputs, call_model, is_single_batch, iter_batches, num_examples
from ..targets import row_targets
from ..validate import check_choice
from ._data import labels_of, model_device, to_device

DISTRIBUTIONS = ("rademacher", "gaussian")

LossFn = Callable[[Any, Tensor], Tensor]
MatVec = Callable[[Tensor], Tensor]


def random_probe(
    dim: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    num: int | None = None,
) -> Tensor:
    """A random vector ``[dim]`` (or matrix ``[dim, num]``) with ``E[z z^T] = I``.

    ``"rademacher"``: entries ±1 with probability 1/2 (Hutchinson 1989, the least variance
    for a fixed matrix); ``"gaussian"``: standard normal entries. Drawn on the generator's
    device, then moved to ``device``.

    >>> random_probe(4, generator=torch.Generator().manual_seed(0)).abs().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    shape = (dim,) if num is None else (dim, num)
    where = generator.device if generator is not None else device
    if distribution == "gaussian":
        z = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    else:
        z = torch.randint(0, 2, shape, generator=generator, device=where).to(dtype) * 2 - 1
    return z.to(device) if device is not None else z


class HessianOperator:
    """``v ↦ H v`` for the Hessian of the mean loss over ``data`` w.r.t. the trainable
    parameters, on flat vectors of length ``dim``.

    Runs the model in the mode it is in: callers wrap the use in
    :func:`fisher_optim._modules.eval_mode` so that BatchNorm uses its running statistics
    (with batch statistics the loss would couple examples and the statistics would move).
    For a single batch the first-order graph is built once and reused by every product;
    for an iterable of batches it is rebuilt batch by batch (memory of one batch).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss_fn: LossFn,
        output_fn: OutputFn | None = None,
    ) -> None:
        self.model, self.data, self.loss_fn, self.output_fn = model, data, loss_fn, output_fn
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.dim = sum(p.numel() for p in self.params)
        self.device, self.dtype = model_device(model), self.params[0].dtype
        self._single = is_single_batch(data)
        self._cached: tuple[list[Tensor | None], int] | None = None
        self.num_matvecs = 0

    def _batches(self) -> Iterator[tuple[Inputs, Tensor]]:
        for x, y in iter_batches(self.data):
            y = labels_of(x) if y is None else y
            if y is None:
                raise ValueError(
                    "Hessian measurements need targets: batches (x, y), a Batch with "
                    "targets, or a mapping with 'labels' (a Hugging Face batch)"
                )
            yield to_device(x, self.device), to_device(y, self.device)

    def _gradient(self, x: Inputs, y: Tensor) -> list[Tensor | None]:
        with math_attention(), left_as_found(self.model), renormalised_on_copies(self.model):
            out = call_model(self.model, x)
            if self.loss_fn is F.cross_entropy and pick_logits(out, self.output_fn).shape[-1] == 1:
                raise ValueError(
                    "the model has one output and loss_fn is the default cross-entropy, a "
                    "softmax over one class: the loss and its Hessian are identically 0. Pass "
                    "the loss of a one-output model, e.g. loss_fn=F.binary_cross_entropy_with_"
                    "logits (binary, one logit) or loss_fn=F.mse_loss (regression)"
                )
            if self.loss_fn is F.cross_entropy and not y.is_floating_point():
                logits = pick_logits(out, self.output_fn)
                targets = row_targets(self.model, x, y, tuple(logits.shape[:-1]))
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            else:
                out = out if self.output_fn is None else self.output_fn(out)
                loss = self.loss_fn(out, y)
            return list(
                torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            )

    def _hvp(self, grads: list[Tensor | None], v: Tensor, keep: bool) -> Tensor:
        pairs = [(g, u) for g, u in zip(grads, self._split(v), strict=True) if g is not None]
        if not pairs or not any(g.requires_grad for g, _ in pairs):
            return torch.zeros_like(v)
        dot = sum((g * u).sum() for g, u in pairs)
        hv = torch.autograd.grad(dot, self.params, retain_graph=keep, allow_unused=True)
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, self.params, strict=True)
            ]
        )

    def _split(self, v: Tensor) -> list[Tensor]:
        return [
            c.view_as(p)
            for c, p in zip(v.split([p.numel() for p in self.params]), self.params, strict=True)
        ]

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length :attr:`dim`."""
        v = v.to(device=self.device, dtype=self.dtype)
        self.num_matvecs += 1
        with torch.enable_grad():
            if self._single:
                if self._cached is None:
                    x, y = next(self._batches())
                    self._cached = (self._gradient(x, y), num_examples(x))
                return self._hvp(self._cached[0], v, keep=True)
            total, count = torch.zeros_like(v), 0
            for x, y in self._batches():
                n = num_examples(x)  # run whole: not cut (fisher_optim.batch)
                total += n * self._hvp(self._gradient(x, y), v, keep=False)
                count += n
            if count == 0:
                raise ValueError("data holds no examples")
            return total / count

    __call__ = matvec

"""The trace of the Fisher information matrix, Tr(F), and its mini-batch version Tr(F_B).

Jastrzebski et al., "Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts
Generalization", ICML 2021, Eq. 2:

    Tr(F) = E_{x ~ data} E_{ŷ ~ p_θ(y|x)} ||∇_θ ℓ(x, ŷ)||²,

the *true* Fisher: the labels ŷ are drawn from the model's own predictive distribution
``softmax(logits)``, not taken from the data. Its mini-batch version, the quantity the
Fisher penalty adds to the loss, is the squared norm of the mean gradient:

    Tr(F_B) = ||(1/N) Σ_i ∇_θ ℓ(x_i, ŷ_i)||².

For ``[B, T, C]`` logits (a sequence model) every position draws its own label and an
example's loss is the mean cross-entropy over its positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._logits import OutputFn, as_logits, sample_labels
from .._modules import eval_mode, frozen_batchnorm_stats, trainable_parameters
from ._data import (
    Inputs,
    batch_size,
    call_model,
    check_choice,
    check_positive_int,
    iter_batches,
    iter_chunks,
    model_device,
    slice_batch,
    to_device,
)
from .per_example import CotangentFn, per_example_sq_norms

__all__ = ["LABEL_MODES", "fisher_trace", "minibatch_fisher_trace"]

LABEL_MODES = ("sample", "exact")


def _draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """``ŷ ~ softmax(logits)`` per row, using ``generator`` on whatever device it lives."""
    if generator is not None and generator.device != logits.device:
        return sample_labels(logits.detach().to(generator.device), generator=generator).to(
            logits.device
        )
    return sample_labels(logits, generator=generator)


def _sampled_cotangents(generator: torch.Generator | None) -> CotangentFn:
    """One cotangent ``(softmax - onehot(ŷ)) / R`` with one ŷ drawn per row."""

    def make(logits: Tensor) -> Iterable[Tensor]:
        n, rows, c = logits.shape
        y = _draw(logits.reshape(-1, c), generator).reshape(n, rows)
        probs = torch.softmax(logits, -1)
        return [(probs - F.one_hot(y, c).to(probs.dtype)) / rows]

    return make


def _exact_cotangents(logits: Tensor) -> Iterable[Tensor]:
    """``sqrt(p_c) (p - e_c) / R`` at one row ``r`` at a time, for every row and class.

    ``E_ŷ ||J^T (p - e_ŷ)||² = Σ_c p_c ||J^T (p - e_c)||²``, and with one label per row the
    cross terms between rows vanish because the score has zero mean, ``E_ŷ (p - e_ŷ) = 0``.
    """
    rows, c = logits.shape[1:]
    probs = torch.softmax(logits, -1)
    eye = torch.eye(c, dtype=probs.dtype, device=probs.device)
    for r in range(rows):
        for k in range(c):
            g = torch.zeros_like(probs)
            g[:, r] = probs[:, r, k].sqrt().unsqueeze(-1) * (probs[:, r] - eye[k]) / rows
            yield g


def fisher_trace(
    model: nn.Module,
    data: Any,
    *,
    labels: str = "sample",
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Tr(F), the trace of the Fisher information matrix over ``data`` (paper Eq. 2).

    ``Tr(F) = (1/N) Σ_i E_{ŷ~p_θ(·|x_i)} ||∇_θ ℓ(x_i, ŷ)||²`` over the trainable
    parameters θ, with ``ℓ`` the cross-entropy of one example.

    * ``labels="sample"``: one ŷ per example (per row of ``[B, T, C]`` logits) drawn from
      ``softmax(logits)`` with ``generator``: an unbiased estimate, at the cost of about one
      batched forward+backward (per-example norms by ghost norms, see
      :mod:`fisher_optim.curvature.per_example`).
    * ``labels="exact"``: ``Σ_c p(c|x) ||∇ℓ(x, c)||²``, no sampling noise; one backward
      per class (and per position for sequences), so for few classes only.

    ``data`` is a batch of inputs or an iterable of batches (a ``DataLoader`` yielding
    ``(x, y)`` or ``x``); targets are ignored. Memory is bounded by ``chunk_size``
    examples. The model is evaluated in eval mode (BatchNorm with running statistics,
    no dropout) and left exactly as found: parameters, buffers, ``.grad``, training flags.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.randn(32, 4)
    >>> exact = fisher_trace(net, x, labels="exact")
    >>> g = torch.Generator().manual_seed(0)
    >>> sampled = sum(fisher_trace(net, x, generator=g) for _ in range(200)) / 200
    >>> abs(sampled - exact) / exact < 0.1
    True
    """
    check_choice("labels", labels, LABEL_MODES)
    check_positive_int("chunk_size", chunk_size)
    cotangents = _sampled_cotangents(generator) if labels == "sample" else _exact_cotangents
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(model):
        for x, _ in iter_batches(data):
            x = to_device(x, device)
            for start, stop in iter_chunks(x, chunk_size):
                chunk = slice_batch(x, start, stop)
                sq = per_example_sq_norms(model, chunk, cotangents, output_fn=output_fn)
                total += sq.sum(dtype=torch.float64)
                count += stop - start
    if count == 0:
        raise ValueError("data holds no examples")
    return float(total) / count


def minibatch_fisher_trace(
    model: nn.Module,
    inputs: Inputs,
    *,
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Tr(F_B) = ||(1/N) Σ_i ∇_θ ℓ(x_i, ŷ_i)||², ŷ_i ~ softmax(logits_i), for one batch.

    The quantity the Fisher penalty regularises (Jastrzebski et al., ICML 2021, Sec. 3).
    Averaged over the labels it is ``Tr(F)/N`` on this batch of ``N`` examples (the cross
    terms vanish because the score has zero mean), so it is a scaled, noisy proxy of
    Tr(F). One batched forward+backward of the mean sampled cross-entropy
    (over all ``N`` logit rows), in the model's current mode: in training mode BatchNorm
    normalises with batch statistics, as in training, but its running statistics are left
    untouched. ``.grad`` is not touched.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(4, 3)
    >>> minibatch_fisher_trace(net, torch.randn(8, 4), generator=torch.Generator()) > 0
    True
    """
    params = trainable_parameters(model)
    inputs = to_device(inputs, model_device(model))
    if batch_size(inputs) == 0:
        raise ValueError("inputs hold no examples")
    with torch.enable_grad(), frozen_batchnorm_stats(model):
        logits = as_logits(call_model(model, inputs), output_fn)
        loss = F.cross_entropy(logits, _draw(logits, generator))
        if not params or not loss.requires_grad:
            return 0.0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(sum(g.double().square().sum() for g in grads if g is not None))

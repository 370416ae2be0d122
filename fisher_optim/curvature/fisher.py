"""The trace of the Fisher information matrix, Tr(F), and its mini-batch version Tr(F_B).

Jastrzebski et al., "Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts
Generalization", ICML 2021, Eq. 2:

    Tr(F) = E_{x ~ data} E_{ŷ ~ p_θ(y|x)} ||∇_θ ℓ(x, ŷ)||²,

the *true* Fisher: the labels ŷ are drawn from the model's own predictive distribution
``softmax(logits)``, not taken from the data. Its mini-batch version, the quantity the
Fisher penalty adds to the loss, is the squared norm of the mean gradient:

    Tr(F_B) = ||(1/N) Σ_i ∇_θ ℓ(x_i, ŷ_i)||².

For ``[B, T, C]`` logits (a sequence model) every position draws its own label and an
example's loss is the mean cross-entropy over its positions that have a target: for a
Hugging Face model, positions that are padding (``attention_mask`` 0), labelled ``-100``,
or the last position of a causal language model (no next token) take no part
(:mod:`fisher_optim.targets`); other models use every position.

``likelihood=`` chooses ``p_θ(y|x)`` (:mod:`fisher_optim.likelihoods`): ``"categorical"``
(softmax, the default), ``"bernoulli"`` (one logit per binary label) or ``"gaussian"``
(regression, ``N(f(x), σ²)``, whose Fisher is ``J^T J / σ²``). With one output per row the
categorical likelihood raises: a softmax over one class has Tr(F) identically 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._as_found import left_as_found
from .._logits import OutputFn, as_logits
from .._modules import eval_mode, frozen_batchnorm_stats, trainable_parameters
from ..batch import Inputs, batch_size, call_model, iter_batches, slice_batch
from ..likelihoods import Categorical, Likelihood, get_likelihood
from ..targets import TargetMask, target_row_mask
from ..validate import check_choice, check_positive_int
from ._data import iter_chunks, model_device, to_device
from .ghost import CotangentFn
from .per_example import per_example_sq_norms

__all__ = ["LABEL_MODES", "fisher_trace", "minibatch_fisher_trace"]

LABEL_MODES = ("sample", "exact")


def _draw(
    logits: Tensor, generator: torch.Generator | None, likelihood: Likelihood | None = None
) -> Tensor:
    """``ŷ ~ p_θ(·|logits)`` per row (softmax by default), using ``generator`` on whatever
    device it lives."""
    return (likelihood or Categorical()).sample(logits, generator)


RowMask = Callable[[int, int], Tensor | None]
"""``(n, rows) -> [n, rows]`` bool: which logit rows have a target (None: all)."""


def _recording_row_mask(
    model: nn.Module, x: Inputs, target_mask: TargetMask | None, seen: list[Tensor | None]
) -> RowMask:
    """The row mask of ``model(x)``'s logits (see ``target_row_mask``), appended to ``seen``
    each time it is asked for, so that the caller can count the examples with a target."""

    def row_mask(n: int, rows: int) -> Tensor | None:
        seen.append(target_row_mask(model, x, n, rows, target_mask=target_mask))
        return seen[-1]

    return row_mask


def _row_weights(logits: Tensor, row_mask: RowMask | None) -> Tensor:
    """``[n, R]``: ``1/R_i`` at the ``R_i`` rows of example ``i`` that have a target, else 0
    (``ℓ_i`` is the mean over those rows; see :func:`..._data.target_row_mask`)."""
    n, rows = logits.shape[:2]
    mask = None if row_mask is None else row_mask(n, rows)
    valid = (
        torch.ones(n, rows, dtype=logits.dtype, device=logits.device)
        if mask is None
        else mask.to(device=logits.device, dtype=logits.dtype)
    )
    return valid / valid.sum(1, keepdim=True).clamp_min(1)


def _sampled_cotangents(
    generator: torch.Generator | None, likelihood: Likelihood, row_mask: RowMask | None = None
) -> CotangentFn:
    """One cotangent ``s(z, ŷ) / R_i`` (the likelihood's
    :meth:`~fisher_optim.likelihoods.Likelihood.example_score`, ``softmax - onehot(ŷ)`` for
    the categorical likelihood) with one ŷ drawn per row; 0 at rows without a target."""

    def make(logits: Tensor) -> Iterable[Tensor]:
        n, rows, c = logits.shape
        flat = logits.reshape(-1, c)
        likelihood.check_outputs(flat)
        y = _draw(flat, generator, likelihood).reshape(n, rows, *likelihood.label_shape(c))
        mask = None if row_mask is None else row_mask(n, rows)
        return [likelihood.example_score(logits, likelihood.drop_rows(y, mask))]

    return make


def _exact_cotangents(likelihood: Likelihood, row_mask: RowMask | None = None) -> CotangentFn:
    """``u_k / R_i`` at one row ``r`` at a time, for every row and factor ``u_k`` of the
    likelihood's Fisher ``E_ŷ[s s^T] = Σ_k u_k u_k^T`` (categorical: ``sqrt(p_k) (p - e_k)``);
    rows without a target get 0 (skipped when no example has one there).

    ``E_ŷ ||J^T s||² = Σ_k ||J^T u_k||²``, and with one label per row the cross terms between
    rows vanish because the score has zero mean, ``E_ŷ s = 0``.
    """

    def make(logits: Tensor) -> Iterable[Tensor]:
        rows = logits.shape[1]
        likelihood.check_outputs(logits)
        weights = _row_weights(logits, row_mask)
        for r in range(rows):
            if not bool((weights[:, r] > 0).any()):
                continue
            for u in likelihood.fisher_factors(logits[:, r]):
                g = torch.zeros_like(logits)
                g[:, r] = u * weights[:, r : r + 1]
                yield g

    return make


def fisher_trace(
    model: nn.Module,
    data: Any,
    *,
    labels: str = "sample",
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
    generator: torch.Generator | None = None,
    likelihood: str | Likelihood = "categorical",
    target_mask: TargetMask | None = None,
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
    ``(x, y)`` or ``x``, Hugging Face batch dicts, :class:`fisher_optim.Batch`); targets
    are ignored. Rows without a target take no part (see the module doc), and N counts the
    examples with at least one row with a target; ``target_mask``
    (called like the model, returning a boolean row mask, see :mod:`fisher_optim.targets`)
    says which rows have one for any other model. Memory is bounded by ``chunk_size``
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
    lik = get_likelihood(likelihood)
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(model):
        for x, _ in iter_batches(data):
            x = to_device(x, device)
            for start, stop in iter_chunks(x, chunk_size):
                chunk = slice_batch(x, start, stop)
                masks: list[Tensor | None] = []
                row_mask = _recording_row_mask(model, chunk, target_mask, masks)
                cotangents = (
                    _sampled_cotangents(generator, lik, row_mask)
                    if labels == "sample"
                    else _exact_cotangents(lik, row_mask)
                )
                sq = per_example_sq_norms(model, chunk, cotangents, output_fn=output_fn)
                total += sq.sum(dtype=torch.float64)
                # an example none of whose rows has a target takes no part in the mean
                mask = masks[-1] if masks else None
                count += stop - start if mask is None else int(mask.any(dim=1).sum())
    if count == 0:
        raise ValueError("data holds no examples (with a target)")
    return float(total) / count


def minibatch_fisher_trace(
    model: nn.Module,
    inputs: Inputs,
    *,
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
    likelihood: str | Likelihood = "categorical",
    target_mask: TargetMask | None = None,
) -> float:
    """Tr(F_B) = ||(1/N) Σ_i ∇_θ ℓ(x_i, ŷ_i)||², ŷ_i ~ p_θ(·|x_i), for one batch.

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
    n = batch_size(inputs)
    if n == 0:
        raise ValueError("inputs hold no examples")
    with torch.enable_grad(), left_as_found(model), frozen_batchnorm_stats(model):
        logits = as_logits(call_model(model, inputs), output_fn)
        lik = get_likelihood(likelihood)
        lik.check_outputs(logits)
        labels = _draw(logits, generator, lik)
        mask = target_row_mask(model, inputs, n, logits.shape[0] // n, target_mask)
        if mask is not None:  # rows without a target take no part in the mean
            keep = mask.reshape(-1).to(logits.device)
            logits, labels = logits[keep], labels[keep]
        loss = lik.nll(logits, labels)
        if not params or not loss.requires_grad:
            return 0.0
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(sum(g.double().square().sum() for g in grads if g is not None))

"""Per-example gradient norms from one batched backward ("ghost norms").

For a layer ``z = W a + b`` applied at positions ``t = 1..T`` of example ``i`` (T = 1
for a dense layer on a flat input, the sequence length for a transformer, the number of
output pixels for a convolution after im2col), the per-example weight gradient is
``∇_W ℓ_i = Σ_t g_{it} a_{it}^T`` with ``g = ∂ℓ/∂z``. Its squared Frobenius norm needs
neither a per-example backward nor, when ``T² < d_in·d_out``, the gradient itself:

    ||Σ_t g_t a_t^T||²_F = Σ_{t,t'} (a_t·a_{t'}) (g_t·g_{t'})       (Gram form)

(Goodfellow, "Efficient per-example gradient computations", 2015; Li et al. 2022 "ghost
clipping"; Bu et al. 2023, "book-keeping"; Opacus fast gradient clipping). The layer
inputs are kept by forward hooks and the output gradients caught by tensor hooks during
one batched backward of ``Σ_i ℓ_i`` (a sum, so that nothing is scaled by 1/N): the ghost
pass of :mod:`.ghost`, with the per-layer rules of :mod:`.layers`.

Covered exactly: ``Linear``, ``Conv1d``/``Conv2d`` (any stride, dilation, groups and
padding mode, by unfolding), ``Embedding`` (summing gradients of repeated tokens),
``BatchNorm`` in eval mode (running statistics), ``LayerNorm``, ``GroupNorm`` and
``RMSNorm`` (their affine parameters), each where the ghost pass can establish which
dimension holds the examples (:mod:`.ghost`). Every other trainable parameter (a module of
another type, a module called twice or registered twice, parameters shared between
modules or used outside their module) goes per example
(:func:`.examples.example_grads`: ``torch.func.vmap(grad)`` over single examples, or one
example at a time for a model ``vmap`` cannot run). The model is left exactly as found
(:func:`fisher_optim._as_found.left_as_found`): the same ``Parameter`` objects, buffers,
flags and ``.grad``.

BatchNorm must normalise with running statistics (eval mode): with batch statistics
examples interact and per-example gradients are not defined. The public functions here
evaluate the model in eval mode and restore every module's flag afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._as_found import left_as_found
from .._logits import OutputFn, as_logits
from .._modules import eval_mode, trainable_parameters
from ..batch import Inputs, batch_size, call_model, slice_batch
from ..likelihoods import Likelihood, get_likelihood
from ..targets import IGNORE_INDEX, TargetMask, row_targets, rows_shape, target_row_mask
from ..validate import check_positive_int
from ._data import iter_chunks, labels_of, model_device, to_device
from .examples import (
    check_examples_alone,
    example_grads,
    probe_indices,
    renormalise_first,
)
from .ghost import CotangentFn, ghost_backward
from .layers import LayerRule, sq_norms

__all__ = [
    "cotangent_grads",
    "group_gradient_stats",
    "per_example_grad_norms",
    "per_example_sq_norms",
    "row_labels",
    "row_target_cotangents",
    "target_cotangents",
]


def per_example_sq_norms(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    *,
    output_fn: OutputFn | None = None,
    fallback_chunk_size: int = 32,
) -> Tensor:
    """``Σ_k ||J_i^T G_k,i||²`` for each example ``i``: the engine behind the norms here.

    ``J_i = ∂ logits_i / ∂θ`` (θ = trainable parameters, logits of example ``i`` as ``R``
    rows of ``as_logits``) and ``G_1, G_2, ...`` are the cotangents ``[B, R, C]`` that
    ``cotangents(logits)`` yields for the detached logits ``[B, R, C]``. With
    ``G = ∂ℓ/∂logits`` this is the squared norm of the per-example gradient ``∇_θ ℓ_i``.
    One forward of the first example alone (the probe), one batched forward, one backward
    per cotangent (see the module doc for the method). The model is run in the mode it is
    in; BatchNorm must use running statistics. The model is left as found.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> sq = per_example_sq_norms(net, x, lambda logits: [torch.ones_like(logits)])
    >>> bool(torch.allclose(sq, 2 * (x.square().sum(1) + 1)))
    True
    """
    check_positive_int("fallback_chunk_size", fallback_chunk_size)
    params = trainable_parameters(model)
    n = batch_size(inputs)
    total = torch.zeros(n, dtype=torch.float64, device=model_device(model))

    def on_layer(rule: LayerRule, m: nn.Module, a: Tensor, g: Tensor) -> None:
        total.add_(rule.sq_norms(m, a, g).to(total.dtype))

    with left_as_found(model):
        gs, used = ghost_backward(model, inputs, cotangents, on_layer, output_fn=output_fn)
        gs3 = [g.reshape(n, -1, g.shape[-1]) for g in gs] if used else []
        for start, stop in iter_chunks(inputs, fallback_chunk_size):
            for g3 in gs3:
                grads = cotangent_grads(model, inputs, g3, used, output_fn, start, stop)
                total[start:stop] += sq_norms(grads).to(total.dtype)
    dtype = params[0].dtype if params else torch.get_default_dtype()
    return total.to(dtype)


def cotangent_grads(
    model: nn.Module,
    inputs: Inputs,
    g3: Tensor,
    params: list[Tensor],
    output_fn: OutputFn | None,
    start: int,
    stop: int,
) -> Tensor:
    """``J_i^T G_i`` restricted to ``params``, flat ``[stop - start, Σ numel]``, for the
    examples ``start:stop``, ``g3`` the cotangent ``[N, R, C]``: the parameters the ghost
    pass leaves to the caller, per example (:func:`.examples.example_grads`)."""
    grads = example_grads(model, inputs, g3[start:stop], params, _contract, output_fn, start)
    return torch.cat([d.flatten(1) for d in grads], 1)


def _contract(logits: Tensor, g: Tensor) -> Tensor:
    """``<logits, g>``: its gradient is ``J^T g``."""
    return (logits * g).sum()


# --------------------------------------------------------------------------------------
# Public measurements
# --------------------------------------------------------------------------------------


def target_cotangents(
    targets: Tensor, ignore_index: int = -100, likelihood: str | Likelihood = "categorical"
) -> CotangentFn:
    """Cotangents ``∂ℓ_i/∂logits`` of the loss of the given targets under ``likelihood``
    (:meth:`~fisher_optim.likelihoods.Likelihood.example_score`).

    ``ℓ_i`` is the mean of ``ℓ = −log p_θ(y|z)`` over example ``i``'s rows that have a
    target: for the categorical likelihood (the cross-entropy, ``F.cross_entropy`` of that
    example alone) integer targets, one per row, ``ignore_index`` marking a row without one;
    for the others one target per output, NaN marking an output without one.

    >>> make = target_cotangents(torch.tensor([[1.0]]), likelihood="gaussian")
    >>> [g.tolist() for g in make(torch.zeros(1, 1, 1))]  # ∂(z - y)²/2 / ∂z at z = 0, y = 1
    [[[[-1.0]]]]
    """
    lik = get_likelihood(likelihood)
    if lik.label_shape(2) == () and not (targets.is_floating_point() or targets.is_complex()):
        targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)

    def make(logits: Tensor) -> Iterable[Tensor]:
        lik.check_outputs(logits, "the per-example gradient with targets")
        return [lik.example_score(logits, lik.example_labels(targets, logits))]

    return make


def row_labels(
    model: nn.Module,
    x: Inputs,
    targets: Tensor,
    logits: Tensor,
    likelihood: Likelihood,
    target_mask: TargetMask | None = None,
) -> Tensor:
    """The true targets as the labels ``[n, R, *label_shape]`` of the ``logits``
    ``[n, R, C]`` (on their device), rows without a target marked so (:func:`fisher_optim.targets.row_targets`
    for class indices: a Hugging Face causal LM's shift, padding; ``target_mask`` for any
    model)."""
    n, rows, classes = logits.shape
    if likelihood.label_shape(classes):  # one target per output
        labels = likelihood.example_labels(targets, logits)
        return likelihood.drop_rows(labels, target_row_mask(model, x, n, rows, target_mask))
    y = row_targets(model, x, targets, rows_shape(model, n, rows), target_mask)
    return likelihood.example_labels(y, logits)


def row_target_cotangents(
    model: nn.Module,
    x: Inputs,
    targets: Tensor,
    target_mask: TargetMask | None = None,
    likelihood: str | Likelihood = "categorical",
) -> CotangentFn:
    """:func:`target_cotangents` of the targets matched to the logit rows (:func:`row_labels`)."""
    lik = get_likelihood(likelihood)

    def make(logits: Tensor) -> Iterable[Tensor]:
        lik.check_outputs(logits, "the per-example gradient with targets")
        return [lik.example_score(logits, row_labels(model, x, targets, logits, lik, target_mask))]

    return make


def per_example_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor | None = None,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
    target_mask: TargetMask | None = None,
    likelihood: str | Likelihood = "categorical",
) -> Tensor:
    """``||∇_θ ℓ(x_i, y_i)||`` for every example, with the true targets ``y_i``.

    ``ℓ = −log p_θ(y|z)`` of example ``i`` alone under ``likelihood`` (the mean over its rows
    for ``[B, T, C]`` logits, rows without a target ignored; see :func:`target_cotangents`):
    the cross-entropy by default, ``"bernoulli"`` (multi-label, targets ``[B, C]`` of 0/1)
    or ``"gaussian"`` (regression, targets shaped like the outputs); θ the trainable
    parameters.
    ``targets`` default to those the batch carries (a Hugging Face dict's ``"labels"``, a
    :class:`fisher_optim.Batch`'s ``targets``); for a Hugging Face model its conventions
    apply (:mod:`fisher_optim.targets`: padding excluded, a causal LM's ``labels``
    shifted by one, as its own loss does); ``target_mask`` (called like the model, a
    boolean row mask) excludes rows for any other model. The model is evaluated in eval
    mode (BatchNorm with running statistics) and left exactly as found; ``.grad`` is not
    touched. Computed by ghost norms (see the module doc): one batched forward+backward
    per chunk of ``chunk_size`` examples.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> norms = per_example_grad_norms(net, x, y)
    >>> import torch.nn.functional as F
    >>> g = torch.autograd.grad(F.cross_entropy(net(x[:1]), y[:1]), list(net.parameters()))
    >>> bool(torch.isclose(norms[0], torch.cat([t.flatten() for t in g]).norm()))
    True
    """
    check_positive_int("chunk_size", chunk_size)
    device = model_device(model)
    targets = labels_of(inputs) if targets is None else targets
    if targets is None:
        raise ValueError(
            "per_example_grad_norms needs the true targets: pass targets=..., or a batch "
            "that carries them (a mapping with 'labels', a Batch with targets)"
        )
    inputs, targets = to_device(inputs, device), targets.to(device)
    n = batch_size(inputs)
    if targets.shape[:1] != (n,):
        raise ValueError(f"targets must have {n} rows (one per example), got {targets.shape}")
    lik = get_likelihood(likelihood)
    out = []
    with eval_mode(model):
        for start, stop in iter_chunks(inputs, chunk_size):
            x = slice_batch(inputs, start, stop)
            cot = row_target_cotangents(model, x, targets[start:stop], target_mask, lik)
            out.append(per_example_sq_norms(model, x, cot, output_fn=output_fn))
    return torch.cat(out).clamp_min(0).sqrt()


def group_gradient_stats(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    groups: Tensor,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
    likelihood: str | Likelihood = "categorical",
) -> dict[str, Any]:
    """Mean gradient of each group of examples: its norm, and cosines between groups.

    For group ``k`` with examples ``S_k``: ``ḡ_k = (1/|S_k|) Σ_{i∈S_k} ∇_θ ℓ(x_i, y_i)``,
    ``ℓ`` as in :func:`per_example_grad_norms` (``likelihood``).
    Returns ``{"group_ids": [...], "count": {k: |S_k|}, "grad_norm": {k: ||ḡ_k||},
    "cosine_matrix": Tensor[K, K]}`` plus ``"cosine"`` (a float) when there are exactly two
    groups - e.g. clean vs. noisy labels, as in Jastrzebski et al. (ICML 2021), Fig. 5/12,
    where memorised noisy examples have large, misaligned gradients. ``groups`` is a bool
    mask or integer group ids, one per example. Eval mode; the model is left as found.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> stats = group_gradient_stats(net, x, y, torch.tensor([1, 1, 1, 0, 0, 0]).bool())
    >>> stats["group_ids"], stats["count"]
    ([False, True], {False: 3, True: 3})
    """
    check_positive_int("chunk_size", chunk_size)
    device = model_device(model)
    inputs, targets = to_device(inputs, device), targets.to(device)
    n = batch_size(inputs)
    groups = torch.as_tensor(groups).to(device)
    if groups.shape != (n,) or groups.is_floating_point() or groups.is_complex():
        raise ValueError(
            f"groups must be a bool mask or integer ids of shape ({n},), got "
            f"{groups.dtype} {tuple(groups.shape)}"
        )
    lik = get_likelihood(likelihood)
    ids = groups.unique().tolist()
    counts = {k: int((groups == k).sum()) for k in ids}
    params = trainable_parameters(model)
    sums = [[torch.zeros_like(p) for p in params] for _ in ids]
    with eval_mode(model), left_as_found(model), torch.enable_grad():
        renormalise_first(model, inputs)
        alone = {
            i: as_logits(call_model(model, slice_batch(inputs, i, i + 1)), output_fn)
            for i in probe_indices(n)
        }
        for start, stop in iter_chunks(inputs, chunk_size):
            chunk = slice_batch(inputs, start, stop)
            logits = as_logits(call_model(model, chunk), output_fn)
            rows = logits.shape[0] // (stop - start)
            ends = [
                (i, logits[(i - start) * rows : (i - start + 1) * rows], a)
                for i, a in alone.items()
                if start <= i < stop
            ]
            check_examples_alone(ends, n, "group_gradient_stats")
            logits3 = logits.reshape(stop - start, -1, logits.shape[-1])
            lik.check_outputs(logits3, "group_gradient_stats")
            y = row_labels(model, chunk, targets[start:stop], logits3.detach(), lik)
            per_example = lik.example_nll(logits3, y)
            present = [j for j, k in enumerate(ids) if bool((groups[start:stop] == k).any())]
            for r, j in enumerate(present):
                mask = (groups[start:stop] == ids[j]).to(per_example.dtype)
                loss = (per_example * mask).sum() / counts[ids[j]]
                grads = torch.autograd.grad(
                    loss, params, retain_graph=r + 1 < len(present), allow_unused=True
                )
                for acc, d in zip(sums[j], grads, strict=True):
                    if d is not None:
                        acc += d
    flat = torch.stack([torch.cat([t.flatten() for t in s]) for s in sums]).double()
    norms = flat.norm(dim=1)
    cosine = (flat @ flat.T) / (norms[:, None] * norms[None, :])
    stats: dict[str, Any] = {
        "group_ids": ids,
        "count": counts,
        "grad_norm": {k: float(v) for k, v in zip(ids, norms, strict=True)},
        "cosine_matrix": cosine,
    }
    if len(ids) == 2:
        stats["cosine"] = float(cosine[0, 1])
    return stats

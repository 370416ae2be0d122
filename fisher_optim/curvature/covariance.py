"""The gradient covariance K: its trace and top eigenvalues, from the N×N Gram matrix.

Jastrzebski et al., "The Break-Even Point on Optimization Trajectories of Deep Neural
Networks", ICLR 2020, Sec. 2: with ``g_i = ∇_θ ℓ(x_i, y_i)`` the gradient of the training
loss of example ``i`` (its *true* label) and ``ḡ = (1/N) Σ_i g_i``,

    K = (1/N) Σ_i (g_i - ḡ)(g_i - ḡ)^T,        Tr(K) = (1/N) Σ_i ||g_i - ḡ||²,

the covariance of the per-example gradients, the noise that SGD's mini-batches sample.
Its largest eigenvalue ``λ_K^1`` and its conditioning ``λ_K^*/λ_K^1`` are the quantities of
the paper's two conjectures.

**Normalisation.** ``1/N``, as in the paper: K is the covariance of the *empirical
distribution* of the N examples given, so that on the whole training set it is exactly the
paper's K, and it is the covariance that SGD samples a mini-batch gradient from (with
replacement: ``Cov[g_B] = K/B``). The unbiased estimate of the covariance of a larger
population from N sampled examples is ``N/(N-1)`` times this; multiply by that factor if
that is what you need (it changes eigenvalues and trace alike).

**Method: never a d×d matrix.** With ``G = [<g_i, g_j>]`` the N×N Gram matrix of the
per-example gradients and ``C = I - 11^T/N`` the centring matrix, ``G_c = C G C`` is the
Gram matrix of the centred gradients ``g_i - ḡ``; writing ``K = (1/N) A^T A`` with the
rows of ``A`` the centred gradients, ``K`` and ``G_c/N = (1/N) A A^T`` share their nonzero
eigenvalues, and ``Tr(K) = Tr(G_c)/N``. G is assembled layer by layer from the same
quantities as the ghost norms (:mod:`.ghost`, with the per-layer rules of :mod:`.layers`) - the layer
inputs ``a`` (forward hooks) and output gradients ``g`` (one batched backward of
``Σ_i ℓ_i``) - for a linear map applied at positions ``t = 1..T``:

    <∇_W ℓ_i, ∇_W ℓ_j> = Σ_{t,t'} (a_{it}·a_{jt'}) (g_{it}·g_{jt'})        (inner products)

or, when ``T²·(d_in + d_out)`` is dearer than ``d_in·d_out``, from the per-example
gradients ``Σ_t g_{it} a_{it}^T`` formed in blocks of examples whose size bounds memory
(convolutions are unfolded, or their per-example gradients taken as the weight gradient
of one grouped convolution, Rochette et al. 2019). Covered exactly: the layers the ghost
norms cover (every family of :data:`.layers.RULES`); every other trainable parameter goes through
``torch.func.vmap(grad)`` over single examples, its per-example gradients formed in
blocks. The eigenvalues of the N×N matrix are then exact (``torch.linalg.eigvalsh`` in
float64). Memory: the activations of all N examples (the Gram matrix couples every pair),
so N is a probe set of hundreds to a few thousand examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._as_found import left_as_found
from .._logits import OutputFn
from .._modules import eval_mode
from ..batch import Inputs, batch_size, iter_batches
from ..likelihoods import Likelihood
from ..validate import check_positive_int
from ._data import labels_of, model_device, to_device
from .ghost import CotangentFn, ghost_backward
from .layers import LayerRule, dense_gram
from .per_example import cotangent_grads, row_target_cotangents

__all__ = [
    "GradientCovariance",
    "gradient_covariance",
    "gradient_covariance_eigenvalues",
    "gradient_covariance_trace",
    "per_example_gradient_gram",
]

# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def per_example_gradient_gram(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    *,
    output_fn: OutputFn | None = None,
) -> Tensor:
    """``G[i, j] = Σ_k <J_i^T G_k,i, J_j^T G_k,j>``: the Gram matrix (float64, ``[N, N]``)
    of the per-example vectors ``J_i^T G_k,i`` (summed over the cotangents ``k``).

    ``J_i = ∂ logits_i / ∂θ`` over the trainable parameters θ, ``G_1, G_2, ...`` the
    cotangents ``[N, R, C]`` that ``cotangents(logits)`` yields for the detached logits
    (as in :func:`~fisher_optim.curvature.per_example.per_example_sq_norms`, whose
    diagonal this is). With ``G = ∂ℓ/∂logits`` (:func:`~fisher_optim.curvature.target_cotangents`),
    ``G[i, j] = <∇_θ ℓ_i, ∇_θ ℓ_j>``. The layer inputs and output gradients come from the
    ghost pass (:func:`~fisher_optim.curvature.ghost.ghost_backward`: one
    forward and one backward per cotangent over all N examples); the parameters it does
    not cover come per example from
    :func:`~fisher_optim.curvature.per_example.cotangent_grads`, in blocks (see
    the module doc). The model is run in the mode it is in (BatchNorm must use running
    statistics) and left exactly as found; ``.grad`` is not touched.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> gram = per_example_gradient_gram(net, x, lambda logits: [torch.ones_like(logits)])
    >>> # ∇_W = 1 x_i^T, ∇_b = 1: <g_i, g_j> = 2 (x_i·x_j + 1)
    >>> bool(torch.allclose(gram, 2 * (x @ x.T + 1).double()))
    True
    """
    n = batch_size(inputs)
    gram = torch.zeros(n, n, dtype=torch.float64, device=model_device(model))

    def on_layer(rule: LayerRule, m: nn.Module, a: Tensor, g: Tensor) -> None:
        rule.gram(m, a, g, gram)

    with left_as_found(model):
        gs, used = ghost_backward(model, inputs, cotangents, on_layer, output_fn=output_fn)
        dim = sum(p.numel() for p in used)
        for g in gs if used else []:
            g3 = g.reshape(n, -1, g.shape[-1])

            def block(s: int, e: int, g3: Tensor = g3) -> Tensor:
                return cotangent_grads(model, inputs, g3, used, output_fn, s, e)

            dense_gram(n, dim, block, gram)
    return gram


# --------------------------------------------------------------------------------------
# Public measurements
# --------------------------------------------------------------------------------------


class GradientCovariance(NamedTuple):
    """Tr(K), the top eigenvalues of K (descending, float64) and the number of examples N."""

    trace: float
    eigenvalues: Tensor
    num_examples: int


def _gather(data: Any, device: torch.device) -> tuple[Inputs, Tensor]:
    """All batches of ``data`` as one batch ``(x, y)`` (the Gram matrix couples them all)."""
    xs: list[Inputs] = []
    ys: list[Tensor] = []
    for x, y in iter_batches(data):
        y = labels_of(x) if y is None else y
        if y is None:
            raise ValueError(
                "the gradient covariance needs the true targets: pass batches (x, y), or "
                "batches that carry them (a mapping with 'labels', a Batch with targets)"
            )
        xs.append(to_device(x, device))
        ys.append(y.to(device))
    if not xs or sum(batch_size(x) for x in xs) == 0:
        raise ValueError("data holds no examples")
    if len(xs) == 1:
        return xs[0], ys[0]
    if all(isinstance(x, Tensor) for x in xs):
        return torch.cat(xs), torch.cat(ys)  # type: ignore[arg-type]
    if all(isinstance(x, Mapping) for x in xs):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}, torch.cat(ys)  # type: ignore[index]
    raise TypeError(
        "several batches of this kind cannot be joined: pass the N examples as one batch"
    )


def centred_gram(gram: Tensor) -> Tensor:
    """``C G C`` with ``C = I - 11^T/N``: the Gram matrix of ``g_i - ḡ``.

    >>> centred_gram(torch.ones(3, 3, dtype=torch.float64)).abs().max().item()
    0.0
    """
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def gradient_covariance(
    model: nn.Module,
    data: Any,
    *,
    k: int = 1,
    output_fn: OutputFn | None = None,
    likelihood: str | Likelihood = "categorical",
) -> GradientCovariance:
    """Tr(K) and the ``k`` largest eigenvalues of the gradient covariance K over ``data``.

    ``K = (1/N) Σ_i (g_i - ḡ)(g_i - ḡ)^T`` with ``g_i = ∇_θ ℓ(x_i, y_i)``, the gradient of
    the loss ``−log p_θ(y_i|x_i)`` of example ``i`` with its true target under ``likelihood``
    (the cross-entropy by default; ``"bernoulli"``, ``"gaussian"``; the mean over its rows
    for ``[B, T, C]`` logits; rows without a target ignored; a Hugging Face model's targets
    by its conventions, as in :func:`~fisher_optim.curvature.per_example_grad_norms`),
    θ the trainable
    parameters: Jastrzebski et al. (ICLR 2020), Sec. 2, normalised by ``1/N`` (see the
    module doc; multiply by ``N/(N-1)`` for the unbiased estimate). Computed exactly from
    the centred N×N Gram matrix ``G_c``: the eigenvalues of K are those of ``G_c/N``, and
    ``Tr(K) = Tr(G_c)/N``; a d×d matrix is never formed. ``data``: one ``(x, y)`` batch or
    an iterable of them (a ``DataLoader``); all N examples are evaluated together. The
    model is evaluated in eval mode (BatchNorm with running statistics) and left exactly
    as found. At most ``N - 1`` eigenvalues are nonzero (the centring removes one
    direction); ``k`` may not exceed ``N``.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> cov = gradient_covariance(net, (x, y), k=3)
    >>> cov.num_examples, cov.eigenvalues.shape, bool(cov.eigenvalues.sum() <= cov.trace)
    (32, torch.Size([3]), True)
    """
    check_positive_int("k", k)
    device = model_device(model)
    x, y = _gather(data, device)
    n = batch_size(x)
    if y.shape[:1] != (n,):
        raise ValueError(f"targets must have {n} rows (one per example), got {tuple(y.shape)}")
    if k > n:
        raise ValueError(f"k must be at most the number of examples N = {n}, got {k}")
    with eval_mode(model):
        gram = per_example_gradient_gram(
            model, x, row_target_cotangents(model, x, y, likelihood=likelihood), output_fn=output_fn
        )
    centred = centred_gram(gram)
    eigenvalues = torch.linalg.eigvalsh(centred).flip(0)[:k] / n
    return GradientCovariance(float(centred.trace()) / n, eigenvalues, n)


def gradient_covariance_trace(
    model: nn.Module,
    data: Any,
    *,
    output_fn: OutputFn | None = None,
    likelihood: str | Likelihood = "categorical",
) -> float:
    """Tr(K) = (1/N) Σ_i ||g_i - ḡ||², the variance of the per-example gradients.

    See :func:`gradient_covariance` (same inputs, ``likelihood``, normalisation ``1/N``). Equal to
    ``(1/N) Σ_i ||g_i||² - ||ḡ||²``.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> gradient_covariance_trace(net, (x, y)) > 0
    True
    """
    return gradient_covariance(model, data, output_fn=output_fn, likelihood=likelihood).trace


def gradient_covariance_eigenvalues(
    model: nn.Module,
    data: Any,
    k: int = 1,
    *,
    output_fn: OutputFn | None = None,
    likelihood: str | Likelihood = "categorical",
) -> Tensor:
    """The ``k`` largest eigenvalues of K, descending (float64): ``λ_K^1 ≥ ... ≥ λ_K^k``.

    See :func:`gradient_covariance` (same inputs, normalisation ``1/N``). The conditioning
    proxy of Jastrzebski et al. (ICLR 2020) is ``λ_K^k / λ_K^1`` for a small eigenvalue
    ``λ_K^k`` of the top-k spectrum.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    >>> lam = gradient_covariance_eigenvalues(net, (x, y), k=2)
    >>> bool(lam[0] >= lam[1] >= 0)
    True
    """
    return gradient_covariance(
        model, data, k=k, output_fn=output_fn, likelihood=likelihood
    ).eigenvalues

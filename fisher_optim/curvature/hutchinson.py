"""Stochastic trace estimation: Hutchinson and Hutch++, and Tr(H) of a model's loss.

Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines": for random ``z`` with ``E[z z^T] = I``,
``Tr(A) = E[z^T A z]``; the mean of ``m`` quadratic forms has standard error
``std(z^T A z)/sqrt(m)``.

Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace
Estimation", SOSA 2021): spend ``m/3`` products on a sketch ``Q = orth(A S)``, take the
trace of ``A`` on ``range(Q)`` exactly, ``Tr(Q^T A Q)``, and Hutchinson only on the
deflated rest, ``(I - QQ^T) A (I - QQ^T)``. Error ``O(1/m)`` instead of ``O(1/sqrt(m))``
when the spectrum decays, as a network's Hessian's does.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._logits import OutputFn
from .._modules import eval_mode
from ..validate import check_choice, check_positive_int
from .hessian import DISTRIBUTIONS, HessianOperator, LossFn, MatVec, random_probe

__all__ = ["TRACE_METHODS", "TraceEstimate", "hessian_trace", "hutchinson", "hutchpp"]

TRACE_METHODS = ("hutchinson", "hutch++")


class TraceEstimate(NamedTuple):
    """A trace estimate and its standard error (unpacks as ``estimate, stderr = ...``)."""

    estimate: float
    standard_error: float


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    stderr = float(t.std() / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    return float(t.mean()), stderr


def hutchinson(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> TraceEstimate:
    """Hutchinson's estimate of ``Tr(A)`` from ``num_matvecs`` products ``v ↦ A v``.

    >>> a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> hutchinson(lambda v: a @ v, 5, 10, generator=torch.Generator().manual_seed(0))
    TraceEstimate(estimate=15.0, standard_error=0.0)
    """
    check_positive_int("num_matvecs", num_matvecs)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    samples = []
    for _ in range(num_matvecs):
        z = random_probe(
            dim, distribution=distribution, generator=generator, device=device, dtype=dtype
        )
        samples.append(float(torch.dot(z, matvec(z).to(z.dtype))))
    return TraceEstimate(*_mean_and_stderr(samples))


def hutchpp(
    matvec: MatVec,
    dim: int,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> TraceEstimate:
    """Hutch++ estimate of ``Tr(A)`` for a symmetric ``A`` from ``num_matvecs`` products.

    ``s = num_matvecs // 3`` products sketch ``Q = orth(A S)``, ``s`` more give
    ``Tr(Q^T A Q)``, the remaining ``num_matvecs - 2s`` estimate the trace of the
    deflated ``(I-QQ^T) A (I-QQ^T)`` by Hutchinson. The standard error is that of this last
    part (the sketch part is exact given ``Q``); it is NaN with a single residual probe.
    Exact when ``rank(A) <= s``:

    >>> u = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> a = u @ u.T
    >>> est = hutchpp(lambda v: a @ v, 50, 9, generator=torch.Generator().manual_seed(1))
    >>> abs(est.estimate - float(a.trace())) < 1e-8
    True
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs!r}")
    s = num_matvecs // 3
    residual = num_matvecs - 2 * s

    def probes(k: int) -> Tensor:
        return random_probe(
            dim,
            distribution=distribution,
            generator=generator,
            device=device,
            dtype=dtype,
            num=k,
        )

    def apply(block: Tensor) -> Tensor:
        return torch.stack([matvec(c).to(block.dtype) for c in block.T], dim=1)

    q, _ = torch.linalg.qr(apply(probes(s)))
    exact = float((q * apply(q)).sum())
    g = probes(residual)
    g = g - q @ (q.T @ g)
    samples = (g * apply(g)).sum(0).tolist()
    mean, stderr = _mean_and_stderr(samples)
    return TraceEstimate(exact + mean, stderr)


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn = F.cross_entropy,
    num_probes: int = 30,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Estimate ``Tr(H)``, ``H = ∇²_θ L``, of the mean loss over ``data``.

    ``L = mean over examples of loss_fn(output_fn(model(x)), y)`` for batches ``(x, y)``
    of ``data`` (a tuple ``(x, y)``, a :class:`fisher_optim.Batch` with targets, a Hugging
    Face batch dict carrying ``"labels"``, or an iterable of them, e.g. a ``DataLoader``);
    θ are the trainable parameters. With the default loss the logits are taken row by row
    and rows without a target are left out, as the model's own loss does (see
    :mod:`fisher_optim.curvature.hessian`). ``num_probes`` Hessian-vector products by double backprop,
    combined by Hutchinson (1989) or Hutch++ (Meyer et al. 2021). The model is evaluated in
    eval mode, so BatchNorm uses its running statistics (a fixed, per-example function
    whose Hessian is well defined) and dropout is off; it is left exactly as found,
    ``.grad`` included. Returns ``TraceEstimate(estimate, standard_error)``.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> est = hessian_trace(net, (x, y), num_probes=4, method="hutch++")
    >>> est.estimate > 0
    True
    """
    check_choice("method", method, TRACE_METHODS)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive_int("num_probes", num_probes)
    estimator = hutchinson if method == "hutchinson" else hutchpp
    with eval_mode(model):
        op = HessianOperator(model, data, loss_fn, output_fn)
        return estimator(
            op.matvec,
            op.dim,
            num_probes,
            distribution=distribution,
            generator=generator,
            device=op.device,
            dtype=op.dtype,
        )

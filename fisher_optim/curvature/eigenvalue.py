"""The largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products.

For the edge-of-stability check (Cohen et al., ICLR 2021): gradient descent with learning
rate ``η`` is stable on a quadratic only while ``λ_max(H) < 2/η``; the paper's early-phase
argument (Jastrzebski et al., ICML 2021) is that large learning rates keep the network
away from sharp, high-Fisher regions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._logits import OutputFn
from .._modules import eval_mode
from ._data import check_positive_int
from ._hvp import HessianOperator, LossFn, MatVec, random_probe

__all__ = ["EigenEstimate", "power_iteration", "top_hessian_eigenvalue"]


class EigenEstimate(NamedTuple):
    """An eigenvalue estimate, its unit eigenvector, iterations run and convergence."""

    eigenvalue: float
    eigenvector: Tensor
    iterations: int
    converged: bool


def power_iteration(
    matvec: MatVec,
    dim: int,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> EigenEstimate:
    """Power iteration ``v ← A v / ||A v||`` for the eigenvalue of largest magnitude.

    The estimate is the Rayleigh quotient ``v^T A v``; it stops when it changes by less
    than ``tol`` relative to its size, or after ``iters`` products. For a symmetric ``A``
    it converges to the eigenvalue of largest ``|λ|`` - which is ``λ_max`` whenever the
    most negative eigenvalue is smaller in magnitude, as for a network's Hessian in
    training; the sign tells which one was found.

    >>> a = torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))
    >>> est = power_iteration(lambda v: a @ v, 3, iters=200, tol=1e-12,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> round(est.eigenvalue, 6), est.converged
    (3.0, True)
    """
    check_positive_int("iters", iters)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    v = random_probe(dim, distribution="gaussian", generator=generator, device=device, dtype=dtype)
    v = v / v.norm()
    eigenvalue = 0.0
    for it in range(1, iters + 1):
        w = matvec(v).to(v.dtype)
        new = float(torch.dot(v, w))
        norm = w.norm()
        if norm == 0:
            return EigenEstimate(0.0, v, it, True)
        v = w / norm
        if it > 1 and abs(new - eigenvalue) <= tol * abs(new):
            return EigenEstimate(new, v, it, True)
        eigenvalue = new
    return EigenEstimate(eigenvalue, v, iters, False)


def top_hessian_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn = F.cross_entropy,
    iters: int = 100,
    tol: float = 1e-4,
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``data``.

    Power iteration (:func:`power_iteration`) on Hessian-vector products by double
    backprop over batches ``(x, y)`` of ``data``, at most ``iters`` products, relative
    tolerance ``tol``. Compare with ``2/η`` (edge of stability). Eval mode (BatchNorm with
    running statistics); the model is left exactly as found, ``.grad`` included.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> top_hessian_eigenvalue(net, (x, y)) > 0
    True
    """
    with eval_mode(model):
        op = HessianOperator(model, data, loss_fn, output_fn)
        est = power_iteration(
            op.matvec,
            op.dim,
            iters=iters,
            tol=tol,
            generator=generator,
            device=op.device,
            dtype=op.dtype,
        )
    return est.eigenvalue

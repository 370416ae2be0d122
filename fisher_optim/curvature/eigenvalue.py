"""Top eigenvalues of the Hessian: Lanczos with full reorthogonalisation, power iteration.

For the edge of stability (Cohen et al., "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", ICLR 2021): gradient descent with learning rate ``η`` is
stable on a quadratic only while the *largest* Hessian eigenvalue ``λ_H^1 < 2/η``, and in
practice ``λ_H^1`` rises to about ``2/η`` and hovers there. The break-even point
(Jastrzebski et al., ICLR 2020) compares ``λ_H^1`` and the conditioning ``λ_H^k/λ_H^1``
between learning rates and batch sizes.

Which eigenvalue: :func:`top_hessian_eigenvalue` and :func:`hessian_eigenvalues` return the
*algebraically largest* eigenvalues ``λ_1 ≥ λ_2 ≥ ...`` (not the largest magnitude: a
Hessian with eigenvalues 3 and -2.97 has ``λ_H^1 = 3``), by Lanczos. Every estimate
reports its residual ``||H v - λ v||`` (computed with one extra Hessian-vector product per
eigenvalue) and whether it converged, by the one criterion of :func:`is_converged`: every
reported pair has ``||H v_i - λ_i v_i|| ≤ tol · |λ_i|``, relative to *its own* eigenvalue
(not to the largest magnitude, which a large negative eigenvalue would dominate);
:func:`power_iteration` remains for the eigenvalue of largest magnitude.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._logits import OutputFn
from .._modules import eval_mode
from ..validate import check_positive_int
from .hessian import HessianOperator, LossFn, MatVec, random_probe

__all__ = [
    "EigenEstimate",
    "EigenSpectrum",
    "hessian_eigenvalues",
    "is_converged",
    "lanczos",
    "power_iteration",
    "top_hessian_eigenvalue",
]


def is_converged(residuals: Tensor | float, eigenvalues: Tensor | float, tol: float) -> bool:
    """The convergence criterion of every eigenvalue estimate in fisher_optim: each pair's
    residual is at most ``tol`` times the magnitude of its own eigenvalue,

        ``||A v_i - λ_i v_i|| ≤ tol · |λ_i|``  for every ``i``

    (for a unit ``v_i``, ``λ_i`` is then an exact eigenvalue of ``A + E`` with
    ``||E|| ≤ tol · |λ_i|`` and, ``A`` symmetric, within ``tol · |λ_i|`` of an eigenvalue of
    ``A``: Golub & Van Loan, Sec. 8.1). An eigenvalue 0 converges only with a zero residual.

    >>> is_converged(torch.tensor([1e-5, 1e-3]), torch.tensor([1.0, -100.0]), 1e-4)
    True
    >>> is_converged(torch.tensor([1e-3]), torch.tensor([1.0]), 1e-4)  # even if |λ_2| = 100
    False
    """
    return bool(_converged_mask(residuals, eigenvalues, tol).all())


def _converged_mask(residuals: Tensor | float, eigenvalues: Tensor | float, tol: float) -> Tensor:
    """:func:`is_converged` pair by pair (the one place its inequality is written)."""
    r = torch.as_tensor(residuals, dtype=torch.float64)
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64, device=r.device)
    return r <= tol * lam.abs()


class EigenEstimate(NamedTuple):
    """One eigenvalue, its unit eigenvector, the matrix-vector products used, whether it
    converged, and its residual ``||A v - λ v||`` (``converged``: residual ≤ tol·|λ|,
    :func:`is_converged`)."""

    eigenvalue: float
    eigenvector: Tensor
    iterations: int
    converged: bool
    residual: float = float("nan")


class EigenSpectrum(NamedTuple):
    """The ``k`` largest eigenvalues (descending, float64), unit eigenvectors ``[dim, k]``,
    residuals ``||A v_i - λ_i v_i||`` ``[k]``, whether every pair converged (each residual
    ≤ ``tol · |λ_i|``, its own eigenvalue: :func:`is_converged`, and no repeated eigenvalue
    missed: :func:`lanczos`), and the number of Lanczos steps over all restarts (each one
    matrix-vector product; ``k`` more for the residuals)."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    iterations: int


def _check_tol(tol: Any) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")


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
    """Power iteration ``v ← A v / ||A v||`` for the eigenvalue of largest *magnitude*.

    The estimate is the Rayleigh quotient ``λ = v^T A v``; it stops once the residual
    ``||A v - λ v|| ≤ tol · |λ|`` (:func:`is_converged`; ``converged=True``) or after
    ``iters`` products (``converged=False``). For a symmetric ``A`` it converges to the
    eigenvalue of largest ``|λ|`` at the rate ``|λ_2/λ_1|`` per step - slowly when two
    eigenvalues of opposite sign have nearly the same magnitude (then the residual stays
    large and the result says so). For the algebraically largest eigenvalue use :func:`lanczos`.

    >>> a = torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))
    >>> est = power_iteration(lambda v: a @ v, 3, iters=200, tol=1e-10,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> round(est.eigenvalue, 6), est.converged, est.residual < 1e-9
    (3.0, True, True)
    """
    check_positive_int("iters", iters)
    _check_tol(tol)
    v = random_probe(dim, distribution="gaussian", generator=generator, device=device, dtype=dtype)
    v = v / v.norm()
    eigenvalue, residual = 0.0, float("inf")
    for it in range(1, iters + 1):
        w = matvec(v).to(v.dtype)
        eigenvalue = float(torch.dot(v, w))
        residual = float((w - eigenvalue * v).norm())
        if is_converged(residual, eigenvalue, tol):  # also A v = 0: λ = 0, residual 0
            return EigenEstimate(eigenvalue, v, it, True, residual)
        if it == iters:  # the estimate and residual belong to this v
            break
        v = w / w.norm()
    return EigenEstimate(eigenvalue, v, iters, False, residual)


class _Run(NamedTuple):
    """One Lanczos run: its top Ritz values (float64, descending) and unit Ritz vectors
    ``[dim, j]``; which of them converged (by their residual estimates; all, when the
    Krylov space is invariant); ``complete``: it stopped by one of its rules, not for want
    of steps; ``nothing_above``: it found nothing above the ``k``-th; its number of steps."""

    values: Tensor
    vectors: Tensor
    converged: Tensor
    complete: bool
    nothing_above: bool
    steps: int


def _lanczos_run(
    matvec: MatVec,
    start: Tensor,
    locked: Tensor,
    k: int,
    steps: int,
    tol: float,
    kth: float | None,
) -> _Run:
    """Lanczos with full reorthogonalisation on ``A`` deflated by the orthonormal columns of
    ``locked`` (each new vector orthogonalised against the basis and them, twice).

    Stops when the top ``k`` Ritz pairs have converged by their estimates
    ``β_m |s_{m,i}|``; given the ``k``-th eigenvalue found so far, when the Ritz pairs above
    the bar ``kth + tol·|kth|`` have converged, or when the top one lies at or below the bar
    with its estimate ≤ ``tol·|kth|`` (the precision asked of the ``k``-th: nothing is left
    above it); when the Krylov space is invariant (then the Ritz pairs are exact: also after
    as many steps as the deflated space has dimensions); or after ``steps`` steps.
    """
    dim, dtype = start.shape[0], start.dtype
    room = dim - locked.shape[1]
    q = start - locked @ (locked.T @ start)
    q = q / q.norm()
    basis = torch.empty(steps, dim, dtype=dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    for m in range(1, steps + 1):
        basis[m - 1] = q
        w = matvec(q).to(dtype=dtype, device=q.device)
        alphas.append(float(torch.dot(q, w)))
        q_basis = basis[:m]
        for _ in range(2):  # full reorthogonalisation ("twice is enough"), and deflation
            w = w - q_basis.T @ (q_basis @ w)
            w = w - locked @ (locked.T @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        theta, s = theta.flip(0), s.flip(1)
        invariant = beta <= 1e-12 * max(float(theta.abs().max()), 1e-300) or m == room
        estimates = torch.zeros_like(theta) if invariant else beta * s[-1].abs()
        converged = _converged_mask(estimates, theta, tol)
        above, nothing_above = 0, False
        if kth is not None:
            above = min(int((theta > kth + tol * abs(kth)).sum()), k)
            nothing_above = above == 0 and bool(_converged_mask(estimates[0], kth, tol))
        complete = (
            invariant
            or nothing_above
            or (above > 0 and bool(converged[:above].all()))
            or (m >= k and bool(converged[:k].all()))
        )
        if complete or m == steps:
            break
        betas.append(beta)
        q = w / beta
    j = min(k, m)
    vectors = basis[:m].T @ s[:, :j].to(dtype=dtype, device=basis.device)
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    return _Run(theta[:j], vectors, converged[:j], complete, nothing_above, m)


def lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 1,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> EigenSpectrum:
    """The ``k`` algebraically largest eigenvalues of a symmetric ``A``, by Lanczos with full
    reorthogonalisation (Golub & Van Loan, *Matrix Computations*, Sec. 10.1-10.3), restarted
    with deflation so that repeated eigenvalues are found (Saad, *Numerical Methods for
    Large Eigenvalue Problems*, 2nd ed., Sec. 4.2 and 5.3: explicit restarts, locking).

    A run builds an orthonormal Krylov basis ``Q`` (each new vector orthogonalised against
    all previous ones, twice) and the tridiagonal ``T = Q^T A Q``; the Ritz values, the
    eigenvalues of ``T``, approximate the extreme eigenvalues of ``A``. It stops when the
    Ritz residual estimates ``β_m |s_{m,i}|`` of the top ``k`` are ≤ ``tol · |θ_i|``, when
    the Krylov space is invariant (then exact), or after ``iters`` steps (``iters`` is
    capped at ``dim``).

    A Krylov space holds one direction of each eigenspace only: an eigenvalue of
    multiplicity ``r > 1`` shows once. So for ``k ≥ 2`` the converged top ``k`` are locked
    and Lanczos restarts from a fresh random vector, orthogonal to them, on ``A`` deflated
    by them. A restart's Ritz values above the ``k``-th found (by more than ``tol``
    relatively) are missed eigenvalues (repeated ones): they are locked once converged, and
    the search goes on. It ends when a restart's largest Ritz value has settled at or below
    the ``k``-th (residual estimate ≤ ``tol`` times the ``k``-th) - without a repeated
    eigenvalue, after one restart that converges ``λ_{k+1}``. At most ``k`` restarts of at
    most ``iters`` steps each. If a run's steps run out first, there is no further restart
    and a missed repeated eigenvalue cannot be excluded: ``converged`` is False, and a
    :class:`RuntimeWarning` says so when the residuals alone would pass.

    The reported residuals ``||A y_i - θ_i y_i||`` are computed with ``k`` more products,
    and ``converged`` is whether every one is ≤ ``tol · |θ_i|`` (:func:`is_converged`, the
    criterion of every estimate here) and the search for repeated eigenvalues ended.
    ``iterations`` counts the steps of all runs. Memory: ``dim × iters`` numbers for the
    basis of one run.

    >>> a = torch.diag(torch.tensor([3.0, -2.97, 1.0, 0.5], dtype=torch.float64))
    >>> spec = lanczos(lambda v: a @ v, 4, k=2, generator=torch.Generator().manual_seed(0))
    >>> [round(x, 6) for x in spec.eigenvalues.tolist()], spec.converged
    ([3.0, 1.0], True)
    >>> a = torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.0], dtype=torch.float64))  # 2 twice
    >>> spec = lanczos(lambda v: a @ v, 4, k=2, generator=torch.Generator().manual_seed(0))
    >>> [round(x, 6) for x in spec.eigenvalues.tolist()], spec.converged
    ([2.0, 2.0], True)
    """
    check_positive_int("k", k)
    check_positive_int("iters", iters)
    _check_tol(tol)
    if k > dim:
        raise ValueError(f"k must be at most the dimension {dim}, got {k}")
    steps = min(max(iters, k), dim)

    def joined(values: Tensor, vectors: Tensor, run: _Run, which: Tensor) -> tuple[Tensor, Tensor]:
        """The top ``k`` of the pairs so far and the ``which`` Ritz pairs of ``run``."""
        both = torch.cat([values, run.values[which]])
        order = both.argsort(descending=True)[:k]
        cols = torch.cat([vectors, run.vectors[:, which.to(run.vectors.device)]], 1)
        return both[order], cols[:, order.to(cols.device)]

    values = torch.empty(0, dtype=torch.float64)  # the locked pairs, descending
    vectors = torch.empty(dim, 0, dtype=dtype, device=device)
    searched, total = k == 1, 0
    for _ in range(k + 1):  # each restart locks a missed eigenvalue or ends the search
        start = random_probe(
            dim, distribution="gaussian", generator=generator, device=device, dtype=dtype
        )
        vectors = vectors.to(start.device)
        room = dim - vectors.shape[1]
        if room == 0:
            searched = True
            break
        kth = float(values[k - 1]) if len(values) == k else None
        run = _lanczos_run(matvec, start, vectors, k, min(steps, room), tol, kth)
        total += run.steps
        if run.nothing_above:
            searched = True
            break
        values, vectors = joined(values, vectors, run, run.converged)
        if k == 1 or not run.complete:  # nothing to search for; or out of steps
            if len(values) < k:  # the steps ran out: the unconverged Ritz pairs too
                values, vectors = joined(values, vectors, run, ~run.converged)
            break
    residuals = torch.stack(
        [
            (matvec(vectors[:, i]).to(dtype=dtype, device=vectors.device)
             - values[i] * vectors[:, i]).norm().double().cpu()
            for i in range(len(values))
        ]
    )  # fmt: skip
    within = len(values) == k and is_converged(residuals, values, tol)
    if within and not searched:
        warnings.warn(
            f"lanczos: the top {k} eigenvalues have converged residuals, but the {iters} "
            "steps per run ran out before a deflated restart could exclude a missed "
            f"repeated eigenvalue above λ_{k} = {float(values[-1]):.6g}; reported as not "
            "converged: raise iters",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenSpectrum(values, vectors, residuals, within and searched, total)


def hessian_eigenvalues(
    model: nn.Module,
    data: Any,
    k: int = 1,
    *,
    loss_fn: LossFn = F.cross_entropy,
    iters: int = 100,
    tol: float = 1e-4,
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
) -> EigenSpectrum:
    """The ``k`` largest eigenvalues ``λ_H^1 ≥ ... ≥ λ_H^k`` of the Hessian of the mean loss
    over ``data``, with residuals and a convergence flag (:func:`lanczos`).

    Hessian-vector products by double backprop over batches ``(x, y)`` of ``data`` (a
    batch or an iterable, such as a ``DataLoader``), at most ``iters`` Lanczos steps,
    relative tolerance ``tol`` on the residuals: ``converged`` when every
    ``||H v_i - λ_i v_i|| ≤ tol · |λ_i|`` (:func:`is_converged`). The basis
    is kept in the parameters' dtype. Eval mode (BatchNorm with running statistics); the
    model is left exactly as found, ``.grad`` included. Compare ``λ_H^1`` with ``2/η``.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> spec = hessian_eigenvalues(net, (x, y), k=2)
    >>> bool(spec.eigenvalues[0] >= spec.eigenvalues[1]), spec.converged
    (True, True)
    """
    with eval_mode(model):
        op = HessianOperator(model, data, loss_fn, output_fn)
        return lanczos(
            op.matvec,
            op.dim,
            k,
            iters=iters,
            tol=tol,
            generator=generator,
            device=op.device,
            dtype=op.dtype,
        )


def top_hessian_eigenvalue(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn = F.cross_entropy,
    iters: int = 100,
    tol: float = 1e-4,
    output_fn: OutputFn | None = None,
    generator: torch.Generator | None = None,
) -> EigenEstimate:
    """``λ_H^1``, the *largest* (algebraically) eigenvalue of the Hessian of the mean loss.

    :func:`hessian_eigenvalues` with ``k=1`` (Lanczos, not the power iteration: with
    eigenvalues 3 and -2.97 it returns 3). Returns an :class:`EigenEstimate`: the value in
    ``.eigenvalue``, ``.converged`` (residual ``||H v - λ v|| ≤ tol · |λ|`` within ``iters``
    steps, :func:`is_converged`) and ``.residual``; a :class:`RuntimeWarning` is issued when
    it did not converge. Compare with ``2/η`` (edge of stability). Eval mode; the model is left
    exactly as found, ``.grad`` included.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> est = top_hessian_eigenvalue(net, (x, y))
    >>> est.eigenvalue > 0, est.converged
    (True, True)
    """
    spec = hessian_eigenvalues(
        model,
        data,
        1,
        loss_fn=loss_fn,
        iters=iters,
        tol=tol,
        output_fn=output_fn,
        generator=generator,
    )
    value, residual = float(spec.eigenvalues[0]), float(spec.residuals[0])
    if not spec.converged:
        warnings.warn(
            f"top_hessian_eigenvalue did not converge in {spec.iterations} Lanczos steps: "
            f"λ = {value:.6g} with residual ||Hv - λv|| = {residual:.3g} > tol·|λ| "
            f"(tol = {tol:g}); raise iters or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenEstimate(value, spec.eigenvectors[:, 0], spec.iterations, spec.converged, residual)

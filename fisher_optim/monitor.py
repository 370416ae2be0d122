"""Watching Tr(F) during training, to catch a catastrophic Fisher explosion early.

Jastrzebski et al., "Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts
Generalization", ICML 2021: with a small learning rate Tr(F) rises sharply in the first
epochs and stays high, and its early value predicts the final generalisation gap. The
paper's early value ``Tr(F_i)`` is Tr(F) at the first time the training loss falls below
a threshold ε (CIFAR-10: ε=1.2, CIFAR-100: ε=3.5).

:class:`FisherMonitor` measures Tr(F) (:func:`fisher_optim.curvature.fisher_trace`) on a
fixed probe set every few steps, keeps the history, the peak and the early value, warns
when Tr(F) explodes, and logs rows to a callable, a CSV or a JSON-lines file.

:class:`CurvatureMonitor` tracks, on the same schedule and with the same logging, any of
the quantities of the break-even point and the edge of stability (Jastrzebski et al., ICLR
2020; Cohen et al., ICLR 2021): Tr(F), Tr(K) and λ_K^1 of the gradient covariance K,
λ_H^1 and ``λ_H^1·η/2`` (≥ 1 beyond the edge of stability of gradient descent).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._logits import OutputFn
from .batch import iter_batches
from .curvature.covariance import gradient_covariance
from .curvature.eigenvalue import hessian_eigenvalues
from .curvature.fisher import LABEL_MODES, fisher_trace
from .likelihoods import Likelihood, get_likelihood
from .targets import TargetMask
from .validate import check_choice, check_function_or_none, check_positive_int

__all__ = ["CURVATURE_QUANTITIES", "CurvatureMonitor", "FisherExplosionWarning", "FisherMonitor"]

LOG_SUFFIXES = (".csv", ".jsonl")
FIELDS = ("step", "trace", "loss", "time", "duration", "exploding")


class FisherExplosionWarning(UserWarning):
    """Tr(F) went above the monitor's threshold or grew past its growth factor."""


def _as_float(value: float | Tensor | None) -> float | None:
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


class _StepSchedule:
    """What both monitors share: counting training steps, the pending training loss, and
    hooking onto an optimizer. Subclasses set ``num_calls``, ``_pending_loss`` and define
    ``step``."""

    num_calls: int
    _pending_loss: float | None

    def observe_loss(self, loss: float | Tensor) -> None:
        """Pass the training loss of the coming step (for :meth:`attach`-ed monitors)."""
        self._pending_loss = _as_float(loss)

    def _count_step(self, loss: float | Tensor | None) -> float | None:
        """Count one call of ``step``; the loss it carries (or the pending one)."""
        self.num_calls += 1
        value = _as_float(loss) if loss is not None else self._pending_loss
        self._pending_loss = None
        return value

    def step(self, loss: float | Tensor | None = None, step: int | None = None) -> Any:
        raise NotImplementedError

    def __call__(self, loss: float | Tensor | None = None, step: int | None = None) -> Any:
        return self.step(loss, step)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`step` after every ``optimizer.step()``; ``.remove()`` the handle to stop."""
        return optimizer.register_step_post_hook(lambda *_: self.step())


class FisherMonitor(_StepSchedule):
    """Measure Tr(F) on a fixed probe set during training.

    Args:
        model: the network being trained.
        probe: the fixed probe inputs: a tensor batch, an ``(x, y)`` batch, or a list of
            batches (targets are ignored: Tr(F) uses the model's own labels). Read once.
        every: measure on every ``every``-th call of :meth:`step` (calls ``every``,
            ``2*every``, ...); :meth:`measure` measures at any time.
        labels: ``"sample"`` (one label per example, unbiased and fast) or ``"exact"``.
        output_fn, chunk_size, likelihood, target_mask: passed to
            :func:`~fisher_optim.curvature.fisher_trace` (a one-output model needs
            ``likelihood="bernoulli"`` or ``"gaussian"``; ``target_mask`` selects the rows
            with a target of a model that is not a Hugging Face one).
        threshold: warn once Tr(F) exceeds this value.
        growth_factor: warn once Tr(F) exceeds ``growth_factor`` times its first measured
            value.
        loss_threshold: ε of the paper's early value: the first time a training loss passed
            to :meth:`step` falls below it, Tr(F) is measured (on schedule or not) and kept
            as :attr:`early_value`.
        log: a callable called with each row (a dict), or a path ending in ``.csv``
            (written with a header) or ``.jsonl`` (one JSON object per line); appended to.
        seed, generator: the labels' random stream (``generator`` wins if given).

    A row is ``{"step", "trace", "loss", "time" (seconds since the monitor was created),
    "duration" (seconds the measurement took), "exploding"}``. Once Tr(F) explodes a
    :class:`FisherExplosionWarning` is issued and :attr:`exploding` stays ``True``.
    Measuring leaves the model exactly as found (parameters, buffers, ``.grad``, modes).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> monitor = FisherMonitor(net, torch.randn(16, 4), every=2, labels="exact")
    >>> rows = [monitor.step(loss=1.0) for _ in range(4)]
    >>> [row is not None for row in rows], [r["step"] for r in monitor.history]
    ([False, True, False, True], [2, 4])
    >>> monitor.peak == max(r["trace"] for r in monitor.history)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        *,
        every: int = 1,
        labels: str = "sample",
        output_fn: OutputFn | None = None,
        chunk_size: int = 256,
        likelihood: str | Likelihood = "categorical",
        target_mask: TargetMask | None = None,
        threshold: float | None = None,
        growth_factor: float | None = None,
        loss_threshold: float | None = None,
        log: Callable[[dict[str, Any]], Any] | str | os.PathLike[str] | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        check_positive_int("every", every)
        check_positive_int("chunk_size", chunk_size)
        check_choice("labels", labels, LABEL_MODES)
        check_function_or_none("target_mask", target_mask)
        for name, value in (("threshold", threshold), ("growth_factor", growth_factor)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        _check_log(log)
        self.model, self.every, self.labels = model, every, labels
        self.output_fn, self.chunk_size = output_fn, chunk_size
        self.likelihood = get_likelihood(likelihood)
        self.target_mask = target_mask
        self.threshold, self.growth_factor = threshold, growth_factor
        self.loss_threshold = loss_threshold
        self.log = log
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.manual_seed(seed)
        self.probe = [x for x, _ in iter_batches(probe)]
        if not self.probe:
            raise ValueError("the probe set holds no batches")
        self.history: list[dict[str, Any]] = []
        self.num_calls = 0
        self.exploding = False
        self.early_value: float | None = None
        self.early_step: int | None = None
        self.first_value: float | None = None
        self.peak: float | None = None
        self.peak_step: int | None = None
        self._pending_loss: float | None = None
        self._start = time.perf_counter()

    # ----------------------------------------------------------------------------------

    def measure(self, step: int | None = None, loss: float | Tensor | None = None) -> dict:
        """Measure Tr(F) now, record and log the row, check for an explosion; return it."""
        begin = time.perf_counter()
        trace = fisher_trace(
            self.model,
            self.probe,
            labels=self.labels,
            output_fn=self.output_fn,
            chunk_size=self.chunk_size,
            generator=self.generator,
            likelihood=self.likelihood,
            target_mask=self.target_mask,
        )
        end = time.perf_counter()
        step = self.num_calls if step is None else step
        if self.first_value is None:
            self.first_value = trace
        if self.peak is None or trace > self.peak:
            self.peak, self.peak_step = trace, step
        self._check_explosion(trace, step)
        row = {
            "step": step,
            "trace": trace,
            "loss": _as_float(loss),
            "time": begin - self._start,
            "duration": end - begin,
            "exploding": self.exploding,
        }
        self.history.append(row)
        self._write(row)
        return row

    def step(
        self, loss: float | Tensor | None = None, step: int | None = None
    ) -> dict[str, Any] | None:
        """Count one training step; measure if it is due (or for the early value).

        ``loss``: the training loss of this step (or the last one given to
        :meth:`observe_loss`). ``step``: the step number to record (default: the number of
        calls so far). Returns the new row, or ``None`` when nothing was measured.
        """
        loss_value = self._count_step(loss)
        early = (
            self.early_value is None
            and self.loss_threshold is not None
            and loss_value is not None
            and loss_value < self.loss_threshold
        )
        if not early and self.num_calls % self.every:
            return None
        row = self.measure(step=step, loss=loss_value)
        if early:
            self.early_value, self.early_step = row["trace"], row["step"]
        return row

    # ----------------------------------------------------------------------------------

    def _check_explosion(self, trace: float, step: int) -> None:
        reasons = []
        if self.threshold is not None and trace > self.threshold:
            reasons.append(f"above the threshold {self.threshold:g}")
        if (
            self.growth_factor is not None
            and self.first_value is not None
            and trace > self.growth_factor * self.first_value
        ):
            reasons.append(
                f"{trace / self.first_value:.3g} times its first value {self.first_value:.4g} "
                f"(growth factor {self.growth_factor:g})"
            )
        if not math.isfinite(trace):
            reasons.append("not finite")
        if reasons and not self.exploding:
            self.exploding = True
            warnings.warn(
                f"Fisher explosion at step {step}: Tr(F) = {trace:.4g} is "
                + " and ".join(reasons)
                + "; a catastrophic Fisher explosion early in training predicts poor "
                "generalisation (consider a larger learning rate or the Fisher penalty)",
                FisherExplosionWarning,
                stacklevel=3,
            )

    def _write(self, row: dict[str, Any]) -> None:
        _write_row(self.log, row, FIELDS)


def _check_log(log: Any) -> None:
    if log is not None and not callable(log) and Path(log).suffix not in LOG_SUFFIXES:
        raise ValueError(
            f"log must be a callable or a path ending in one of {LOG_SUFFIXES}, got {log!r}"
        )


def _write_row(
    log: Callable[[dict[str, Any]], Any] | str | os.PathLike[str] | None,
    row: dict[str, Any],
    fields: tuple[str, ...],
) -> None:
    """Pass ``row`` to a callable, or append it to a ``.jsonl`` or ``.csv`` file."""
    if log is None:
        return
    if callable(log):
        log(dict(row))
        return
    path = Path(log)
    if path.suffix == ".jsonl":
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


#: What :class:`CurvatureMonitor` can track (the keys of its rows).
CURVATURE_QUANTITIES = ("trace_F", "trace_K", "lambda_K", "lambda_H", "lambda_H_eta_over_2")


class CurvatureMonitor(_StepSchedule):
    """Track Tr(F), Tr(K), λ_K^1, λ_H^1 and ``λ_H^1·η/2`` on a fixed probe set in training.

    The quantities of the break-even point (Jastrzebski et al., "The Break-Even Point on
    Optimization Trajectories of Deep Neural Networks", ICLR 2020) and of the edge of
    stability (Cohen et al., ICLR 2021), by name (:data:`CURVATURE_QUANTITIES`):

    * ``"trace_F"``: Tr(F) (:func:`~fisher_optim.curvature.fisher_trace`, sampled labels);
    * ``"trace_K"``, ``"lambda_K"``: the trace and top eigenvalue of the covariance K of
      the per-example gradients with the true labels
      (:func:`~fisher_optim.curvature.gradient_covariance`, normalised by 1/N);
    * ``"lambda_H"``: the largest Hessian eigenvalue of the mean loss on the probe set
      (:func:`~fisher_optim.curvature.hessian_eigenvalues`, Lanczos);
    * ``"lambda_H_eta_over_2"``: ``λ_H^1·η/2``, which gradient descent keeps near 1 at
      the edge of stability (above 1 it is unstable on a quadratic). Needs ``lr``.

    Args:
        model: the network being trained.
        probe: the fixed probe set: an ``(x, y)`` batch or a list of them (the true
            targets are needed for K and H; Tr(F) ignores them).
        quantities: which to track (any of :data:`CURVATURE_QUANTITIES`).
        every: measure on every ``every``-th call of :meth:`step`.
        top_k: with ``top_k > 1`` rows also hold ``"lambda_K_top"`` / ``"lambda_H_top"``,
            the ``top_k`` largest eigenvalues (lists, descending) - for the conditioning
            proxy ``λ^k/λ^1`` - and ``"lambda_H_top_residuals"``.
        labels: Tr(F)'s labels, ``"sample"`` or ``"exact"`` (as for :class:`FisherMonitor`).
        lr: the learning rate η for ``"lambda_H_eta_over_2"``: a number, or the optimizer,
            whose first param group's ``"lr"`` is read at each measurement (schedules).
        hessian_probe: the probe set for H, when it should be smaller than ``probe``
            (Lanczos costs ``lanczos_iters`` Hessian-vector products); default ``probe``.
        lanczos_iters, lanczos_tol: passed to
            :func:`~fisher_optim.curvature.hessian_eigenvalues` as ``iters``/``tol``; rows
            hold ``"lambda_H_residual"`` (of λ_H^1) and ``"lambda_H_converged"`` (every
            one of the ``top_k`` residuals ≤ tol·|λ_H^i|, its own eigenvalue:
            :func:`~fisher_optim.curvature.is_converged`).
        output_fn, log, seed, generator: as for :class:`FisherMonitor`; ``likelihood`` and
            ``target_mask`` too, for ``trace_F`` (K and H use the true targets).

    A row is ``{"step", "loss", "time", "duration"}`` plus the quantities. Measuring leaves
    the model exactly as found (parameters, buffers, ``.grad``, modes).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> monitor = CurvatureMonitor(net, (x, y), ["trace_K", "lambda_K", "lambda_H"], every=2)
    >>> rows = [monitor.step() for _ in range(4)]
    >>> [r["step"] for r in monitor.history], rows[1]["lambda_K"] <= rows[1]["trace_K"]
    ([2, 4], True)
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        quantities: Any = ("trace_F", "trace_K", "lambda_K", "lambda_H"),
        *,
        every: int = 1,
        top_k: int = 1,
        labels: str = "sample",
        lr: float | torch.optim.Optimizer | None = None,
        hessian_probe: Any = None,
        lanczos_iters: int = 100,
        lanczos_tol: float = 1e-4,
        output_fn: OutputFn | None = None,
        likelihood: str | Likelihood = "categorical",
        target_mask: TargetMask | None = None,
        log: Callable[[dict[str, Any]], Any] | str | os.PathLike[str] | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(quantities, str):
            quantities = (quantities,)
        quantities = tuple(quantities)
        if not quantities:
            raise ValueError(f"quantities must name at least one of {CURVATURE_QUANTITIES}")
        for q in quantities:
            check_choice("quantities", q, CURVATURE_QUANTITIES)
        check_positive_int("every", every)
        check_positive_int("top_k", top_k)
        check_choice("labels", labels, LABEL_MODES)
        check_function_or_none("target_mask", target_mask)
        check_positive_int("lanczos_iters", lanczos_iters)
        if "lambda_H_eta_over_2" in quantities and lr is None:
            raise ValueError(
                "lambda_H_eta_over_2 needs the learning rate: pass lr=<float> or lr=optimizer"
            )
        if (
            lr is not None
            and not isinstance(lr, torch.optim.Optimizer)
            and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0)
        ):
            raise ValueError(f"lr must be a positive number or an optimizer, got {lr!r}")
        _check_log(log)
        self.model, self.quantities, self.every, self.top_k = model, quantities, every, top_k
        self.lr, self.output_fn, self.log, self.labels = lr, output_fn, log, labels
        self.likelihood, self.target_mask = get_likelihood(likelihood), target_mask
        self.lanczos_iters, self.lanczos_tol = lanczos_iters, lanczos_tol
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.manual_seed(seed)
        self.probe = list(iter_batches(probe))
        if not self.probe:
            raise ValueError("the probe set holds no batches")
        needs_targets = any(q != "trace_F" for q in quantities)
        if needs_targets and any(y is None for _, y in self.probe):
            raise ValueError(
                f"{[q for q in quantities if q != 'trace_F']} need the true targets: "
                "pass the probe set as (x, y) batches"
            )
        self.hessian_probe = (
            self.probe if hessian_probe is None else list(iter_batches(hessian_probe))
        )
        extra: list[str] = []
        if "lambda_K" in quantities and top_k > 1:
            extra.append("lambda_K_top")
        if "lambda_H" in quantities and top_k > 1:
            extra += ["lambda_H_top", "lambda_H_top_residuals"]
        if "lambda_H" in quantities or "lambda_H_eta_over_2" in quantities:
            extra += ["lambda_H_residual", "lambda_H_converged"]
        self.fields = ("step", "loss", "time", "duration", *quantities, *extra)
        self.history: list[dict[str, Any]] = []
        self.num_calls = 0
        self._pending_loss: float | None = None
        self._start = time.perf_counter()

    def _current_lr(self) -> float:
        if isinstance(self.lr, torch.optim.Optimizer):
            return float(self.lr.param_groups[0]["lr"])
        assert self.lr is not None
        return float(self.lr)

    def measure(self, step: int | None = None, loss: float | Tensor | None = None) -> dict:
        """Measure the tracked quantities now, record and log the row, and return it."""
        begin = time.perf_counter()
        row: dict[str, Any] = {
            "step": self.num_calls if step is None else step,
            "loss": _as_float(loss),
            "time": begin - self._start,
        }
        qs = self.quantities
        if "trace_F" in qs:
            row["trace_F"] = fisher_trace(
                self.model, [x for x, _ in self.probe], labels=self.labels,
                output_fn=self.output_fn, generator=self.generator,
                likelihood=self.likelihood, target_mask=self.target_mask,
            )  # fmt: skip
        if "trace_K" in qs or "lambda_K" in qs:
            cov = gradient_covariance(self.model, self.probe, k=self.top_k,
                                      output_fn=self.output_fn)  # fmt: skip
            if "trace_K" in qs:
                row["trace_K"] = cov.trace
            if "lambda_K" in qs:
                row["lambda_K"] = float(cov.eigenvalues[0])
                if self.top_k > 1:
                    row["lambda_K_top"] = cov.eigenvalues.tolist()
        if "lambda_H" in qs or "lambda_H_eta_over_2" in qs:
            spec = hessian_eigenvalues(
                self.model, self.hessian_probe, k=self.top_k, iters=self.lanczos_iters,
                tol=self.lanczos_tol, output_fn=self.output_fn, generator=self.generator,
            )  # fmt: skip
            top = float(spec.eigenvalues[0])
            if "lambda_H" in qs:
                row["lambda_H"] = top
                if self.top_k > 1:
                    row["lambda_H_top"] = spec.eigenvalues.tolist()
                    row["lambda_H_top_residuals"] = spec.residuals.tolist()
            if "lambda_H_eta_over_2" in qs:
                row["lambda_H_eta_over_2"] = top * self._current_lr() / 2
            row["lambda_H_residual"] = float(spec.residuals[0])
            row["lambda_H_converged"] = spec.converged
        row["duration"] = time.perf_counter() - begin
        self.history.append(row)
        _write_row(self.log, row, self.fields)
        return row

    def step(
        self, loss: float | Tensor | None = None, step: int | None = None
    ) -> dict[str, Any] | None:
        """Count one training step; measure if it is due. Returns the row or ``None``."""
        loss_value = self._count_step(loss)
        if self.num_calls % self.every:
            return None
        return self.measure(step=step, loss=loss_value)

"""Watching Tr(F) during training, to catch a catastrophic Fisher explosion early.

Jastrzebski et al., "Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts
Generalization", ICML 2021: with a small learning rate Tr(F) rises sharply in the first
epochs and stays high, and its early value predicts the final generalisation gap. The
paper's early value ``Tr(F_i)`` is Tr(F) at the first time the training loss falls below
a threshold ε (CIFAR-10: ε=1.2, CIFAR-100: ε=3.5).

:class:`FisherMonitor` measures Tr(F) (:func:`fisher_optim.curvature.fisher_trace`) on a
fixed probe set every few steps, keeps the history, the peak and the early value, warns
when Tr(F) explodes, and logs rows to a callable, a CSV or a JSON-lines file.
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
from .curvature._data import check_choice, check_positive_int, iter_batches
from .curvature.fisher import LABEL_MODES, fisher_trace

__all__ = ["FisherExplosionWarning", "FisherMonitor"]

LOG_SUFFIXES = (".csv", ".jsonl")
FIELDS = ("step", "trace", "loss", "time", "duration", "exploding")


class FisherExplosionWarning(UserWarning):
    """Tr(F) went above the monitor's threshold or grew past its growth factor."""


def _as_float(value: float | Tensor | None) -> float | None:
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


class FisherMonitor:
    """Measure Tr(F) on a fixed probe set during training.

    Args:
        model: the network being trained.
        probe: the fixed probe inputs: a tensor batch, an ``(x, y)`` batch, or a list of
            batches (targets are ignored: Tr(F) uses the model's own labels). Read once.
        every: measure on every ``every``-th call of :meth:`step` (calls ``every``,
            ``2*every``, ...); :meth:`measure` measures at any time.
        labels: ``"sample"`` (one label per example, unbiased and fast) or ``"exact"``.
        output_fn, chunk_size: passed to :func:`~fisher_optim.curvature.fisher_trace`.
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
        for name, value in (("threshold", threshold), ("growth_factor", growth_factor)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if log is not None and not callable(log) and Path(log).suffix not in LOG_SUFFIXES:
            raise ValueError(
                f"log must be a callable or a path ending in one of {LOG_SUFFIXES}, got {log!r}"
            )
        self.model, self.every, self.labels = model, every, labels
        self.output_fn, self.chunk_size = output_fn, chunk_size
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

    def observe_loss(self, loss: float | Tensor) -> None:
        """Pass the training loss of the coming step (for :meth:`attach`-ed monitors)."""
        self._pending_loss = _as_float(loss)

    def step(
        self, loss: float | Tensor | None = None, step: int | None = None
    ) -> dict[str, Any] | None:
        """Count one training step; measure if it is due (or for the early value).

        ``loss``: the training loss of this step (or the last one given to
        :meth:`observe_loss`). ``step``: the step number to record (default: the number of
        calls so far). Returns the new row, or ``None`` when nothing was measured.
        """
        self.num_calls += 1
        loss_value = _as_float(loss) if loss is not None else self._pending_loss
        self._pending_loss = None
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

    __call__ = step

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Call :meth:`step` after every ``optimizer.step()``; ``.remove()`` the handle to stop."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

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
        if self.log is None:
            return
        if callable(self.log):
            self.log(dict(row))
            return
        path = Path(self.log)
        if path.suffix == ".jsonl":
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            return
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)

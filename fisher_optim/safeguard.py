r"""When a refreshed penalty gradient is trusted: the spike safeguard of FisherPenaltySGD.

The paper's FP recomputes ``∇_θ Tr(F_B) = 2 H_ŷ g_ŷ`` every ``k`` steps and adds the same
``α ∇_θ Tr(F_B)`` for the next ``k`` steps (Jastrzebski et al., ICML 2021, Sec. 4). A refresh
that lands on a spike of ``P = Tr(F_B)`` yields one huge gradient that momentum then carries
for ``k`` steps. ``P`` is the squared norm of the mean of ``B`` zero-mean per-example score
vectors, so ``E[P] ≈ Tr(F)/B``: a short batch (the last of an epoch) has a far larger one, and
so does a batch in a sharp region. In the CPU-budget SimpleCNN runs, refreshes on the epoch's
16-image last batch preceded every collapse of the paper's FP (see the docs' measured
results).

The rule, on the norm of what is applied. Let ``m`` be the median of ``||∇P||`` over the
last ``window`` accepted refreshes (known once ``min_history`` of them are). A refresh with
``||∇P_t|| > factor · m`` is a *spike*:

* its gradient is scaled to the threshold, by ``s = factor · m / ||∇P_t|| < 1``, so the
  applied penalty gradient never exceeds ``factor`` times its running median;
* it is applied for the current step only: the next step refreshes again, on a new batch with
  new labels (so a spike costs one extra refresh, nothing else);
* ``factor · m`` enters the window in its place, so that a lasting rise of the gradient's
  scale is followed within ``window / 2`` refreshes (each at most ``factor`` times the last).

Until ``min_history`` refreshes are known there is no median to judge by, and the first
refreshes can be the riskiest: at initialisation the penalty gradient can fall by orders of
magnitude within a few steps (VGG-11 without BatchNorm on CIFAR-10 at lr 0.01, seed 1:
``||∇P||`` 5,777, 4,048, 1,551, 101, 14 and 2.5 at steps 0 to 5), and the paper's FP applies
the step-0 gradient for ``k`` steps. With ``early=True`` (``FisherPenaltySGD(guard_early=True)``)
each of the first ``min_history`` refreshes is *unjudged*: applied unscaled for the current
step only, so the first ``min_history`` steps take the exact (``k = 1``) FP step, for at
most ``min_history − 1`` extra refreshes per run. It is off by default because it changes every
run's first steps, which the rest of the rule leaves as the paper's.

Below the threshold nothing changes: the gradient and the refresh schedule are the paper's.
The check reads one norm that the optimizer brings to the host with the penalty value (one
sync per refresh, as before), so it costs nothing measurable.

>>> guard = SpikeGuard(factor=4.0, window=8, min_history=3)
>>> [guard.check(v) for v in (1.0, 2.0, 1.5, 1.2)]
[1.0, 1.0, 1.0, 1.0]
>>> guard.check(27.0), guard.reusable, guard.spikes   # threshold 4 * median 1.35 = 5.4
(0.2, False, 1)
>>> early = SpikeGuard(factor=4.0, window=8, min_history=3, early=True)
>>> [(early.check(v), early.reusable) for v in (900.0, 40.0, 2.0, 1.5)]
[(1.0, False), (1.0, False), (1.0, False), (1.0, True)]
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from fisher_optim.validate import check_bool


class SpikeGuard:
    """Flags penalty-gradient norms above ``factor`` times the running median (module doc).

    Args:
        factor: a norm above ``factor`` times the median of the recent accepted norms is a
            spike (> 1).
        window: how many recent accepted values the median is taken over (≥ 1).
        min_history: no value is flagged before this many are known (1 ≤ it ≤ ``window``).
        early: the values checked before ``min_history`` are known are not reusable (their
            gradient is used once).
    """

    def __init__(
        self, factor: float = 4.0, window: int = 20, min_history: int = 5, early: bool = False
    ) -> None:
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not (math.isfinite(factor) and factor > 1)
        ):
            raise ValueError(f"spike factor must be a finite number > 1, got {factor!r}")
        for name, value in (("window", window), ("min_history", min_history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"spike {name} must be an integer ≥ 1, got {value!r}")
        if min_history > window:
            raise ValueError(
                f"spike min_history ({min_history}) must not exceed the window ({window})"
            )
        self.factor = float(factor)
        self.window = window
        self.min_history = min_history
        self.early = bool(early)
        self.history: deque[float] = deque(maxlen=window)
        #: Refreshes flagged as spikes so far.
        self.spikes = 0
        #: Whether the last checked gradient may be reused (False: unjudged or a spike).
        self.reusable = False
        #: The scale applied to the last refresh's gradient (1.0: untouched).
        self.last_scale = 1.0

    @property
    def unjudged(self) -> int:
        """With ``early``: values checked before ``min_history`` were known (each used once).
        Every check adds one value to the history, and the window holds at least
        ``min_history``, so they are the first ``min(len(history), min_history)``."""
        return min(len(self.history), self.min_history) if self.early else 0

    def threshold(self) -> float | None:
        """``factor`` times the median of the recent values, or None while too few are known."""
        if len(self.history) < self.min_history:
            return None
        ordered = sorted(self.history)
        n = len(ordered)
        median = 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
        return self.factor * median if median > 0 else None

    def check(self, value: float) -> float:
        """Record a finite gradient norm; return the scale for the gradient (1.0 unless a spike).

        Afterwards :attr:`reusable` tells whether the gradient may be reused for the next steps:
        not a spike's, nor (with ``early``) one of the first ``min_history``.
        """
        unjudged = self.early and len(self.history) < self.min_history
        limit = self.threshold()
        self.reusable = not unjudged and (limit is None or value <= limit)
        if limit is None or value <= limit:
            self.history.append(value)
            self.last_scale = 1.0
        else:
            self.history.append(limit)
            self.spikes += 1
            self.last_scale = limit / value
        return self.last_scale

    def spike_message(self, step: int, norm: float, penalty_value: float) -> str:
        """The warning of the first spike (the later ones are only counted)."""
        return (
            f"FisherPenaltySGD: the penalty gradient at step {step} (norm {norm:.4g}, Tr(F_B) "
            f"{penalty_value:.4g}) is over {self.factor:g}x the median norm of the recent "
            f"refreshes (a spike): it was scaled by {self.last_scale:.3g} and is used for this "
            "step only. Further spikes are counted in `opt.spikes` without a warning "
            "(spike_factor=None turns the safeguard off)."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "spikes": self.spikes, "last_scale": self.last_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.spikes = int(state["spikes"])
        self.last_scale = float(state["last_scale"])


def spike_guard(
    spike_factor: float | None, spike_window: int, guard_early: bool, every: int
) -> SpikeGuard | None:
    """The safeguard of ``FisherPenaltySGD(spike_factor=..., spike_window=...,
    guard_early=..., every=...)``, its arguments checked: None when it is off
    (``spike_factor=None``) or has nothing to guard (``every=1``: no gradient is reused, each
    step's is exact)."""
    check_bool("guard_early", guard_early)
    if guard_early and spike_factor is None:
        raise ValueError("guard_early=True needs the safeguard: give a spike_factor, not None")
    if spike_factor is None:
        return None
    guard = SpikeGuard(spike_factor, spike_window, min(5, spike_window), early=guard_early)
    return guard if every > 1 else None

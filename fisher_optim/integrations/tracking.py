"""What the trainer callbacks log, independent of the framework: Tr(F) and optimizer counters.

:class:`FisherTracking` wraps a :class:`~fisher_optim.monitor.FisherMonitor` (Tr(F) on a
fixed probe set every ``every`` optimizer steps, Jastrzebski et al., ICML 2021, Eq. 2; the
monitor issues :class:`~fisher_optim.monitor.FisherExplosionWarning`) and turns its rows into
flat ``{name: float}`` metrics; :func:`optimizer_metrics` reads the counters of
:class:`~fisher_optim.FisherPenaltySGD` / :class:`~fisher_optim.FisherNoiseSGD` from an
optimizer, through the wrappers trainers put around it (Lightning's ``LightningOptimizer``,
Accelerate's ``AcceleratedOptimizer``).

>>> import torch
>>> from torch import Tensor, nn
>>> from fisher_optim import FisherPenaltySGD
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
>>> opt = FisherPenaltySGD(net, lr=0.1, alpha=0.1, every=1)
>>> loss = nn.functional.cross_entropy(net(torch.randn(8, 4)), torch.zeros(8).long())
>>> loss.backward()
>>> opt.step()
>>> sorted(optimizer_metrics([opt]))
['fisher/penalty_grad_norm', 'fisher/penalty_value', 'fisher/refreshes', 'fisher/skipped_refreshes', 'fisher/spikes']
>>> tracking = FisherTracking(torch.randn(16, 4), every=2)
>>> tracking.bind(net)
>>> tracking.step(1), sorted(tracking.step(2))
({}, ['fisher/duration', 'fisher/exploding', 'fisher/trace'])
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from fisher_optim.monitor import FisherMonitor
from fisher_optim.validate import check_keywords

__all__ = [
    "OPTIMIZER_STATS",
    "ROW_SKIP",
    "FisherTracking",
    "check_monitor_keywords",
    "optimizer_metrics",
]

#: Optimizer attribute → logged name (after the prefix). FisherPenaltySGD: the last penalty
#: Tr(F_B) and the norm of its gradient, the penalty gradients computed, those dropped as
#: NaN/Inf, those the spike safeguard scaled down and (with ``guard_early``) the early ones it
#: used once, and with ``max_grad_norm`` the full gradient's norm before clipping;
#: FisherNoiseSGD: the last noise norm and its Tr(F) estimate.
OPTIMIZER_STATS: dict[str, str] = {
    "penalty_value": "penalty_value",
    "penalty_grad_norm": "penalty_grad_norm",
    "refreshes": "refreshes",
    "skipped_refreshes": "skipped_refreshes",
    "spikes": "spikes",
    "unjudged_refreshes": "unjudged_refreshes",
    "grad_norm": "grad_norm",
    "noise_norm": "noise_norm",
    "fisher_trace": "noise_fisher_trace",
}

#: Fields of a monitor row that are not logged as metrics (the trainer has its own step, time
#: and loss).
ROW_SKIP = ("step", "time", "loss")


def _unwrap(optimizer: Any) -> Any:
    """The first object of the wrapper chain (``.optimizer`` / ``._optimizer``) that carries
    one of :data:`OPTIMIZER_STATS`, or the innermost one."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if any(hasattr(optimizer, name) for name in OPTIMIZER_STATS):
            return optimizer
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def _number(value: Any) -> float | None:
    """A Python number or a one-element tensor as a float; None for anything else."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach())
    return None


def optimizer_metrics(optimizers: Iterable[Any], prefix: str = "fisher/") -> dict[str, float]:
    """The counters (:data:`OPTIMIZER_STATS`) of every optimizer that has them, as floats.

    Names are ``prefix + name``; with several such optimizers, ``prefix + name + "_<i>"``
    (``i`` its position in ``optimizers``). Unset values (``None``) are left out.
    """
    found = [(i, _unwrap(opt)) for i, opt in enumerate(optimizers)]
    found = [(i, opt) for i, opt in found if any(hasattr(opt, n) for n in OPTIMIZER_STATS)]
    out: dict[str, float] = {}
    for i, opt in found:
        suffix = f"_{i}" if len(found) > 1 else ""
        for attr, name in OPTIMIZER_STATS.items():
            value = _number(getattr(opt, attr, None))
            if value is not None:
                out[f"{prefix}{name}{suffix}"] = value
    return out


def check_monitor_keywords(owner: str, monitor_kwargs: dict[str, Any]) -> None:
    """Refuse a keyword that :class:`~fisher_optim.monitor.FisherMonitor` does not take,
    naming ``owner`` and the closest one (``evry=10``: did you mean ``every``?)."""
    accepted = [
        name
        for name, p in inspect.signature(FisherMonitor.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    ]
    check_keywords(owner, monitor_kwargs, [*accepted, "prefix"])


class FisherTracking:
    """A :class:`~fisher_optim.monitor.FisherMonitor` whose rows become flat metrics.

    Args:
        probe: the fixed probe inputs (a tensor, a dict of tensors as a Hugging Face model
            takes them, an ``(x, y)`` batch or a list of batches; targets are ignored).
        prefix: put before every metric name.
        **monitor_kwargs: forwarded to :class:`~fisher_optim.monitor.FisherMonitor` as they
            are, with its defaults for those not given: ``every`` (measure Tr(F) every
            ``every`` optimizer steps), ``labels``, ``output_fn``, ``likelihood``,
            ``target_mask``, ``chunk_size``, ``threshold`` / ``growth_factor`` (the explosion
            warning), ``loss_threshold``, ``seed``, ...; a keyword the monitor does not take
            raises ``TypeError`` naming the closest one.

    The arguments are checked here (a monitor is built on a placeholder model); the monitor
    of the trained model is built by :meth:`bind`, once the trainer has placed the model.
    """

    def __init__(self, probe: Any, *, prefix: str = "fisher/", **monitor_kwargs: Any) -> None:
        check_monitor_keywords(type(self).__name__, monitor_kwargs)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        self.probe, self.prefix = probe, prefix
        self.monitor_kwargs: dict[str, Any] = dict(monitor_kwargs)
        FisherMonitor(nn.Module(), probe, **self.monitor_kwargs)  # validates, measures nothing
        self.monitor: FisherMonitor | None = None

    def bind(self, model: nn.Module) -> None:
        """Build the monitor of ``model`` (a new one: its schedule starts again)."""
        self.monitor = FisherMonitor(model, self.probe, **self.monitor_kwargs)

    def _monitor(self) -> FisherMonitor:
        if self.monitor is None:
            raise RuntimeError("FisherTracking.bind(model) must be called before step()")
        return self.monitor

    def step(self, step: int, loss: float | None = None) -> dict[str, float]:
        """Count one optimizer step (numbered ``step``); the metrics of the measurement if one
        was due, else ``{}``."""
        monitor = self._monitor()
        row = monitor.step(loss=loss, step=step)
        if row is None:
            return {}
        out = {
            f"{self.prefix}{k}": float(v)
            for k, v in row.items()
            if k not in ROW_SKIP and _number(v) is not None
        }
        if monitor.early_value is not None and monitor.early_step == row["step"]:
            out[f"{self.prefix}early_trace"] = float(monitor.early_value)
        return out

"""A Lightning ``Callback`` that logs Tr(F) and the Fisher optimizers' counters.

Jastrzebski et al., "Catastrophic Fisher Explosion", ICML 2021: Tr(F) (Eq. 2) measured on a
fixed probe set early in training predicts generalisation; the Fisher penalty keeps it down.
:class:`FisherLightningCallback` measures it every ``every`` optimizer steps (with
:class:`~fisher_optim.monitor.FisherMonitor`, which warns with
:class:`~fisher_optim.monitor.FisherExplosionWarning`) and writes it, with the optimizer's
``penalty_value`` / ``refreshes`` / ``skipped_refreshes`` (see
:data:`~fisher_optim.integrations.tracking.OPTIMIZER_STATS`), to every logger of the trainer
(``trainer.loggers``: CSV, TensorBoard, W&B, ...) at the trainer's ``global_step``.

Requires ``lightning`` (``lightning.pytorch``) or, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from fisher_optim.integrations.tracking import (
    FisherTracking,
    check_monitor_keywords,
    optimizer_metrics,
)

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "fisher_optim.integrations.lightning needs Lightning: pip install lightning "
            "(or pytorch_lightning); fisher_optim itself does not"
        ) from err

__all__ = ["FisherLightningCallback"]


class FisherLightningCallback(pl.Callback):
    """Log Tr(F) on a fixed probe set and the optimizer's Fisher counters to the trainer's loggers.

    Args:
        probe: the fixed probe inputs, as the measured module's ``forward`` takes them (a
            tensor, a dict of tensors, an ``(x, y)`` batch or a list of batches).
        submodule: the name (for ``pl_module.get_submodule``) of the module whose ``forward``
            takes the probe and returns the logits, e.g. ``"net"``; default: the
            LightningModule itself.
        prefix: put before every metric name.
        **monitor_kwargs: forwarded to :class:`~fisher_optim.monitor.FisherMonitor` as they
            are, with its defaults (see
            :class:`~fisher_optim.integrations.tracking.FisherTracking`): ``every`` (measure
            Tr(F) every ``every`` optimizer steps: ``trainer.global_step`` = every, 2·every,
            ...; with ``accumulate_grad_batches`` a step is an optimizer step), ``labels``,
            ``output_fn``, ``likelihood``, ``target_mask``, ``threshold``, ...

    Logged metrics (``prefix`` = ``"fisher/"``): at each measurement ``fisher/trace``
    (Tr(F), eval mode, the model left exactly as found), ``fisher/duration`` (seconds),
    ``fisher/exploding`` (1 once the explosion warning fired) and, at the first training loss
    below ``loss_threshold``, ``fisher/early_trace`` (the paper's Tr(F_i)); at each
    measurement and every ``trainer.log_every_n_steps`` optimizer steps, the optimizer's
    counters (``fisher/penalty_value``, ``fisher/refreshes``, ``fisher/skipped_refreshes``, ...).
    The training loss passed to the monitor is the mean of the ``training_step`` losses since
    the previous optimizer step. The values go straight to ``logger.log_metrics`` (not
    through ``self.log``, which would keep only every ``log_every_n_steps``-th measurement).
    Under DDP every rank measures its (identical) replica; Lightning's loggers write on rank 0.

    A new monitor is made at every ``fit`` (``on_train_start``): its history, peak and
    explosion flag are not checkpointed.
    """

    def __init__(
        self,
        probe: Any,
        *,
        submodule: str | None = None,
        prefix: str = "fisher/",
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        check_monitor_keywords(type(self).__name__, monitor_kwargs)
        if submodule is not None and not isinstance(submodule, str):
            raise TypeError(f"submodule must be a module name (str) or None, got {submodule!r}")
        self.submodule = submodule
        self.tracking = FisherTracking(probe, prefix=prefix, **monitor_kwargs)
        self._last_step = 0
        self._loss_sum, self._loss_count = 0.0, 0

    @property
    def monitor(self) -> Any:
        """The :class:`~fisher_optim.monitor.FisherMonitor` of the current fit (or None)."""
        return self.tracking.monitor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = pl_module.get_submodule(self.submodule) if self.submodule else pl_module
        self.tracking.bind(model)
        self._last_step = trainer.global_step
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._loss_sum += float(loss.detach())
            self._loss_count += 1
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step yet (gradient accumulation)
            return
        self._last_step = step
        mean_loss = self._loss_sum / self._loss_count if self._loss_count else None
        self._loss_sum, self._loss_count = 0.0, 0
        metrics = self.tracking.step(step, mean_loss)
        if metrics or step % max(trainer.log_every_n_steps, 1) == 0:
            metrics.update(optimizer_metrics(trainer.optimizers, self.tracking.prefix))
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

"""Hugging Face ``Trainer``: a callback that logs Tr(F) and the Fisher optimizers' counters,
and :class:`FisherPenaltyFactory`, which gives the ``Trainer`` a FisherPenaltySGD by name.

Jastrzebski et al., "Catastrophic Fisher Explosion", ICML 2021: Tr(F) (Eq. 2) measured on a
fixed probe set early in training predicts generalisation; the Fisher penalty keeps it down.
:class:`FisherTrainerCallback` measures it every ``every`` optimizer steps with
:class:`~fisher_optim.monitor.FisherMonitor` (which warns with
:class:`~fisher_optim.monitor.FisherExplosionWarning`) and puts it, with the optimizer's
counters (:data:`~fisher_optim.integrations.tracking.OPTIMIZER_STATS`), into the ``logs`` of
the ``Trainer``, so that ``trainer.state.log_history`` and every reporting integration
(``report_to``: TensorBoard, W&B, ...) see it.

Requires ``transformers``.

The optimizer. ``TrainingArguments(optim=...)`` accepts only the names of
``transformers.training_args.OptimizerNames``, a closed enum: a new name cannot be added
without patching transformers, so ``optim="fishersgd"`` raises a ``ValueError`` there. What
works without patching, besides ``Trainer(optimizers=(FisherPenaltySGD(model, ...), None))``:
``Trainer(optimizer_cls_and_kwargs=(FisherPenaltyFactory, {"lr": ..., "alpha": ...}))``, which
the ``Trainer`` calls as a factory with its model when it builds its optimizer (tested with
transformers 5.24; see :class:`FisherPenaltyFactory`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fisher_optim.fisher_penalty_sgd import FisherPenaltySGD
from fisher_optim.integrations.tracking import (
    FisherTracking,
    check_monitor_keywords,
    optimizer_metrics,
)

try:
    from transformers import DefaultFlowCallback, Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "fisher_optim.integrations.transformers needs Hugging Face transformers: "
        "pip install transformers; fisher_optim itself does not"
    ) from err

__all__ = ["FisherPenaltyFactory", "FisherTrainerCallback"]

#: Log rows of evaluation and prediction, which get no Fisher metrics.
EVAL_PREFIXES = ("eval_", "test_")


def _reports(args: Any) -> bool:
    """Whether the Trainer's arguments send logs to a reporting integration."""
    report_to = getattr(args, "report_to", None)
    if isinstance(report_to, str):
        report_to = [report_to]
    return bool(report_to) and list(report_to) != ["none"]


class FisherTrainerCallback(TrainerCallback):
    """Log Tr(F) on a fixed probe set and the optimizer's Fisher counters through the Trainer.

    Args:
        probe: the fixed probe inputs, as the model takes them: a dict of tensors
            (``{"input_ids": ..., "attention_mask": ...}``), a tensor, or a list of batches.
        prefix: put before every metric name.
        **monitor_kwargs: forwarded to :class:`~fisher_optim.monitor.FisherMonitor` as they
            are, with its defaults (see
            :class:`~fisher_optim.integrations.tracking.FisherTracking`): ``every`` (measure
            Tr(F) every ``every`` optimizer steps: ``state.global_step`` = every, 2·every,
            ...), ``output_fn`` (not needed for outputs with ``.logits``), ``labels``,
            ``likelihood``, ``target_mask``, ``threshold``, ...

    Install it with :meth:`attach` (``FisherTrainerCallback(probe).attach(trainer)``), which
    puts it ahead of the reporting callbacks: ``Trainer(callbacks=[...])`` and
    ``trainer.add_callback`` put it *after* them, so ``report_to`` integrations would be
    called before it adds its metrics (``log_history`` would still have them; a warning says
    so when ``report_to`` is set).

    At a measurement step it asks the Trainer to log (``control.should_log = True``) and adds
    to that row ``fisher/trace`` (Tr(F), eval mode, the model left exactly as found),
    ``fisher/duration`` (seconds), ``fisher/exploding`` (1 once the explosion warning fired)
    and, at the first training loss below ``loss_threshold``, ``fisher/early_trace``. Every
    training log row also gets the optimizer's counters (``fisher/penalty_value``,
    ``fisher/refreshes``, ``fisher/skipped_refreshes``, ...). The training loss the monitor
    records is the last logged ``loss`` (the Trainer's mean over its logging window).
    """

    def __init__(self, probe: Any, *, prefix: str = "fisher/", **monitor_kwargs: Any) -> None:
        check_monitor_keywords(type(self).__name__, monitor_kwargs)
        self.tracking = FisherTracking(probe, prefix=prefix, **monitor_kwargs)
        self._pending: dict[str, float] = {}
        self._last_loss: float | None = None
        self._attached = False
        self._warned = False

    @property
    def monitor(self) -> Any:
        """The :class:`~fisher_optim.monitor.FisherMonitor` of the current training (or None)."""
        return self.tracking.monitor

    def attach(self, trainer: Any) -> FisherTrainerCallback:
        """Add this callback to ``trainer`` right after its ``DefaultFlowCallback``, ahead of
        the reporting integrations; returns ``self``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        index = next(
            (i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0
        )
        callbacks.insert(index, self)
        self._attached = True
        return self

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise RuntimeError("FisherTrainerCallback needs the Trainer's model")
        self.tracking.bind(model)
        self._pending, self._last_loss = {}, None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        metrics = self.tracking.step(state.global_step, self._last_loss)
        if metrics:
            self._pending = metrics
            control.should_log = True
        return control

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, Any] | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or any(k.startswith(EVAL_PREFIXES) for k in logs):
            return
        if isinstance(logs.get("loss"), (int, float)):
            self._last_loss = float(logs["loss"])
        metrics = {**self._pending}
        if optimizer is not None:
            metrics.update(optimizer_metrics([optimizer], self.tracking.prefix))
        self._pending = {}
        if not metrics:
            return
        row = state.log_history[-1] if state.log_history else None
        if row is not None and all(row.get(k) is v or row.get(k) == v for k, v in logs.items()):
            row.update(metrics)  # the Trainer appended a copy of logs before calling us
        logs.update(metrics)
        if not self._attached and not self._warned and _reports(args):
            self._warned = True
            warnings.warn(
                "FisherTrainerCallback was added after the Trainer's reporting callbacks "
                f"(report_to={args.report_to!r}), which therefore log without the fisher/ "
                "metrics; install it with FisherTrainerCallback(...).attach(trainer)",
                UserWarning,
                stacklevel=2,
            )


class FisherPenaltyFactory:
    """``Trainer(optimizer_cls_and_kwargs=(FisherPenaltyFactory, kwargs))``: the Trainer's
    optimizer is a FisherPenaltySGD built on its model.

    The ``Trainer`` instantiates a class in ``optimizer_cls_and_kwargs`` that is not a
    ``torch.optim.Optimizer`` and calls it with its model: ``FisherPenaltyFactory()(model,
    **kwargs)``. ``kwargs`` are FisherPenaltySGD's (``alpha`` is required; ``every``, ``mode``,
    ``max_grad_norm``, ...; ``base_optimizer`` defaults to ``torch.optim.AdamW``, the Trainer's
    default) and the base optimizer's. ``lr`` is required too: the Trainer does not pass
    ``TrainingArguments.learning_rate`` to such a factory, and the base optimizer's own default
    would go unnoticed. ``weight_decay`` spares biases and norm-layer weights, as the Trainer's
    own optimizer does (``Trainer.get_decay_parameter_names``).

    The Trainer calls the factory with its model unwrapped: under multi-process DDP build the
    optimizer on the wrapped model yourself (``optimizers=(opt, None)``; see the integration
    guide). Pass ``max_grad_norm=0`` to ``TrainingArguments`` and ``max_grad_norm=...`` here,
    so that clipping sees the penalty term.
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        weight_decay: float = 0.0,
        **kwargs: object,
    ) -> FisherPenaltySGD:
        for key, example in (("lr", "1e-4"), ("alpha", "0.01")):
            if key not in kwargs:
                raise ValueError(
                    f"FisherPenaltyFactory needs {key}=... in the kwargs of "
                    f"optimizer_cls_and_kwargs, e.g. {{{key!r}: {example}}}"
                    + (
                        " (TrainingArguments.learning_rate does not reach a factory)"
                        if key == "lr"
                        else ""
                    )
                )
        decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [
            {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        params = [g for g in params if g["params"]]
        return FisherPenaltySGD(model, base_optimizer, params=params, **kwargs)

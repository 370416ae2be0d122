"""Callbacks for training frameworks, imported on demand (the library needs only torch and numpy).

* :mod:`fisher_optim.integrations.lightning`: :class:`~fisher_optim.integrations.lightning.FisherLightningCallback`,
  a Lightning ``Callback`` (needs ``lightning`` or ``pytorch_lightning``);
* :mod:`fisher_optim.integrations.transformers`: :class:`~fisher_optim.integrations.transformers.FisherTrainerCallback`,
  a ``transformers.TrainerCallback`` (needs ``transformers``), and
  :class:`~fisher_optim.integrations.transformers.FisherPenaltyFactory` for the ``Trainer``'s
  ``optimizer_cls_and_kwargs``;
* :mod:`fisher_optim.integrations.timm`: :func:`~fisher_optim.integrations.timm.register_timm_optimizers`,
  ``"fishersgd"``/``"fisheradamw"`` in timm's optimizer factory (needs ``timm``).

The two callbacks measure Tr(F) on a fixed probe set with :class:`~fisher_optim.monitor.FisherMonitor`
(which issues :class:`~fisher_optim.monitor.FisherExplosionWarning`), read the optimizer's
counters (:data:`~fisher_optim.integrations.tracking.OPTIMIZER_STATS`) and hand everything to
the trainer's own loggers, under the prefix ``"fisher/"``. Nothing here is imported by
``import fisher_optim``; importing a submodule without its framework raises an ``ImportError``
that says what to install.
"""

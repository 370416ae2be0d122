"""FisherPenaltySGD in timm's optimizer factory: ``create_optimizer_v2(model, "fishersgd", ...)``.

timm (≥ 1.0) builds optimizers by name from a registry of ``OptimInfo`` records;
:func:`register_timm_optimizers` adds two names to the registry ``create_optimizer_v2`` uses:

* ``"fishersgd"``: :class:`~fisher_optim.FisherPenaltySGD` over ``torch.optim.SGD`` (timm's
  default momentum, 0.9, applies);
* ``"fisheradamw"``: the same over ``torch.optim.AdamW`` (``betas``, ``eps`` accepted).

timm calls the registered class with the parameter groups it built (weight decay off for
biases and norm layers), never with the model, and FisherPenaltySGD needs the model to rerun
its forward. Give it as a keyword, which timm passes through untouched::

    import timm.optim
    from fisher_optim.integrations.timm import register_timm_optimizers

    register_timm_optimizers()
    opt = timm.optim.create_optimizer_v2(
        model, "fishersgd", lr=0.1, weight_decay=5e-4, alpha=0.01, model=model
    )

Everything else (``every``, ``mode``, ``penalty``, ...) is a keyword of FisherPenaltySGD.

What does not work without patching timm:

* timm's ``train.py`` (``--opt fishersgd``): it cannot pass the model (``--opt-kwargs``
  come from the command line), so the optimizer raises a ``ValueError`` saying so.
* The registry ``create_optimizer_v2`` reads is ``timm.optim._optim_factory.default_registry``:
  timm exports ``OptimInfo`` and ``OptimizerRegistry`` but not that instance, so registering
  reaches into a private module (through its public ``register`` method; nothing is patched).
  A timm that moves it makes :func:`register_timm_optimizers` raise ``ImportError``; pass
  ``registry=`` then.
* Names with ``_``: timm keeps only the part after the last ``_`` (a ``lookahead_`` prefix
  wraps the result in timm's ``Lookahead``, which is not supported here), hence
  ``"fishersgd"``, not ``"fisher_sgd"``.

timm needs torchvision, which fisher_optim does not; this module imports timm only when
:func:`register_timm_optimizers` runs without a ``registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fisher_optim.fisher_penalty_sgd import FisherPenaltySGD

__all__ = ["TIMM_NAMES", "register_timm_optimizers"]

#: name -> (base optimizer, description, OptimInfo flags).
TIMM_NAMES: dict[str, tuple[type[torch.optim.Optimizer], str, dict[str, bool]]] = {
    "fishersgd": (
        torch.optim.SGD,
        "SGD with the Fisher penalty (Jastrzebski et al., ICML 2021; fisher_optim)",
        {"has_eps": False, "has_momentum": True},
    ),
    "fisheradamw": (
        torch.optim.AdamW,
        "AdamW with the Fisher penalty (Jastrzebski et al., ICML 2021; fisher_optim)",
        {"has_eps": True, "has_betas": True},
    ),
}


def _builder(name: str, base: type[torch.optim.Optimizer]) -> Callable[..., FisherPenaltySGD]:
    """What timm calls as ``cls(param_groups, **kwargs)``: FisherPenaltySGD over ``base``
    on those groups, with ``model=`` and ``alpha=`` from the keywords."""

    def build(params: Any, *, model: nn.Module | None = None, **kwargs: Any) -> FisherPenaltySGD:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"timm optimizer {name!r} needs the model (FisherPenaltySGD reruns its "
                "forward), and timm passes only parameter groups: add model=model, e.g. "
                f"create_optimizer_v2(model, {name!r}, lr=..., alpha=0.01, model=model)"
            )
        if "alpha" not in kwargs:
            raise ValueError(
                f"timm optimizer {name!r} needs the penalty weight: add alpha=..., e.g. "
                "alpha=0.01 (the paper's FP grid is centred there)"
            )
        return FisherPenaltySGD(model, base, params=params, **kwargs)

    build.__name__ = build.__qualname__ = f"{name}_builder"
    build.__doc__ = f"FisherPenaltySGD over {base.__name__}, as timm's {name!r}."
    return build


def register_timm_optimizers(registry: Any | None = None) -> list[str]:
    """Register :data:`TIMM_NAMES` in timm's optimizer registry (default: the one
    ``timm.optim.create_optimizer_v2`` uses) and return the names.

    ``registry``: any object with timm's ``OptimizerRegistry.register(OptimInfo)``.
    Registering twice replaces the entries (timm logs a warning).
    """
    try:
        from timm.optim import OptimInfo
    except ImportError as err:
        raise ImportError(
            "register_timm_optimizers needs timm (pip install timm, which needs torchvision); "
            "fisher_optim itself does not"
        ) from err
    if registry is None:
        try:
            from timm.optim._optim_factory import default_registry as registry
        except ImportError as err:  # pragma: no cover - depends on the timm version
            raise ImportError(
                "this timm has no timm.optim._optim_factory.default_registry (the registry "
                "create_optimizer_v2 uses); pass registry=... explicitly"
            ) from err
    for name, (base, description, flags) in TIMM_NAMES.items():
        registry.register(
            OptimInfo(name=name, opt_class=_builder(name, base), description=description, **flags)
        )
    return list(TIMM_NAMES)

"""FisherPenaltySGD: any torch optimizer plus the Fisher penalty, as a drop-in.

The objective is ``L(θ) + α · Tr(F_B)`` with ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²`` and
``ŷ_i ~ p_θ(y|x_i)`` (Jastrzebski et al., "Catastrophic Fisher Explosion", ICML 2021, Eq. 3).
Every ``every`` steps the penalty gradient ``∇_θ Tr(F_B) = 2 H_ŷ g_ŷ`` is recomputed on the
current batch and cached; every step adds ``α · cached`` to ``p.grad`` and takes the base
optimizer's step (the paper recomputes every 10 steps).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fisher_optim._logits import OutputFn
from fisher_optim.engines import check_mode, compute_penalty_gradient
from fisher_optim.penalty import LossFn, PenaltyObjective, check_penalty
from fisher_optim.wrapper import GradientWrapper


class FisherPenaltySGD(GradientWrapper):
    r"""Wrap a torch optimizer so that it also descends ``alpha`` times the Fisher penalty.

    Replace ``torch.optim.SGD(model.parameters(), **kw)`` by ``FisherPenaltySGD(model, **kw,
    alpha=...)`` and keep the training loop as it is.

    Args:
        model: the model being trained (an ``nn.Module``; a DDP-wrapped or compiled model is
            fine). A forward pre-hook remembers its latest training-mode input.
        base_optimizer: a ``torch.optim.Optimizer`` class, built on ``model.parameters()``
            (or on ``params=`` given in ``base_kwargs``) with ``base_kwargs``; or an optimizer
            instance, which is wrapped as it is.
        alpha: the penalty weight α ≥ 0 (stored in every param group as ``"alpha"``, so it
            can be scheduled per group). ``alpha=0`` reproduces the base optimizer bit for bit.
        every: recompute the penalty gradient every ``every`` steps and reuse it in between.
        mode: ``"exact"`` (double backprop, ≈3x a gradient) or ``"finite_difference"``
            (two gradients, ≈2x; see :mod:`fisher_optim.engines`).
        penalty: ``"fisher"`` (FP, labels sampled from the model), ``"random_label"`` (GPr),
            ``"gradient"`` (GP, true labels) or ``"input_gradient"`` (GPx, true labels). The
            last two need the targets: call :meth:`set_targets` before each ``step()``.
        output_fn: maps the model's output to logits ``[..., C]``; rows of flattened logits
            each get their own sampled label (a language model's ``[B, T, V]``).
        loss_fn: the loss of ``"gradient"``/``"input_gradient"`` (default cross-entropy).
        penalty_batch_size: use only the first N examples of the batch for the penalty.
        fd_step: finite-difference step r (default: see :func:`~fisher_optim.engines.default_fd_step`).
        seed: seed of the label-sampling generator (default: derived from
            ``torch.initial_seed()``, so seeding torch seeds it; nothing is drawn from
            torch's global generator).

    Attributes users log: ``penalty_value`` (the last ``Tr(F_B)``, a float, or None),
    ``refreshes`` (penalty gradients computed), ``skipped_refreshes`` (dropped as NaN/Inf).

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> opt = FisherPenaltySGD(model, lr=0.1, momentum=0.9, alpha=0.01, every=2)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     x, y = torch.randn(8, 4), torch.randint(3, (8,))
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step()
    >>> opt.refreshes, opt.penalty_value > 0
    (2, True)
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        *,
        alpha: float,
        every: int = 10,
        mode: str = "exact",
        penalty: str = "fisher",
        output_fn: OutputFn | None = None,
        loss_fn: LossFn | None = None,
        penalty_batch_size: int | None = None,
        fd_step: float | None = None,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(alpha, (int, float)) or alpha < 0:
            raise ValueError(f"alpha must be a number ≥ 0, got {alpha!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer ≥ 1, got {every!r}")
        if penalty_batch_size is not None and penalty_batch_size < 1:
            raise ValueError(f"penalty_batch_size must be ≥ 1 or None, got {penalty_batch_size}")
        if fd_step is not None and fd_step <= 0:
            raise ValueError(f"fd_step must be > 0 or None, got {fd_step}")
        self.every = every
        self.mode = check_mode(mode)
        self.penalty = check_penalty(penalty)
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.penalty_batch_size = penalty_batch_size
        self.fd_step = fd_step
        super().__init__(model, base_optimizer, {"alpha": float(alpha)}, base_kwargs, seed)
        if mode == "exact" and hasattr(self.module, "_orig_mod"):
            self.module = self.module._orig_mod  # double backward needs the eager module
        self.penalty_value: float | None = None
        self.refreshes = 0
        self.skipped_refreshes = 0
        self._cache: list[Tensor | None] | None = None

    # ----------------------------------------------------------------- step
    def _before_base_step(self) -> None:
        if self.step_count % self.every == 0 and any(g["alpha"] > 0 for g in self.param_groups):
            self._refresh()
        if self._cache is None:
            return
        for group, cached in zip(self.param_groups, self.group_slices(self._cache)):
            if group["alpha"] == 0:
                continue
            pairs = [
                (p.grad, c) for p, c in zip(group["params"], cached)
                if p.grad is not None and c is not None
            ]
            if pairs:
                grads, penalty_grads = zip(*pairs)
                torch._foreach_add_(list(grads), list(penalty_grads), alpha=group["alpha"])

    def _refresh(self) -> None:
        """Compute ``∇_θ Tr(F_B)`` on the current batch and cache it (or drop it if not finite)."""
        params = self.flat_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        batch = self.current_batch().head(self.penalty_batch_size)
        objective = PenaltyObjective(
            self.module, batch, penalty=self.penalty,
            params=[params[i] for i in trainable], output_fn=self.output_fn,
            loss_fn=self.loss_fn, generator=self.generator(self._batch_device()),
        )
        with self.own_pass(autocast=self.mode == "exact"):
            result = compute_penalty_gradient(objective, self.mode, self.fd_step)
        grads = result.grads
        if self._process_group() is not None:  # every rank adds the same mean gradient
            grads = [torch.zeros_like(params[i]) if g is None else g for i, g in zip(trainable, grads)]
            *grads, value = self.all_reduce_mean([*grads, result.value])
        else:
            value = result.value
        present = [g for g in grads if g is not None]
        norm_sum = torch.stack(torch._foreach_norm(present)).float().sum() if present else value
        # one host sync per refresh: the penalty value, and whether every entry is finite
        penalty_value, check = torch.stack([value.float(), norm_sum.float()]).tolist()
        finite = math.isfinite(penalty_value) and math.isfinite(check)
        self.refreshes += 1
        if not finite:
            self.skipped_refreshes += 1
            self._cache = None
            warnings.warn(
                f"FisherPenaltySGD: the penalty gradient at step {self.step_count} is not finite "
                f"(penalty value {penalty_value}); it was dropped and no parameter was changed by "
                f"it ({self.skipped_refreshes} dropped so far). Training continues.",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        self.penalty_value = penalty_value
        cache: list[Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, grads):
            cache[i] = None if g is None else g.detach()
        self._cache = cache

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "penalty_value": self.penalty_value,
            "refreshes": self.refreshes,
            "skipped_refreshes": self.skipped_refreshes,
            "cache": self._cache,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.penalty_value = extra["penalty_value"]
        self.refreshes = extra["refreshes"]
        self.skipped_refreshes = extra["skipped_refreshes"]
        self._cache = self.load_per_param(extra["cache"], "penalty cache", lambda p: p.dtype)

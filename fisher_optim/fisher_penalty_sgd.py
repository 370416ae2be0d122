"""FisherPenaltySGD: any torch optimizer plus the Fisher penalty, as a drop-in.

The objective is ``L(θ) + α · Tr(F_B)`` with ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²`` and
``ŷ_i ~ p_θ(y|x_i)`` (Jastrzebski et al., "Catastrophic Fisher Explosion", ICML 2021, Eq. 3).
Every ``every`` steps the penalty gradient ``∇_θ Tr(F_B) = 2 H_ŷ g_ŷ`` is recomputed on the
current batch and cached; every step adds ``α · cached`` to ``p.grad`` and takes the base
optimizer's step (the paper recomputes every 10 steps). A refreshed gradient far larger than
the recent ones is bounded and used once (:mod:`fisher_optim.safeguard`, on by default).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fisher_optim._fsdp import (
    INPUT_GRADIENT_UNSUPPORTED,
    compute_dtypes,
    global_norms,
    is_fsdp,
)
from fisher_optim._global_rows import rank_share
from fisher_optim._logits import OutputFn
from fisher_optim.differentiation import (
    FiniteDifferenceSchedule,
    check_fd_dtypes,
    compute_penalty_gradient,
)
from fisher_optim.likelihoods import Likelihood
from fisher_optim.penalty import (
    LossFn,
    Penalty,
    PenaltyObjective,
    check_likelihood,
    check_penalty_scale,
    get_penalty,
)
from fisher_optim.safeguard import spike_guard
from fisher_optim.targets import TargetMask
from fisher_optim.validate import (
    check_bool,
    check_function_or_none,
    check_positive_int,
    check_positive_int_or_none,
)
from fisher_optim.wrapper import GradientWrapper, after_dropped, load_per_param

#: The param-group key of the penalty weight α (used by no ``torch.optim`` optimizer).
WEIGHT_KEY = "penalty_weight"


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
        alpha: the penalty weight α ≥ 0, a finite number. It is stored in every param group
            under the key ``"penalty_weight"`` (:data:`WEIGHT_KEY`; no ``torch.optim``
            optimizer uses it), so it can differ per group (``{"params": ...,
            "penalty_weight": 0.0}``) or be scheduled (``group["penalty_weight"] = 0.1``).
            ``alpha=0`` reproduces the base optimizer bit for bit. A base optimizer with an
            ``alpha`` of its own (``RMSprop``, ``ASGD``) keeps it; to set it, pass an instance:
            ``FisherPenaltySGD(model, torch.optim.RMSprop(model.parameters(), alpha=0.9),
            alpha=0.01)``.
        every: recompute the penalty gradient every ``every`` steps and reuse it in between.
        mode: ``"exact"`` (double backprop, ≈3x a gradient) or ``"finite_difference"``
            (two gradients, ≈2x; see :mod:`fisher_optim.differentiation`). Under FSDP2 the
            exact mode gathers the full parameters at each refresh (:mod:`fisher_optim._fsdp`);
            the finite difference stays sharded.
        penalty: ``"fisher"`` (FP, labels sampled from the model), ``"random_label"`` (GPr),
            ``"gradient"`` (GP, true labels) or ``"input_gradient"`` (GPx, true labels), or a
            :class:`~fisher_optim.penalty.Penalty` instance (kept as ``opt.penalty``). Those
            with ``needs_targets`` (GP, GPx) need the targets: call :meth:`set_targets`
            before each ``step()``.
        output_fn: maps the model's output to logits ``[..., C]``; rows of flattened logits
            each get their own sampled label (a language model's ``[B, T, V]``). Not needed
            for outputs that carry ``.logits`` (Hugging Face ``ModelOutput``, dataclasses,
            dicts with ``"logits"``).
        target_mask: which rows of the logits have a target, for models other than Hugging
            Face ones (where padding, ``-100`` labels and the causal shift are handled
            automatically): a function called like the model, ``target_mask(*args,
            **kwargs)``, returning a boolean tensor shaped like the logits without their class
            dimension (or None: every row). Rows without a target get no label and do not
            enter ``Tr(F_B)``. See :mod:`fisher_optim.targets`.
        penalty_scale: ``"batch"`` (default): penalise ``Tr(F_B)`` as the paper does, which
            shrinks as 1/N with the number N of target rows (1/T for a language model);
            ``"per_row"``: penalise ``N · Tr(F_B)``, an unbiased estimate of the mean per-row
            Fisher trace, so that ``alpha`` carries across batch sizes and sequence lengths
            (derivation: :class:`~fisher_optim.penalty.PenaltyObjective`). ``"fisher"`` only.
        max_grad_norm: clip the *full* gradient (loss gradient plus ``alpha`` times the
            penalty gradient) to this norm just before the base step, as
            ``torch.nn.utils.clip_grad_norm_`` would; the pre-clipping norm is kept in
            ``grad_norm``. Use it *instead of* clipping in the training loop (which sees only
            the loss gradient): see the integration guide for Trainer and Lightning.
        loss_fn: the loss of ``"gradient"``/``"input_gradient"``, called as
            ``loss_fn(output, targets)`` with the model's output (after ``output_fn``) and the
            targets exactly as given (default: the likelihood's negative log-likelihood,
            cross-entropy for ``"categorical"``).
        likelihood: the model's predictive distribution ``p_θ(y|x)`` the labels ŷ are drawn
            from: ``"categorical"`` (default, the paper's: softmax over ≥ 2 classes),
            ``"bernoulli"`` (one logit per binary label, e.g. a ``[B, 1]`` binary classifier)
            or ``"gaussian"`` (regression, ŷ ~ N(f(x), σ²), σ = 1;
            ``fisher_optim.Gaussian(sigma=...)`` otherwise). A one-output model with
            ``"categorical"`` raises (its Tr(F_B) would be identically 0). See
            :mod:`fisher_optim.likelihoods`.
        penalty_batch_size: take the penalty on N examples of the (global) batch: the first N
            on one process; under DDP or FSDP2 the first N/R of each of the R ranks' batches
            (one more on the first N mod R ranks), so that Tr(F_B) has the scale of N examples
            on any number of ranks (docs/guides/distributed.md). The
            batch is cut by the one rule of :mod:`fisher_optim.batch` (every tensor input
            holds the examples in its first dimension; pass shared tensors through the
            model), checked once per input layout (:meth:`GradientWrapper.cut`).
        fd_step: finite-difference step r (default: see :func:`~fisher_optim.differentiation.default_fd_step`).
        fd_scheme: ``"forward"`` (2 gradients), ``"central"`` (3 gradients) or ``"auto"``
            (central, and forward for the next 9 refreshes whenever the central refresh finds
            the forward difference within 0.5% of it); None: the dtype's default (``"auto"``
            in float32, ``"forward"`` in float64; see :mod:`fisher_optim.differentiation`). Every
            scheme differentiates on the base point's activation pattern
            (:mod:`fisher_optim.activation_pattern`).
        fd_check: in finite-difference mode, also take the exact penalty gradient on the
            first refresh and warn (``FiniteDifferenceWarning``) if the difference is more
            than 1% from it (unsharded models; skipped where double backprop cannot run).
        seed: seed of the label-sampling generator (default: derived from
            ``torch.initial_seed()``, so seeding torch seeds it; nothing is drawn from
            torch's global generator). Under DDP or FSDP2 rank 0's seed is broadcast at the
            first refresh and every rank draws the labels of the whole global batch's rows,
            keeping its own (:mod:`fisher_optim._global_rows`): the labels, and so the update,
            are the same on any number of ranks.
        spike_factor: the spike safeguard (:mod:`fisher_optim.safeguard`): a refreshed
            penalty gradient whose norm exceeds ``spike_factor`` times the median norm of the
            last ``spike_window`` refreshes is scaled down to that bound and used for one step
            only (the next step refreshes again). Below the bound nothing changes. ``None``
            turns it off: the paper's algorithm exactly. It guards reuse, so with ``every=1``
            (every step's gradient is fresh and exact) it never acts.
        spike_window: how many recent refreshes the median is taken over.
        guard_early: also guard the first ``min(5, spike_window)`` refreshes, which have no
            median to be judged by: each is used for one step only (the first steps refresh
            every step). Off by default, so that ordinary runs keep the paper's schedule; turn
            it on when the penalty gradient at initialisation is huge (VGG-11 without
            BatchNorm: see :mod:`fisher_optim.safeguard`).

    Attributes users log: ``penalty_value`` (the last ``Tr(F_B)``, a float, or None),
    ``penalty_grad_norm`` (``||∇ Tr(F_B)||`` of the last refresh, before any spike scaling),
    ``refreshes`` (penalty gradients computed), ``skipped_refreshes`` (dropped as NaN/Inf),
    ``spikes`` (refreshes the safeguard scaled down and used once), ``unjudged_refreshes``
    (with ``guard_early``: the first refreshes, used once),
    ``grad_norm`` (with ``max_grad_norm``: the full gradient's norm before clipping).

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
        penalty: str | Penalty = "fisher",
        output_fn: OutputFn | None = None,
        loss_fn: LossFn | None = None,
        penalty_batch_size: int | None = None,
        fd_step: float | None = None,
        fd_scheme: str | None = None,
        fd_check: bool = True,
        seed: int | None = None,
        target_mask: TargetMask | None = None,
        penalty_scale: str = "batch",
        max_grad_norm: float | None = None,
        likelihood: str | Likelihood = "categorical",
        spike_factor: float | None = 4.0,
        spike_window: int = 20,
        guard_early: bool = False,
        **base_kwargs: Any,
    ) -> None:
        check_weight(alpha, "alpha")
        check_positive_int("every", every)
        check_positive_int_or_none("penalty_batch_size", penalty_batch_size)
        self.every = every
        self._schedule = FiniteDifferenceSchedule(mode, fd_scheme, fd_step)
        self.mode, self.fd_step, self.fd_scheme = mode, fd_step, fd_scheme
        self.penalty = get_penalty(penalty)
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.penalty_batch_size = penalty_batch_size
        check_bool("fd_check", fd_check)
        self.fd_check = fd_check
        check_function_or_none("target_mask", target_mask)
        self.target_mask = target_mask
        self.penalty_scale = check_penalty_scale(penalty_scale, self.penalty)
        self.likelihood = check_likelihood(likelihood, self.penalty)
        self.guard = spike_guard(spike_factor, spike_window, guard_early, every)
        super().__init__(
            model, base_optimizer, {WEIGHT_KEY: float(alpha)}, base_kwargs, seed, max_grad_norm
        )
        _check_group_keys(self.base_optimizer)
        self._sharded = _check_layout(self.module, self.flat_params(), mode, self.penalty)
        if mode == "exact" and hasattr(self.module, "_orig_mod"):
            self.module = self.module._orig_mod  # double backward needs the eager module
        self.penalty_value: float | None = None
        self.refreshes = 0
        self.skipped_refreshes = 0
        self._cached = PenaltyGradientCache()
        #: ``||∇P||`` of the last accepted refresh (before any spike scaling), or None.
        self.penalty_grad_norm: float | None = None

    @property
    def spikes(self) -> int:
        """Refreshes the spike safeguard scaled down and used for one step only."""
        return 0 if self.guard is None else self.guard.spikes

    @property
    def unjudged_refreshes(self) -> int | None:
        """With ``guard_early``: the first refreshes (no median yet), each used for one step
        only (else None)."""
        return self.guard.unjudged if self.guard is not None and self.guard.early else None

    # ----------------------------------------------------------------- step
    def _before_base_step(self) -> None:
        weights = penalty_weights(self.param_groups)
        if self._cached.due(self.step_count, self.every, weights):
            self._refresh()
        elif self.step_count % self.every == 0:  # all weights 0: the old cache goes stale
            self._cached.grads, self._cached.step = None, None
        self._cached.add_to(self.param_groups, weights, self.group_slices)

    @property
    def _cache(self) -> list[Tensor | None] | None:
        """The penalty gradient in use, per parameter (None where frozen), or None."""
        return self._cached.grads

    def _refresh(self) -> None:
        """Compute ``∇_θ Tr(F_B)`` on the current batch and cache it (or drop it if not finite)."""
        params = self.flat_params()
        trainable = _trainable(params, self.step_count)
        group = self.data_parallel_group()
        self.sync_seed(group)
        size = self.penalty_batch_size
        batch = self.cut(
            self.current_batch(), None if size is None else rank_share(size, group), self.output_fn
        )
        objective = PenaltyObjective(
            self.module,
            batch,
            penalty=self.penalty,
            params=[params[i] for i in trainable],
            output_fn=self.output_fn,
            loss_fn=self.loss_fn,
            generator=self.generator(self._batch_device()),
            target_mask=self.target_mask,
            penalty_scale=self.penalty_scale,
            likelihood=self.likelihood,
            group=group,
        )
        scheme = self._schedule.choose(objective.params)
        check = self.fd_check and self.refreshes == 0 and not self._sharded
        with self.own_pass(autocast=self.mode == "exact"):
            result = compute_penalty_gradient(
                objective, self.mode, self.fd_step, scheme, check_exact=check
            )
        # the penalty gradient of the global batch, the same on every rank
        grads, value = result.grads, result.value
        present = [g for g in grads if g is not None]
        penalty_value, check, grad_norm, gap, error = read_back(
            value, present, result.forward_gap, result.exact_error
        )
        self._schedule.judge(scheme, gap, error)
        finite = math.isfinite(penalty_value) and math.isfinite(check)
        self.refreshes += 1
        self._cached.step, self._cached.once = self.step_count, False
        if not finite:
            self.skipped_refreshes += 1
            self._cached.grads = None
            message = (
                f"FisherPenaltySGD: the penalty gradient at step {self.step_count} is not "
                f"finite (penalty value {penalty_value}); it was dropped "
                f"({self.skipped_refreshes} dropped so far)"
            ) + after_dropped(self.flat_params(), "no parameter was changed by it")
            warnings.warn(message, RuntimeWarning, stacklevel=7)
            return
        self.penalty_value = penalty_value
        self.penalty_grad_norm = grad_norm
        scale = 1.0
        if self.guard is not None:
            scale = self.guard.check(grad_norm)
            self._cached.once = not self.guard.reusable
        if scale < 1.0:
            torch._foreach_mul_(present, scale)
            if self.guard.spikes == 1:
                message = self.guard.spike_message(self.step_count, grad_norm, penalty_value)
                warnings.warn(message, RuntimeWarning, stacklevel=7)
        cache: list[Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, grads):
            cache[i] = None if g is None else g.detach()
        self._cached.grads = cache

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "penalty_value": self.penalty_value,
            "refreshes": self.refreshes,
            "skipped_refreshes": self.skipped_refreshes,
            **self._cached.state_dict(self.flat_params()),
            "forward_refreshes": self._schedule.forward_refreshes,
            "penalty_grad_norm": self.penalty_grad_norm,
            "guard": None if self.guard is None else self.guard.state_dict(),
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.penalty_value = extra["penalty_value"]
        self.refreshes = extra["refreshes"]
        self.skipped_refreshes = extra["skipped_refreshes"]
        cache = extra["cache"] if extra.get("has_cache", True) else None
        self._cached.grads = load_per_param(
            cache, self.flat_params(), "penalty cache", lambda p: p.dtype
        )
        self._cached.step = extra.get("cache_step", self._cached.step)
        self._cached.once = extra.get("refresh_next", False)
        self._schedule.forward_refreshes = extra.get("forward_refreshes", 0)
        self.penalty_grad_norm = extra.get("penalty_grad_norm")
        if self.guard is not None and extra.get("guard") is not None:
            self.guard.load_state_dict(extra["guard"])


def read_back(
    value: Tensor, grads: list[Tensor], gap: Tensor | None, error: Tensor | None
) -> list[float]:
    """What a refresh reads on the host, in one sync: the penalty value, the sum of the
    gradient's norms (finite iff every entry is), its norm, and the finite difference's own
    checks (-1: not taken). Read in the penalty's precision, at least float32 (a float64
    model's value is not rounded to float32)."""
    dtype = torch.promote_types(value.dtype, torch.float32)
    norms = global_norms(grads).to(dtype) if grads else value[None].to(dtype)
    unset = value.new_full((), -1.0, dtype=dtype)
    gap, error = (unset if t is None else t.to(dtype) for t in (gap, error))
    return torch.stack([value.to(dtype), norms.sum(), norms.norm(), gap, error]).tolist()


class PenaltyGradientCache:
    """The penalty gradient of the last refresh, reused for ``every`` steps.

    ``grads`` is aligned with the optimizer's parameters (None where frozen), or None (no
    refresh yet, or the last one dropped); ``step`` the step whose batch it was computed on;
    ``once``: it is used for this step only (a spike, or unjudged by the safeguard).
    """

    def __init__(self) -> None:
        self.grads: list[Tensor | None] | None = None
        self.step: int | None = None
        self.once = False

    def due(self, step: int, every: int, weights: list[float]) -> bool:
        """Every ``every`` steps while some weight is positive; and at once when a weight turns
        positive with no cache of the current cycle (it was 0 when the last refresh was due),
        so that a gradient computed more than ``every`` steps ago is never applied."""
        if not any(w > 0 for w in weights):
            return False
        if step % every == 0 or self.once:
            return True
        return self.step is None or step - self.step >= every

    def add_to(
        self,
        param_groups: list[dict[str, Any]],
        weights: list[float],
        group_slices: Callable[[list[Any]], list[list[Any]]],
    ) -> None:
        """``p.grad += weight · cached`` in every param group of positive weight."""
        if self.grads is None:
            return
        for group, weight, cached in zip(param_groups, weights, group_slices(self.grads)):
            if weight == 0:
                continue
            pairs = [
                (p.grad, c)
                for p, c in zip(group["params"], cached)
                if p.grad is not None and c is not None
            ]
            if pairs:
                grads, penalty_grads = zip(*pairs)
                torch._foreach_add_(list(grads), list(penalty_grads), alpha=weight)

    def state_dict(self, params: list[Tensor]) -> dict[str, Any]:
        """The cache with a tensor for every trainable parameter (zeros where there is none,
        which add nothing): ``torch.distributed.checkpoint`` loads into a template of the
        same structure, so a fresh optimizer's state dict must already hold them."""
        grads = self.grads or [None] * len(params)
        return {
            "cache": [
                c if c is not None or not p.requires_grad else torch.zeros_like(p)
                for c, p in zip(grads, params)
            ],
            "has_cache": self.grads is not None,
            "cache_step": self.step,
            "refresh_next": self.once,
        }


def check_weight(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number ≥ 0, else a ``ValueError``/``TypeError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a real number ≥ 0 (the penalty weight), got "
            f"{type(value).__name__} {value!r}; set it to a float such as 0.01"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number ≥ 0 (the penalty weight), got {value!r}; "
            "use 0 to switch the penalty off"
        )
    return float(value)


def penalty_weights(param_groups: list[dict[str, Any]]) -> list[float]:
    """Every group's penalty weight, validated (they may be changed between steps)."""
    return [
        check_weight(g[WEIGHT_KEY], f"param_groups[{i}][{WEIGHT_KEY!r}]")
        for i, g in enumerate(param_groups)
    ]


def _trainable(params: list[Tensor], step: int) -> list[int]:
    """The indices of the trainable ``params``; ValueError if every one is frozen."""
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"FisherPenaltySGD: every parameter of the optimizer is frozen (requires_grad="
            f"False) at step {step}, so the penalty has no gradient; unfreeze some, or set "
            "the penalty weight to 0 while all are frozen"
        )
    return trainable


def _check_layout(module: nn.Module, params: list[Tensor], mode: str, penalty: Penalty) -> bool:
    """Whether ``module`` is FSDP2-sharded; refuse what its sharded passes cannot do, and
    parameters the finite difference cannot resolve."""
    sharded = is_fsdp(module)
    if penalty.wrt_inputs and sharded:
        raise ValueError(INPUT_GRADIENT_UNSUPPORTED)
    if mode == "exact" and sharded:
        check_exact_dtypes([p for p in params if p.requires_grad], compute_dtypes(module))
    if mode == "finite_difference":
        check_fd_dtypes(
            [p for p in params if p.requires_grad], compute_dtypes(module) if sharded else ()
        )
    return sharded


def check_exact_dtypes(params: list[Tensor], compute_dtypes: set[torch.dtype]) -> None:
    """Refuse ``mode="exact"`` on an FSDP2 model whose ``MixedPrecisionPolicy.param_dtype``
    differs from its parameters' dtype: exact mode runs on the gathered parameters with
    FSDP2's hooks off (:class:`~fisher_optim._fsdp.GatheredForward`), so FSDP2's casts to
    ``param_dtype`` do not happen there, while the inputs it captured were cast already."""
    stored = sorted({str(p.dtype) for p in params})
    low = sorted({str(d) for d in compute_dtypes if str(d) not in stored})
    if low:
        raise ValueError(
            f"FisherPenaltySGD: mode='exact' on a model sharded with MixedPrecisionPolicy("
            f"param_dtype={', '.join(low)}) is not supported: exact mode takes its double "
            f"backward on the gathered parameters ({', '.join(stored)}) with FSDP2's hooks "
            "off, so FSDP2's casts to param_dtype do not happen there, while the inputs it "
            "sees were cast already (docs/guides/distributed.md). Shard with "
            "MixedPrecisionPolicy(param_dtype=None) or torch.float32 (reduce_dtype may stay "
            "low); to compute in bfloat16, keep float32 parameters and run the forward under "
            "torch.autocast(device_type, dtype=torch.bfloat16), which exact mode follows"
        )


def _check_group_keys(base: torch.optim.Optimizer) -> None:
    """A param group that sets ``"alpha"`` for a base optimizer without such a
    hyperparameter almost surely meant the penalty weight: say where it lives."""
    if "alpha" in base.defaults:
        return
    for i, group in enumerate(base.param_groups):
        if "alpha" in group:
            raise ValueError(
                f"param_groups[{i}] sets 'alpha', which {type(base).__name__} does not use; "
                f"the penalty weight of a group is set with the key {WEIGHT_KEY!r}"
            )

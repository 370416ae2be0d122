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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._fsdp import (
    EXACT_UNSUPPORTED,
    INPUT_GRADIENT_UNSUPPORTED,
    compute_dtypes,
    global_norms,
    is_fsdp,
)
from fisher_optim._global_rows import rank_share
from fisher_optim._logits import OutputFn
from fisher_optim.differentiation import (
    AUTO_FORWARD_REFRESHES,
    AUTO_TOLERANCE,
    DEFAULT_FD_SCHEME,
    EXACT_CHECK_TOLERANCE,
    FiniteDifferenceWarning,
    check_fd_dtypes,
    check_fd_options,
    check_fd_scheme,
    check_fd_step,
    check_mode,
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
from fisher_optim.safeguard import SpikeGuard
from fisher_optim.targets import TargetMask
from fisher_optim.validate import (
    check_bool,
    check_function_or_none,
    check_positive_int,
    check_positive_int_or_none,
)
from fisher_optim.wrapper import GradientWrapper

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
            (two gradients, ≈2x; see :mod:`fisher_optim.differentiation`).
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
        check_fd_step(fd_step)
        self.every = every
        self.mode = check_mode(mode)
        check_fd_options(self.mode, fd_step=fd_step, fd_scheme=fd_scheme)
        self.penalty = get_penalty(penalty)
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.penalty_batch_size = penalty_batch_size
        self.fd_step = fd_step
        self.fd_scheme = check_fd_scheme(fd_scheme)
        check_bool("fd_check", fd_check)
        self.fd_check = fd_check
        #: ``fd_scheme="auto"``: refreshes left that take the forward difference.
        self._forward_refreshes = 0
        check_function_or_none("target_mask", target_mask)
        self.target_mask = target_mask
        self.penalty_scale = check_penalty_scale(penalty_scale, self.penalty)
        self.likelihood = check_likelihood(likelihood, self.penalty)
        check_bool("guard_early", guard_early)
        if guard_early and spike_factor is None:
            raise ValueError("guard_early=True needs the safeguard: give a spike_factor, not None")
        guard = (
            None
            if spike_factor is None
            else SpikeGuard(spike_factor, spike_window, min(5, spike_window), early=guard_early)
        )
        # with every=1 no gradient is reused: each step's is exact and nothing is guarded
        self.guard = guard if every > 1 else None
        super().__init__(
            model, base_optimizer, {WEIGHT_KEY: float(alpha)}, base_kwargs, seed, max_grad_norm
        )
        _check_group_keys(self.base_optimizer)
        sharded = self._sharded = is_fsdp(self.module)
        if self.mode == "exact" and sharded:
            raise ValueError(EXACT_UNSUPPORTED)
        if self.penalty.wrt_inputs and sharded:
            raise ValueError(INPUT_GRADIENT_UNSUPPORTED)
        if self.mode == "finite_difference":
            check_fd_dtypes(
                [p for p in self.flat_params() if p.requires_grad],
                compute_dtypes(self.module) if sharded else (),
            )
        if mode == "exact" and hasattr(self.module, "_orig_mod"):
            self.module = self.module._orig_mod  # double backward needs the eager module
        self.penalty_value: float | None = None
        self.refreshes = 0
        self.skipped_refreshes = 0
        self._cache: list[Tensor | None] | None = None
        self._cache_step: int | None = None  # the step whose batch the cache was computed on
        self._refresh_next = False  # the cache is used for one step only (spike or unjudged)
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
    def _weights(self) -> list[float]:
        """Every group's penalty weight, validated (they may be changed between steps)."""
        return [
            check_weight(g[WEIGHT_KEY], f"param_groups[{i}][{WEIGHT_KEY!r}]")
            for i, g in enumerate(self.param_groups)
        ]

    def _refresh_due(self, weights: list[float]) -> bool:
        """Every ``every`` steps while some weight is positive; and at once when a weight turns
        positive with no cache of the current cycle (it was 0 when the last refresh was due),
        so that a gradient computed more than ``every`` steps ago is never applied."""
        if not any(w > 0 for w in weights):
            return False
        if self.step_count % self.every == 0 or self._refresh_next:
            return True
        return self._cache_step is None or self.step_count - self._cache_step >= self.every

    def _before_base_step(self) -> None:
        weights = self._weights()
        if self._refresh_due(weights):
            self._refresh()
        elif self.step_count % self.every == 0:  # all weights 0: the old cache goes stale
            self._cache, self._cache_step = None, None
        if self._cache is None:
            return
        for group, weight, cached in zip(
            self.param_groups, weights, self.group_slices(self._cache)
        ):
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

    def _refresh(self) -> None:
        """Compute ``∇_θ Tr(F_B)`` on the current batch and cache it (or drop it if not finite)."""
        params = self.flat_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"FisherPenaltySGD: every parameter of the optimizer is frozen "
                f"(requires_grad=False) at step {self.step_count}, so the penalty has no "
                "gradient; unfreeze some, or set the penalty weight to 0 while all are frozen"
            )
        group = self._data_parallel_group()
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
        scheme = self._refresh_scheme(objective.params)
        check = self.fd_check and self.refreshes == 0 and not self._sharded
        with self.own_pass(autocast=self.mode == "exact"):
            result = compute_penalty_gradient(
                objective, self.mode, self.fd_step, scheme, check_exact=check
            )
        # the penalty gradient of the global batch, the same on every rank
        grads, value = result.grads, result.value
        present = [g for g in grads if g is not None]
        # read in the penalty's precision (at least float32): a float64 model's value is
        # not rounded to float32
        dtype = torch.promote_types(value.dtype, torch.float32)
        norms = global_norms(present).to(dtype) if present else value[None].to(dtype)
        # one host sync per refresh: the penalty value, whether every entry is finite, and
        # the finite difference's own checks (-1: not taken)
        unset = value.new_full((), -1.0, dtype=dtype)
        gap, error = (
            unset if t is None else t.to(dtype) for t in (result.forward_gap, result.exact_error)
        )
        penalty_value, check, grad_norm, gap, error = torch.stack(
            [value.to(dtype), norms.sum(), norms.norm(), gap, error]
        ).tolist()
        self._judge_difference(scheme, gap, error)
        finite = math.isfinite(penalty_value) and math.isfinite(check)
        self.refreshes += 1
        self._cache_step = self.step_count
        self._refresh_next = False
        if not finite:
            self.skipped_refreshes += 1
            self._cache = None
            warnings.warn(self._not_finite_message(penalty_value), RuntimeWarning, stacklevel=7)
            return
        self.penalty_value = penalty_value
        self.penalty_grad_norm = grad_norm
        scale = 1.0
        if self.guard is not None:
            scale = self.guard.check(grad_norm)
            self._refresh_next = not self.guard.reusable
        if scale < 1.0:
            torch._foreach_mul_(present, scale)
            if self.guard.spikes == 1:
                warnings.warn(
                    f"FisherPenaltySGD: the penalty gradient at step {self.step_count} (norm "
                    f"{grad_norm:.4g}, Tr(F_B) {penalty_value:.4g}) is over "
                    f"{self.guard.factor:g}x the median norm of the recent refreshes (a "
                    f"spike): it was scaled by {scale:.3g} and is used "
                    "for this step only. Further spikes are counted in `opt.spikes` without "
                    "a warning (spike_factor=None turns the safeguard off).",
                    RuntimeWarning,
                    stacklevel=7,
                )
        cache: list[Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, grads):
            cache[i] = None if g is None else g.detach()
        self._cache = cache

    def _refresh_scheme(self, params: list[Tensor]) -> str | None:
        """The difference scheme of this refresh (None in exact mode). ``"auto"`` takes the
        central difference, or the forward one while the last central refresh trusted it."""
        if self.mode != "finite_difference":
            return None
        scheme = self.fd_scheme
        if scheme is None and params:
            scheme = DEFAULT_FD_SCHEME.get(params[0].dtype)
        if scheme != "auto":
            return scheme
        if self._forward_refreshes > 0:
            self._forward_refreshes -= 1
            return "forward"
        return "central"

    def _judge_difference(self, scheme: str | None, gap: float, error: float) -> None:
        """Act on a refresh's finite-difference checks (-1: not taken)."""
        if gap >= 0 and (self.fd_scheme or "auto") == "auto":
            self._forward_refreshes = AUTO_FORWARD_REFRESHES if gap <= AUTO_TOLERANCE else 0
        if error > EXACT_CHECK_TOLERANCE or math.isnan(error):
            why = (
                "The forward difference's truncation error at this step may be the cause: "
                "fd_scheme='auto' (the default) or 'central' avoid it"
                if scheme == "forward"
                else "The model may call a piecewise operation that the activation pattern "
                "cannot see (an extension kernel, a torch.ops call), or its forward may depend "
                "on more than the parameters (a power iteration). Use mode='exact', or check "
                "fd_step"
            )
            warnings.warn(
                f"FisherPenaltySGD: on the first refresh the finite-difference penalty "
                f"gradient ({scheme} difference) is {error:.3g} (relative L2) from the exact "
                f"one on the same labels (tolerance {EXACT_CHECK_TOLERANCE:g}). {why}; "
                "fd_check=False silences this check",
                FiniteDifferenceWarning,
                stacklevel=7,
            )

    def _not_finite_message(self, penalty_value: float) -> str:
        """What a dropped, non-finite refresh means: harmless if the loss gradient is finite;
        if not (NaN/Inf in the batch or the loss), the base step will spread it."""
        return (
            f"FisherPenaltySGD: the penalty gradient at step {self.step_count} is not finite "
            f"(penalty value {penalty_value}); it was dropped ({self.skipped_refreshes} dropped "
            "so far)" + self._after_dropped("no parameter was changed by it")
        )

    def _data_parallel_group(self) -> Any | None:
        """The ranks that hold the other slices of the global batch: under FSDP2 those of the
        parameters' device mesh, else the DDP group (:meth:`GradientWrapper._process_group`)."""
        if not self._sharded:
            return self._process_group()
        mesh = next(p.device_mesh for p in self.flat_params() if hasattr(p, "device_mesh"))
        if mesh.ndim == 1:
            return mesh.get_group()
        if mesh.size() != dist.get_world_size():
            raise ValueError(
                f"FisherPenaltySGD: the model is sharded over a {mesh.ndim}-D device mesh of "
                f"{mesh.size()} ranks inside a process group of {dist.get_world_size()}: HSDP "
                "is supported over a mesh of every rank (init_device_mesh(device, (replicas, "
                "shards)))"
            )
        return dist.group.WORLD  # HSDP: every rank holds its own slice of the batch

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "penalty_value": self.penalty_value,
            "refreshes": self.refreshes,
            "skipped_refreshes": self.skipped_refreshes,
            "cache": self._checkpoint_cache(),
            "has_cache": self._cache is not None,
            "cache_step": self._cache_step,
            "refresh_next": self._refresh_next,
            "forward_refreshes": self._forward_refreshes,
            "penalty_grad_norm": self.penalty_grad_norm,
            "guard": None if self.guard is None else self.guard.state_dict(),
        }

    def _checkpoint_cache(self) -> list[Tensor | None]:
        """The cache with a tensor for every trainable parameter (zeros where there is none,
        which add nothing): ``torch.distributed.checkpoint`` loads into a template of the
        same structure, so a fresh optimizer's state dict must already hold them."""
        cache = self._cache or [None] * len(self.flat_params())
        return [
            c if c is not None or not p.requires_grad else torch.zeros_like(p)
            for c, p in zip(cache, self.flat_params())
        ]

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.penalty_value = extra["penalty_value"]
        self.refreshes = extra["refreshes"]
        self.skipped_refreshes = extra["skipped_refreshes"]
        cache = extra["cache"] if extra.get("has_cache", True) else None
        self._cache = self.load_per_param(cache, "penalty cache", lambda p: p.dtype)
        self._cache_step = extra.get("cache_step", self._cache_step)
        self._refresh_next = extra.get("refresh_next", False)
        self._forward_refreshes = extra.get("forward_refreshes", 0)
        self.penalty_grad_norm = extra.get("penalty_grad_norm")
        if self.guard is not None and extra.get("guard") is not None:
            self.guard.load_state_dict(extra["guard"])


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

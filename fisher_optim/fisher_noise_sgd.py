r"""FisherNoiseSGD: large-batch training plus Gaussian noise shaped like the Fisher, as a drop-in.

Wen et al., "An Empirical Study of Large-Batch Stochastic Gradient Descent with Structured
Covariance Noise", AISTATS 2020 (arXiv 1902.08234), Eq. 2 and Algorithm 1:

    θ ← θ − η (∇L_{M_L}(θ) + n),    n = scale · C ξ,    ξ ~ N(0, I),

    scale = sqrt((M_L − M_S) / (M_L · M_S)),

with ``M_L`` the (large) batch the optimizer trains on and ``M_S = small_batch_size`` the small
batch whose gradient noise is imitated: the difference of the covariances of the two
mini-batch gradients is ``scale² · Σ`` when the per-example gradients have covariance ``Σ``,
and the Fisher ``F`` stands in for ``Σ``. ``n`` is added to ``p.grad`` before the base
optimizer's step (``n`` has zero mean, so the sign convention does not matter). ``C``:

* ``covariance="diagonal"`` (their Algorithm 1): ``C = sqrt(diag F)``, so ``Cov(n) = scale² ·
  diag F``, with ``diag F = (1/M) Σ_i g_i ⊙ g_i`` from per-example gradients ``g_i``;
* ``covariance="full"``: ``Cov(n) = scale² · F_B``, ``F_B = (1/M) Σ_i g_i g_i^T`` of the batch,
  sampled without forming it as ``n = scale · (1/sqrt(M)) Σ_i z_i g_i``, ``z_i ~ N(0, 1)`` i.i.d.
  (one extra forward and backward per step; ``Cov(n) = scale² F_B`` exactly);
* ``covariance="trace"`` ("Fisher trace"): isotropic, ``Cov(n) = scale² · (Tr F / d) · I``,
  ``d`` the number of trainable parameter entries.

``g_i = ∇_θ ℓ_i`` with ``ℓ_i = −log p_θ(y_i | x_i)`` under the ``likelihood`` (the
cross-entropy on the logits by default; ``"bernoulli"`` for multi-label, ``"gaussian"`` for
regression: :mod:`fisher_optim.likelihoods`). With ``fisher="true"`` the labels
``y_i ~ p_θ(y|x_i)`` are sampled from the model (the Fisher proper, no targets needed); with
``fisher="empirical"`` they are the true targets (the paper's empirical Fisher; call
:meth:`~fisher_optim.wrapper.GradientWrapper.set_targets` before each step). Rows without a
target (class index ``-100``, ``ignore_index`` of ``F.cross_entropy`` and of Hugging Face
losses; NaN for the other likelihoods) are excluded alike by every covariance mode: ``ℓ_i`` is
the mean over example ``i``'s rows that have a target, and an example without any has
``g_i = 0``. The per-example math lives in :mod:`fisher_optim.curvature.gradient_moment`; this
class schedules it, keeps its state and adds the noise.

Conventions of :class:`FisherNoiseSGD`:

* ``M_L`` is the number of examples: the first dimension of the model's first tensor
  input (times the world size under DDP and FSDP2, where the gradient is the mean over
  ranks; local batches are assumed equal in size). For a sequence model with logits
  ``[B, T, V]`` an example is a sequence: ``ℓ_i`` is the mean of ``ℓ`` over its
  ``T`` positions (so that the batch gradient is the mean of the ``g_i``) and the
  labels are sampled per position.
* BatchNorm: per-example gradients are undefined with batch statistics, so
  ``"diagonal"``/``"trace"`` evaluate the model in eval mode (running statistics, as the
  FP paper does for ``Tr F``; dropout off too). ``"full"`` runs the model as training
  does (batch statistics, dropout on), so its ``g_i = ∂ℓ_i/∂θ`` include the coupling of
  the examples through the batch statistics. Running statistics are never updated
  (bitwise) and torch's global random state is restored after the pass.
* The estimate runs in full precision (outside autocast).
* DDP and FSDP2: the estimate is that of the global batch, ``diag F = Σ_i g_i ⊙ g_i / M``
  over every rank's examples: each rank sums its own and one all-reduce adds the sums and
  the example counts (per refresh); ``"full"`` all-reduces ``Σ_i z_i g_i`` (one
  all-reduce of the parameters' size per step). The seed is broadcast from rank 0 at the
  first step. The sampled labels (and ``"full"``'s ``z_i``) are functions of the seed, the refresh and
  the example's row in the global batch (the ranks' rows laid end to end in rank order,
  :mod:`fisher_optim._global_rows`: one all-gather of the row counts per draw), and ``ξ``
  is drawn over all the parameters' entries on every rank, so the noise ``n``, and the
  update, are those of one process on the whole batch, on any number of ranks.
* FSDP2 (``fully_shard``): each refresh gathers the full parameters
  (:func:`fisher_optim._fsdp.gathered_parameters`; held on every rank for the refresh, as
  exact mode holds them) and takes the rank's per-example gradients on them; each rank
  keeps its shard of ``diag F``. Every step draws the full-size ``ξ`` on each rank (a
  transient buffer the size of the full parameters) and adds its shard of ``n`` to its
  shard of the gradient; ``||n||`` costs one all-reduce of a scalar. ``"full"`` gathers
  the parameters every step (its refresh) and all-reduces the full-size ``Σ_i z_i g_i``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._data_parallel import sum_over_ranks
from fisher_optim._fsdp import (
    ShardedPasses,
    gathered_subset,
    is_sharded,
    local_part,
    local_shard,
    shard_like,
)
from fisher_optim._global_rows import GlobalRows, rank_share
from fisher_optim._logits import OutputFn
from fisher_optim._modules import frozen_batchnorm_stats
from fisher_optim.batch import Batch
from fisher_optim.curvature.gradient_moment import (
    accumulation_dtype,
    example_grad_draws,
    sum_sq_example_grads,
)
from fisher_optim.likelihoods import Likelihood, get_likelihood
from fisher_optim.targets import TargetMask
from fisher_optim.validate import (
    check_choice,
    check_function_or_none,
    check_positive_int,
    check_positive_int_or_none,
)
from fisher_optim.wrapper import GradientWrapper, after_dropped, input_layout, load_per_param

COVARIANCES = ("diagonal", "full", "trace")
FISHERS = ("true", "empirical")


class FisherNoiseSGD(GradientWrapper):
    r"""Wrap a torch optimizer so that every step adds Fisher-shaped Gaussian noise to the gradient.

    Replace ``torch.optim.SGD(model.parameters(), **kw)`` by ``FisherNoiseSGD(model, **kw,
    small_batch_size=128)`` and keep the large-batch training loop as it is: ``step()`` adds
    ``n ~ N(0, scale² C C^T)`` to ``p.grad``, ``scale = sqrt((M_L − M_S)/(M_L M_S))`` (Wen et
    al., AISTATS 2020, Algorithm 1; see the module docstring for ``C`` and the conventions:
    examples, BatchNorm, precision, DDP).

    Args:
        model: the model being trained (an ``nn.Module``; a DDP-wrapped or compiled model is
            fine; an FSDP2 ``fully_shard``-ed one too).
            A forward pre-hook remembers its latest training-mode input. How the
            per-example gradients are formed: :mod:`fisher_optim.curvature.gradient_moment`.
        base_optimizer: a ``torch.optim.Optimizer`` class, built on ``model.parameters()`` (or
            on ``params=`` in ``base_kwargs``) with ``base_kwargs``; or an optimizer instance,
            wrapped as it is.
        small_batch_size: ``M_S ≥ 1``, the batch size whose gradient noise is imitated. Stored
            in every param group as ``"small_batch_size"`` (so it can differ per group or be
            scheduled). ``step()`` raises ``ValueError`` unless ``M_S < M_L``.
        covariance: ``"diagonal"``, ``"full"`` or ``"trace"`` (see the module docstring).
        fisher: ``"true"`` (labels sampled from the model) or ``"empirical"`` (true targets,
            given by :meth:`set_targets` before each ``step()``).
        every: re-estimate ``diag F`` (or ``Tr F``) every ``every`` steps and reuse it in
            between; a fresh ``ξ`` is drawn every step. ``"full"`` needs the current batch's
            per-example gradients for every draw, so it accepts only ``every=1``.
        estimate_batch_size: estimate ``F`` on N examples of the (global) batch only (the
            scale still uses the whole batch's ``M_L``): the first N on one process; under
            DDP or FSDP2 the first N/R of each of the R ranks' batches (one more on the
            first N mod R ranks), as ``FisherPenaltySGD``'s ``penalty_batch_size``. Cut by
            the one rule of :mod:`fisher_optim.batch` and checked once per input layout.
        output_fn: maps the model's output to logits ``[..., C]`` (not needed for outputs
            that carry ``.logits``, as Hugging Face models' do).
        likelihood: ``p_θ(y|z)`` of a row of outputs: ``"categorical"`` (softmax, the
            default), ``"bernoulli"`` (independent binary labels: multi-label) or
            ``"gaussian"`` (regression), or a :class:`~fisher_optim.likelihoods.Likelihood`
            such as ``Gaussian(sigma=0.5)``. With ``fisher="empirical"`` the targets are
            class indices (categorical) or one value per output (the others).
        target_mask: which rows of the logits have a target, for models other than Hugging
            Face ones (automatic there: padding, ``-100`` labels, the causal shift); a function
            called like the model returning a boolean tensor shaped like the logits without
            their class dimension (see :mod:`fisher_optim.targets`). With ``fisher="true"``,
            rows without a target get no sampled label (as a ``-100`` target); with
            ``"empirical"`` the targets' own ``-100`` entries decide.
        seed: seed of the noise generator (default: derived from ``torch.initial_seed()``;
            nothing is drawn from torch's global generator).

    Attributes users log: ``noise_norm`` (``||n||`` of the last step, a float, or None),
    ``fisher_trace`` (the last ``Tr F`` estimate; for ``"full"`` the single-draw unbiased
    estimate ``||Σ_i z_i g_i||²/M``), ``refreshes`` (estimates computed), ``skipped_refreshes``
    (estimates dropped as NaN/Inf: no noise is added until the next good one).

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> opt = FisherNoiseSGD(model, lr=0.1, momentum=0.9, small_batch_size=2, every=2, seed=0)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     x, y = torch.randn(8, 4), torch.randint(3, (8,))
    ...     nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step()
    >>> opt.refreshes, opt.fisher_trace > 0, opt.noise_norm > 0
    (2, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
        *,
        small_batch_size: int,
        covariance: str = "diagonal",
        fisher: str = "true",
        every: int = 1,
        estimate_batch_size: int | None = None,
        output_fn: OutputFn | None = None,
        seed: int | None = None,
        target_mask: TargetMask | None = None,
        likelihood: str | Likelihood = "categorical",
        **base_kwargs: Any,
    ) -> None:
        _check_arguments(small_batch_size, covariance, fisher, every, estimate_batch_size)
        check_function_or_none("target_mask", target_mask)
        self.covariance = covariance
        self.fisher = fisher
        self.likelihood = get_likelihood(likelihood)
        self.every = every
        self.estimate_batch_size = estimate_batch_size
        self.output_fn = output_fn
        self.target_mask = target_mask
        super().__init__(
            model, base_optimizer, {"small_batch_size": int(small_batch_size)}, base_kwargs, seed
        )
        self._noise_norm: Tensor | float | None = None
        self.fisher_trace: float | None = None
        self.refreshes = 0
        self.skipped_refreshes = 0
        #: ``diag F`` per parameter (aligned with ``flat_params()``, None where frozen) or,
        #: for ``"trace"``, ``Tr F / d`` broadcast as a 0-dim tensor per parameter.
        self._cache: list[Tensor | None] | None = None
        #: per input layout, the layers the rules covered in its checked estimate
        self._covered_layers: dict[tuple[Any, ...], frozenset[nn.Module]] = {}
        self._label_draws = 0

    @property
    def noise_norm(self) -> float | None:
        """``||n||`` of the last step's noise (None before the first), a float. It stays on
        the device until asked for, so that a step does not wait for the device."""
        if isinstance(self._noise_norm, Tensor):
            self._noise_norm = float(self._noise_norm)
        return self._noise_norm

    # ----------------------------------------------------------------- step
    def _before_base_step(self) -> None:
        batch = self.current_batch()
        self._scales(batch)  # raises early if small_batch_size ≥ M_L
        self.sync_seed(self.data_parallel_group())
        if self.covariance != "full" and self.step_count % self.every == 0:
            self._refresh(batch)
        noise = self._sample_noise(batch)
        # kept on the device and read when asked for: no host sync per step
        self._noise_norm = None if noise is None else add_noise(self.flat_params(), noise)

    def _scales(self, batch: Batch) -> list[float]:
        """``sqrt((M_L − M_S)/(M_L · M_S))`` per param group."""
        m_large = batch.num_examples() * self._world()
        return [
            noise_scale(m_large, group["small_batch_size"], f"param group {i}", self.step_count)
            for i, group in enumerate(self.param_groups)
        ]

    def _sample_noise(self, batch: Batch, draws: int | None = None) -> list[Tensor | None] | None:
        """The noise ``n`` per parameter (aligned with ``flat_params()``, None where frozen).

        ``draws=K`` returns ``K`` independent draws stacked in a leading dimension (for
        ``"full"``: fresh labels and ``z`` per draw on the same batch), without touching
        ``.grad``. None when there is no (finite) estimate.
        """
        scales = self._scales(batch)
        if self.covariance == "full":
            directions = self._full_directions(batch, draws)
        else:
            directions = None if self._cache is None else self._cached_directions(draws)
        if directions is None:
            return None
        out: list[Tensor | None] = []
        for scale, group_dirs in zip(scales, self.group_slices(directions)):
            out.extend(None if d is None else d * scale for d in group_dirs)
        return out

    # ----------------------------------------------------------------- diagonal / trace
    def _refresh(self, batch: Batch) -> None:
        """Estimate ``diag F`` on the global batch (per-example gradients) and cache it (each
        rank its shard under FSDP2), or drop it."""
        params = self.flat_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        sums, count = self._estimate_sums(batch, [params[i] for i in trainable])
        *sums, count = sum_over_ranks([*sums, count], self.data_parallel_group())
        diag = [s / count for s in sums]
        trace = torch.stack([d.double().sum() for d in diag]).sum()
        value = float(trace)  # the one host sync of an estimate
        if not self._finite(value, f"Fisher estimate ... (Tr F = {value})", 8):
            self._cache = None  # no noise until the next good estimate
            return
        self.fisher_trace = value
        if is_sharded(params) and self.covariance == "diagonal":  # each rank keeps its shard
            diag = [shard_like(d, params[i], None) for i, d in zip(trainable, diag)]
        self._cache = noise_variances(params, trainable, diag, trace, self.covariance)

    def _estimate_sums(self, batch: Batch, params: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``Σ_i g_i ⊙ g_i`` over this rank's examples for ``params`` (full-size under
        FSDP2) and their number, a 0-dim tensor
        (:func:`fisher_optim.curvature.gradient_moment.sum_sq_example_grads`), in eval mode;
        the layers the rules take are checked once per input layout and trusted after."""
        module = getattr(self.module, "_orig_mod", self.module)  # torch.compile: eager module
        size, group = self.estimate_batch_size, self.data_parallel_group()
        with self.measuring_pass(), gathered_subset(module, params, "FisherNoiseSGD") as params:
            # checked once per input layout: the examples are independent, and cut as held
            batch = self.cut(
                batch, None if size is None else rank_share(size, group), self.output_fn,
                per_example=True,
            )  # fmt: skip
            n = batch.num_examples()
            targets = self._target_rows(batch, n)
            layout = input_layout(batch)
            covered: set[nn.Module] = set()
            sums = sum_sq_example_grads(
                module, batch, params, self.likelihood,
                targets=targets,
                generator=self._label_generator(params[0].device) if targets is None else None,
                output_fn=self.output_fn, target_mask=self.target_mask,
                trusted=self._covered_layers.get(layout), covered=covered,
            )  # fmt: skip
            self._covered_layers.setdefault(layout, frozenset(covered))
        return sums, sums[0].new_tensor(float(n))

    def _cached_directions(self, draws: int | None) -> list[Tensor | None]:
        """``sqrt(diag F) ⊙ ξ`` (or ``sqrt(Tr F / d) ξ``), one ξ over all trainable entries
        (drawn full-size on every rank; under FSDP2 each rank keeps its shard's part)."""
        assert self._cache is not None
        params = [p for p, c in zip(self.flat_params(), self._cache) if c is not None]
        it = zip(params, standard_normal_like(params, draws, self.generator(params[0].device)))
        return [
            None if c is None else local_part(*next(it)) * local_shard(c).sqrt()
            for c in self._cache
        ]

    # ----------------------------------------------------------------- full
    def _full_directions(self, batch: Batch, draws: int | None) -> list[Tensor | None] | None:
        """``v = (1/sqrt(M)) Σ_i z_i g_i`` per parameter, ``Cov(v) = (1/M) Σ_i g_i g_i^T``
        (:func:`fisher_optim.curvature.gradient_moment.example_grad_draws`): one forward
        (batch statistics, running statistics frozen) and one backward for all ``draws``;
        under FSDP2 on the gathered parameters, each rank keeping its shard's part."""
        params = self.flat_params()
        wrt = [p for p in params if p.requires_grad]
        size, group = self.estimate_batch_size, self.data_parallel_group()
        with gathered_subset(self.module, wrt, "FisherNoiseSGD") as full:
            batch = self.cut(
                batch, None if size is None else rank_share(size, group), self.output_fn
            )
            targets = self._target_rows(batch, batch.num_examples())
            with self.own_pass(autocast=False), frozen_batchnorm_stats(self.module):
                v = example_grad_draws(
                    self.module, batch, full, self.likelihood,
                    targets=targets, generator=self._label_generator(wrt[0].device),
                    draws=draws, output_fn=self.output_fn, target_mask=self.target_mask,
                )  # fmt: skip
        world = self._world()
        if world > 1:  # (1/sqrt(W M)) Σ over all ranks' examples
            v = [t * math.sqrt(world) for t in self.all_reduce_mean(v)]
        total = float(torch.stack([t.double().pow(2).sum() for t in v]).sum())  # the one sync
        if not self._finite(total, "Fisher noise ...", 9, "no parameter was changed by it"):
            return None
        self.fisher_trace = total / (1 if draws is None else draws)
        it = iter(v)
        return [local_part(p, next(it).detach()) if p.requires_grad else None for p in params]

    def _finite(
        self, value: float, what: str, stacklevel: int,
        effect: str = "no noise is added until the next estimate",
    ) -> bool:  # fmt: skip
        """Count a refresh; warn and count it dropped when ``value`` is NaN/Inf (``what``: the
        message's subject, its ``...`` standing for "at step N is not finite")."""
        self.refreshes += 1
        if math.isfinite(value):
            return True
        self.skipped_refreshes += 1
        what = what.replace("...", f"at step {self.step_count} is not finite")
        warnings.warn(
            f"FisherNoiseSGD: the {what}; it was dropped ({self.skipped_refreshes} dropped so "
            "far)" + after_dropped(self.flat_params(), effect),
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return False

    # ----------------------------------------------------------------- helpers
    def _target_rows(self, batch: Batch, n: int) -> Tensor | None:
        """The targets as ``[n, ...]`` for ``fisher="empirical"``, else None."""
        if self.fisher != "empirical":
            return None
        return empirical_targets(batch, n, self._batch_device())

    def _world(self) -> int:
        group = self.data_parallel_group()
        return 1 if group is None else dist.get_world_size(group)

    def _label_generator(self, device: torch.device) -> GlobalRows:
        """A fresh generator for labels and ``z``, seeded by (seed, draw counter) alike on
        every rank (no state beyond the counter), placed by the global batch's rows."""
        self._label_draws += 1
        mixed = mixed_seed(self.seed, self._label_draws)
        return GlobalRows(torch.Generator(device).manual_seed(mixed), self.data_parallel_group())

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "noise_norm": self.noise_norm,
            "fisher_trace": self.fisher_trace,
            "refreshes": self.refreshes,
            "skipped_refreshes": self.skipped_refreshes,
            "local_draws": self._label_draws,
            # zeros before the first estimate: DCP loads into a template of this structure
            "cache": self._cache or cache_template(self.flat_params(), self.covariance),
            "has_cache": self._cache is not None,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._noise_norm = extra["noise_norm"]
        self.fisher_trace = extra["fisher_trace"]
        self.refreshes = extra["refreshes"]
        self.skipped_refreshes = extra["skipped_refreshes"]
        self._label_draws = extra["local_draws"]
        self._cache = load_per_param(
            extra["cache"] if extra.get("has_cache", True) else None,
            self.flat_params(),
            "Fisher estimate",
            lambda p: accumulation_dtype(p.dtype),
        )


def _check_arguments(
    small_batch_size: Any,
    covariance: Any,
    fisher: Any,
    every: Any,
    estimate_batch_size: Any,
) -> None:
    """``FisherNoiseSGD``'s own arguments, each refused with a message naming it."""
    check_positive_int("small_batch_size", small_batch_size)
    check_choice("covariance", covariance, COVARIANCES)
    check_choice("fisher", fisher, FISHERS)
    check_positive_int("every", every)
    if covariance == "full" and every != 1:
        raise ValueError(
            "covariance='full' draws every noise vector from the current batch's per-example "
            f"gradients, so there is nothing to reuse between steps: use every=1 (got {every})"
        )
    check_positive_int_or_none("estimate_batch_size", estimate_batch_size)


def cache_template(params: list[Tensor], covariance: str) -> list[Tensor | None] | None:
    """Zeros shaped as the cache of an estimate for ``params`` (None for ``"full"``, which
    keeps none)."""
    if covariance == "full":
        return None
    return [
        None
        if not p.requires_grad
        else torch.zeros_like(p, dtype=accumulation_dtype(p.dtype))
        if covariance == "diagonal"
        else torch.zeros((), dtype=accumulation_dtype(p.dtype), device=local_shard(p).device)
        for p in params
    ]


def add_noise(params: list[Tensor], noise: list[Tensor | None]) -> Tensor | None:
    """``p.grad += n`` for each parameter with a gradient and a noise (under FSDP2, ``n``
    this rank's part, added to the gradient's local shard); ``||n||`` over them (a 0-dim
    float64 tensor, on the device; under FSDP2 the shards' squares summed over the ranks),
    or None if there was none."""
    total = None
    for p, n in zip(params, noise):
        if n is None or p.grad is None:
            continue
        grad = local_shard(p.grad)
        grad.add_(n.to(grad.dtype))
        sq = n.double().pow(2).sum()
        total = sq if total is None else total + sq
    trainable = [p for p in params if p.requires_grad]
    if is_sharded(trainable):  # every rank takes part, with or without a gradient
        zero = torch.zeros((), dtype=torch.float64, device=local_shard(trainable[0]).device)
        total = ShardedPasses(trainable).total(zero if total is None else total)
    return None if total is None else total.sqrt()


def noise_variances(
    params: list[Tensor], trainable: list[int], diag: list[Tensor], trace: Tensor, covariance: str
) -> list[Tensor | None]:
    """The variances the noise is drawn with, aligned with ``params`` (None where frozen):
    ``diag F`` of each of the ``trainable`` ones, or for ``"trace"`` ``Tr F / d`` (``d``
    their number of entries) as a 0-dim tensor each."""
    out: list[Tensor | None] = [None] * len(params)
    numel = sum(params[i].numel() for i in trainable)
    for i, d in zip(trainable, diag):
        out[i] = d.detach() if covariance == "diagonal" else (trace / numel).to(d.dtype)
    return out


def standard_normal_like(
    params: list[Tensor], draws: int | None, generator: torch.Generator
) -> list[Tensor]:
    """``ξ ~ N(0, I)`` shaped like ``params`` (``draws`` of them stacked in a leading
    dimension when given): one flat draw from ``generator``, so that the stream is the same on
    every rank and every device layout."""
    device = params[0].device
    dtype = accumulation_dtype(*(p.dtype for p in params))
    sizes = [p.numel() for p in params]
    lead = () if draws is None else (draws,)
    flat = torch.randn((*lead, sum(sizes)), generator=generator, device=device, dtype=dtype)
    return [
        x.reshape(*lead, *p.shape).to(p.device) for x, p in zip(flat.split(sizes, dim=-1), params)
    ]


def empirical_targets(batch: Batch, n: int, device: torch.device) -> Tensor:
    """The targets given by ``set_targets`` as ``[n, ...]`` on ``device``, or ValueError."""
    if batch.targets is None:
        raise ValueError(
            "fisher='empirical' uses the true targets: call opt.set_targets(y) before every "
            "opt.step() (or use fisher='true', which samples labels from the model)"
        )
    if batch.targets.numel() % n:
        raise ValueError(
            f"the targets have {batch.targets.numel()} entries, not a multiple of the "
            f"{n} examples of the batch"
        )
    return batch.targets.reshape(n, -1).to(device)


def noise_scale(m_large: int, m_small: int, where: str, step: int) -> float:
    """``sqrt((M_L − M_S)/(M_L · M_S))``, or ValueError unless ``M_S < M_L``.

    >>> round(noise_scale(8, 2, "param group 0", 0) ** 2, 12)
    0.375
    """
    if m_small >= m_large:
        raise ValueError(
            f"FisherNoiseSGD: small_batch_size={m_small} ({where}) must be smaller than the "
            f"training batch M_L={m_large} seen at step {step}: the noise imitates a smaller "
            "batch than the one trained on. Lower small_batch_size or train with larger "
            "batches (drop_last=True avoids a small final batch)."
        )
    return math.sqrt((m_large - m_small) / (m_large * m_small))


def mixed_seed(seed: int, count: int) -> int:
    """A seed in ``[0, 2^62)`` that differs with each of ``seed`` and ``count``."""
    return (seed * 0x9E3779B97F4A7C15 ^ 0xBF58476D1CE4E5B9 ^ count * 0x94D049BB133111EB) % (2**62)

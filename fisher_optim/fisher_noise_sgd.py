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

``g_i = ∇_θ ℓ_i`` with ``ℓ_i = −log p_θ(y_i | x_i)`` (cross-entropy on the logits). With
``fisher="true"`` the labels ``y_i ~ p_θ(y|x_i)`` are sampled from the model (the Fisher proper,
no targets needed); with ``fisher="empirical"`` they are the true targets (the paper's empirical
Fisher; call :meth:`~fisher_optim.wrapper.GradientWrapper.set_targets` before each step).
Targets equal to ``-100`` (``ignore_index`` of ``F.cross_entropy`` and of Hugging Face losses)
are excluded alike by every covariance mode: ``ℓ_i`` is the mean cross-entropy over example
``i``'s rows that have a target, and an example without any has ``g_i = 0``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._fsdp import is_fsdp
from fisher_optim._logits import (
    OutputFn,
    check_cross_entropy_outputs,
    pick_logits,
    sample_labels,
)
from fisher_optim._modules import frozen_batchnorm_stats
from fisher_optim._targets import IGNORE_INDEX, TargetMask, drop_untargeted, target_rows
from fisher_optim.batch import Batch
from fisher_optim.curvature import examples
from fisher_optim.curvature.examples import example_grads
from fisher_optim.curvature.ghost import ghost_backward
from fisher_optim.curvature.layers import LayerRule, trained
from fisher_optim.validate import (
    check_choice,
    check_function_or_none,
    check_positive_int,
    check_positive_int_or_none,
)
from fisher_optim.wrapper import GradientWrapper, input_layout

COVARIANCES = ("diagonal", "full", "trace")
FISHERS = ("true", "empirical")

#: Examples per ``vmap`` call of the per-example gradients (bounds memory).
PER_EXAMPLE_CHUNK = 64


class FisherNoiseSGD(GradientWrapper):
    r"""Wrap a torch optimizer so that every step adds Fisher-shaped Gaussian noise to the gradient.

    Replace ``torch.optim.SGD(model.parameters(), **kw)`` by ``FisherNoiseSGD(model, **kw,
    small_batch_size=128)`` and keep the large-batch training loop as it is: ``step()`` adds
    ``n ~ N(0, scale² C C^T)`` to ``p.grad``, ``scale = sqrt((M_L − M_S)/(M_L M_S))`` (Wen et
    al., AISTATS 2020, Algorithm 1; see the module docstring for ``C``).

    Args:
        model: the model being trained (an ``nn.Module``; a DDP-wrapped or compiled model is
            fine). A forward pre-hook remembers its latest training-mode input. ``"diagonal"``/
            ``"trace"`` take ``Σ_i g_i ⊙ g_i`` of the layers with a rule (Linear, Conv, Embedding,
            the norms: :mod:`fisher_optim.curvature.layers`) from one batched backward; the
            other parameters' per-example gradients use ``torch.func.vmap`` (or, for a model
            vmap cannot run, one example at a time).
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
        estimate_batch_size: estimate ``F`` on the first N examples of the batch only (the
            scale still uses the whole batch's ``M_L``), cut by the one rule of
            :mod:`fisher_optim.batch` and checked once per input layout.
        output_fn: maps the model's output to logits ``[..., C]`` (not needed for outputs
            that carry ``.logits``, as Hugging Face models' do).
        target_mask: which rows of the logits have a target, for models other than Hugging
            Face ones (automatic there: padding, ``-100`` labels, the causal shift); a function
            called like the model returning a boolean tensor shaped like the logits without
            their class dimension (see :mod:`fisher_optim._targets`). With ``fisher="true"``,
            rows without a target get no sampled label (as a ``-100`` target); with
            ``"empirical"`` the targets' own ``-100`` entries decide.
        seed: seed of the noise generator (default: derived from ``torch.initial_seed()``;
            nothing is drawn from torch's global generator).

    Conventions:
        * ``M_L`` is the number of examples: the first dimension of the model's first tensor
          input (times the world size under DDP, where the gradient is the mean over ranks;
          local batches are assumed equal in size). For a sequence model with logits
          ``[B, T, V]`` an example is a sequence: ``ℓ_i`` is the mean cross-entropy over its
          ``T`` positions (so that the batch gradient is the mean of the ``g_i``) and the
          labels are sampled per position.
        * BatchNorm: per-example gradients are undefined with batch statistics, so
          ``"diagonal"``/``"trace"`` evaluate the model in eval mode (running statistics, as the
          FP paper does for ``Tr F``; dropout off too). ``"full"`` runs the model as training
          does (batch statistics, dropout on), so its ``g_i = ∂ℓ_i/∂θ`` include the coupling of
          the examples through the batch statistics. Running statistics are never updated
          (bitwise) and torch's global random state is restored after the pass.
        * The estimate runs in full precision (outside autocast).
        * DDP: ``diag F`` / ``Tr F`` are averaged over ranks (one all-reduce per refresh);
          ``"full"`` all-reduces ``Σ_i z_i g_i`` (one all-reduce per step) with ``z_i``
          independent across ranks. The seed is broadcast from rank 0 at the first step, so the
          noise ``n`` is identical on every rank and the replicas stay in sync.

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
        **base_kwargs: Any,
    ) -> None:
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
        self.covariance = covariance
        self.fisher = fisher
        self.every = every
        self.estimate_batch_size = estimate_batch_size
        self.output_fn = output_fn
        check_function_or_none("target_mask", target_mask)
        self.target_mask = target_mask
        if is_fsdp(model):
            raise ValueError(
                "FisherNoiseSGD does not support FSDP2-sharded models (its per-example "
                "gradients need the unsharded parameters); use DistributedDataParallel"
            )
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
        self._local_draws = 0
        self._seed_synced = False

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
        if self._process_group() is not None and not self._seed_synced:
            self._sync_seed()
        if self.covariance != "full" and self.step_count % self.every == 0:
            self._refresh(batch)
        noise = self._sample_noise(batch)
        if noise is None:
            self._noise_norm = None
            return
        total = None
        for p, n in zip(self.flat_params(), noise):
            if n is None or p.grad is None:
                continue
            p.grad.add_(n.to(p.grad.dtype))
            sq = n.double().pow(2).sum()
            total = sq if total is None else total + sq
        # kept on the device and read when asked for: no host sync per step
        self._noise_norm = None if total is None else total.sqrt()

    def _scales(self, batch: Batch) -> list[float]:
        """``sqrt((M_L − M_S)/(M_L · M_S))`` per param group."""
        m_large = batch.num_examples() * self._world()[0]
        scales = []
        for i, group in enumerate(self.param_groups):
            m_small = group["small_batch_size"]
            if m_small >= m_large:
                raise ValueError(
                    f"FisherNoiseSGD: small_batch_size={m_small} (param group {i}) must be smaller "
                    f"than the training batch M_L={m_large} seen at step {self.step_count}: the "
                    "noise imitates a smaller batch than the one trained on. Lower "
                    "small_batch_size or train with larger batches (drop_last=True avoids a small "
                    "final batch)."
                )
            scales.append(math.sqrt((m_large - m_small) / (m_large * m_small)))
        return scales

    def _sample_noise(
        self, batch: Batch, draws: int | None = None
    ) -> list[Tensor | None] | None:
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
        """Estimate ``diag F`` on the batch (per-example gradients) and cache it, or drop it."""
        params = self.flat_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        diag = self._estimate_diag(batch, [params[i] for i in trainable])
        diag = self.all_reduce_mean(diag)
        trace = torch.stack([d.double().sum() for d in diag]).sum()
        self.refreshes += 1
        value = float(trace)  # the one host sync of an estimate
        if not math.isfinite(value):
            self.skipped_refreshes += 1
            self._cache = None
            warnings.warn(
                f"FisherNoiseSGD: the Fisher estimate at step {self.step_count} is not finite "
                f"(Tr F = {value}); it was dropped and no noise is added until the next "
                f"estimate ({self.skipped_refreshes} dropped so far). Training continues.",
                RuntimeWarning,
                stacklevel=7,
            )
            return
        self.fisher_trace = value
        cache: list[Tensor | None] = [None] * len(params)
        if self.covariance == "diagonal":
            for i, d in zip(trainable, diag):
                cache[i] = d.detach()
        else:
            numel = sum(params[i].numel() for i in trainable)
            for i, d in zip(trainable, diag):
                cache[i] = (trace / numel).to(d.dtype)
        self._cache = cache

    def _estimate_diag(self, batch: Batch, params: list[Tensor]) -> list[Tensor]:
        """``diag F = (1/M) Σ_i g_i ⊙ g_i`` for ``params``.

        One batched forward and backward (:func:`fisher_optim.curvature.ghost.ghost_backward`)
        hands each covered layer's input ``a`` and output gradient ``g`` to its rule, whose
        :meth:`~fisher_optim.curvature.layers.LayerRule.sq_grads` gives ``Σ_i g_i ⊙ g_i`` of
        the layer's parameters (for a ``Linear`` on flat inputs ``(g ⊙ g)^T (a ⊙ a)``, no
        per-example tensor); the parameters no rule covers (tied, custom layers) take chunked
        per-example gradients (:func:`fisher_optim.curvature.examples.example_grads`:
        ``vmap(grad)``, or a loop). ``ℓ_i`` is the mean cross-entropy over example ``i``'s rows
        with a label (:func:`example_cross_entropy`); sampled labels are drawn per chunk of
        :data:`PER_EXAMPLE_CHUNK` examples from the batch's logits.
        """
        module = getattr(self.module, "_orig_mod", self.module)  # torch.compile: eager module
        _check_params_of(module, params)
        with self.measuring_pass():
            # checked once per input layout: the examples are independent, and cut as held
            batch = self.cut(batch, self.estimate_batch_size, self.output_fn, per_example=True)
            n = batch.num_examples()
            targets = self._target_rows(batch, n)
            index = {id(p): k for k, p in enumerate(params)}
            sums = [torch.zeros_like(p, dtype=_acc_dtype(p.dtype)) for p in params]
            generator = self._local_generator(params[0].device) if targets is None else None
            shapes: list[torch.Size] = []  # of the logits, as the model gives them
            labels: list[Tensor] = []  # [n, rows]: set by the cotangents
            covered: set[nn.Module] = set()  # the layers the rules took

            def picked(output: Any) -> Tensor:
                logits = pick_logits(output, self.output_fn)
                shapes.append(logits.shape)
                return logits

            def cotangents(logits: Tensor) -> list[Tensor]:
                rows = targets
                if rows is None:  # the shape of the batch's logits (not the probe's)
                    n_rows = logits.shape[0] * logits.shape[1]
                    shape = next(s for s in shapes if math.prod(s[:-1]) == n_rows)
                    rows = self._sample_rows(module, batch, logits, shape, generator)
                labels.append(rows)
                return [_cross_entropy_cotangent(logits, rows)]

            def on_layer(rule: LayerRule, m: nn.Module, a: Tensor, g: Tensor) -> None:
                covered.add(m)
                own = [index.get(id(p)) for p in trained(m)]
                if all(k is None for k in own):
                    return
                dtype = _acc_dtype(g.dtype)  # fp16/bf16 layers: squared in float32
                a = a.to(dtype) if a.is_floating_point() else a  # (an embedding's ids stay)
                for k, sq in zip(own, rule.sq_grads(m, a, g.to(dtype)), strict=True):
                    if k is not None:
                        sums[k].add_(sq.to(sums[k].dtype))

            # the layers the rules may take: checked (host reads) once per input layout; later
            # refreshes take those without reading back
            layout = input_layout(batch)
            trusted = self._covered_layers.get(layout)
            _, used = ghost_backward(
                module, batch, cotangents, on_layer,
                output_fn=picked, trusted=trusted, optimizer_pass=True,
            )
            self._covered_layers.setdefault(layout, frozenset(covered))
            rest = [p for p in used if id(p) in index]  # no rule covers them: per example
            for start in range(0, n if rest else 0, PER_EXAMPLE_CHUNK):
                stop = min(start + PER_EXAMPLE_CHUNK, n)
                y = labels[0][start:stop]
                grads = example_grads(module, batch, y, rest, _example_loss, self.output_fn, start)
                for p, d in zip(rest, grads):
                    s = sums[index[id(p)]]
                    s.add_(d.to(s.dtype).pow(2).sum(0))
        return [s / n for s in sums]

    def _sample_rows(
        self,
        module: nn.Module,
        batch: Batch,
        logits: Tensor,
        shape: torch.Size,
        generator: torch.Generator | None,
    ) -> Tensor:
        """``ŷ ~ p_θ(·|x)`` per logit row (``logits``: ``[n, rows, C]``, ``shape`` as the model
        gives them), drawn chunk by chunk of :data:`PER_EXAMPLE_CHUNK` examples,
        ``IGNORE_INDEX`` at rows without a target (:func:`fisher_optim._targets.target_rows`):
        ``[n, rows]``."""
        n, rows, classes = logits.shape
        has_target = target_rows(module, batch.args, batch.kwargs, shape, self.target_mask)
        if has_target is not None:
            has_target = has_target.reshape(n, rows)
        out = []
        for start in range(0, n, PER_EXAMPLE_CHUNK):
            stop = min(start + PER_EXAMPLE_CHUNK, n)
            drawn = sample_labels(
                _finite(logits[start:stop].reshape(-1, classes)), "sample", generator
            )
            keep = None if has_target is None else has_target[start:stop]
            out.append(drop_untargeted(drawn, keep).view(stop - start, rows))
        return torch.cat(out)

    def _cached_directions(self, draws: int | None) -> list[Tensor | None]:
        """``sqrt(diag F) ⊙ ξ`` (or ``sqrt(Tr F / d) ξ``), one ξ over all trainable entries."""
        assert self._cache is not None
        xi = self._gaussian([p for p, c in zip(self.flat_params(), self._cache) if c is not None],
                            draws)
        it = iter(xi)
        return [None if c is None else next(it) * c.sqrt() for c in self._cache]

    def _gaussian(self, params: list[Tensor], draws: int | None) -> list[Tensor]:
        """``ξ ~ N(0, I)`` shaped like ``params`` (one flat draw from the noise generator, so the
        stream is the same on every rank and every device layout)."""
        device = params[0].device
        dtype = _acc_dtype(*(p.dtype for p in params))
        sizes = [p.numel() for p in params]
        lead = () if draws is None else (draws,)
        flat = torch.randn((*lead, sum(sizes)), generator=self.generator(device), device=device,
                           dtype=dtype)
        return [
            x.reshape(*lead, *p.shape).to(p.device)
            for x, p in zip(flat.split(sizes, dim=-1), params)
        ]

    # ----------------------------------------------------------------- full
    def _full_directions(self, batch: Batch, draws: int | None) -> list[Tensor | None] | None:
        """``v = (1/sqrt(M)) Σ_i z_i g_i`` per parameter, ``Cov(v) = (1/M) Σ_i g_i g_i^T``.

        One forward (batch statistics, running statistics frozen) and one backward of
        ``Σ_i z_i ℓ_i / sqrt(M)``, written as a cotangent on the log-probabilities so that
        ``draws`` draws (fresh labels and ``z``) share the forward (``is_grads_batched``).
        """
        params = self.flat_params()
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        wrt = [params[i] for i in trainable]
        batch = self.cut(batch, self.estimate_batch_size, self.output_fn)
        n = batch.num_examples()
        targets = self._target_rows(batch, n)
        device = wrt[0].device
        with self.own_pass(autocast=False), frozen_batchnorm_stats(self.module):
            shaped = pick_logits(self.module(*batch.args, **batch.kwargs), self.output_fn)
            logits = _upcast(shaped.reshape(-1, shaped.shape[-1]))
        rows, classes = logits.shape
        if rows % n:
            raise ValueError(f"the model gave {rows} rows of logits for {n} examples")
        per = rows // n
        k = 1 if draws is None else draws
        generator = self._local_generator(device)
        if targets is None:
            probs = torch.softmax(_finite(logits.detach()), dim=-1)
            labels = torch.multinomial(probs, k, replacement=True, generator=generator).T
            has_target = target_rows(
                self.module, batch.args, batch.kwargs, shaped.shape, self.target_mask
            )
            labels = drop_untargeted(labels, has_target)
        else:
            labels = targets.reshape(1, rows).to(logits.device).expand(k, rows)
        valid = labels != IGNORE_INDEX  # ℓ_i: the mean over example i's rows with a target
        count = valid.reshape(k, n, per).sum(-1).clamp_min(1).to(logits.dtype)
        z = torch.randn((k, n), generator=generator, device=logits.device, dtype=logits.dtype)
        # d(Σ_i z_i ℓ_i / √M) / d log p, row by row
        weights = (-z / (math.sqrt(n) * count)).repeat_interleave(per, dim=1)
        # a scatter, not F.one_hot, whose range check reads the labels on the host
        onehot = torch.zeros((*labels.shape, classes), device=logits.device, dtype=logits.dtype)
        onehot.scatter_(-1, torch.where(valid, labels, 0).unsqueeze(-1), 1.0)
        cotangent = onehot * (weights * valid.to(logits.dtype)).unsqueeze(-1)
        if draws is None:
            cotangent = cotangent[0]
        grads = torch.autograd.grad(
            torch.log_softmax(logits, dim=-1), wrt, cotangent,
            allow_unused=True, is_grads_batched=draws is not None,
        )
        lead = () if draws is None else (k,)
        v = [
            torch.zeros((*lead, *p.shape), device=p.device, dtype=p.dtype) if g is None else g
            for p, g in zip(wrt, grads)
        ]
        world = self._world()[0]
        if world > 1:  # (1/sqrt(W M)) Σ over all ranks' examples
            v = [t * math.sqrt(world) for t in self.all_reduce_mean(v)]
        sq = torch.stack([t.double().pow(2).sum() for t in v]).sum()
        self.refreshes += 1
        total = float(sq)  # the one host sync of a draw
        if not math.isfinite(total):
            self.skipped_refreshes += 1
            warnings.warn(
                f"FisherNoiseSGD: the Fisher noise at step {self.step_count} is not finite; it was "
                f"dropped and no parameter was changed by it ({self.skipped_refreshes} dropped so "
                "far). Training continues.",
                RuntimeWarning,
                stacklevel=8,
            )
            return None
        self.fisher_trace = total / k
        out: list[Tensor | None] = [None] * len(params)
        for i, t in zip(trainable, v):
            out[i] = t.detach()
        return out

    # ----------------------------------------------------------------- helpers
    def _target_rows(self, batch: Batch, n: int) -> Tensor | None:
        """The targets as ``[n, rows per example]`` for ``fisher="empirical"``, else None."""
        if self.fisher != "empirical":
            return None
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
        return batch.targets.reshape(n, -1).to(self._batch_device())

    def _world(self) -> tuple[int, int]:
        group = self._process_group()
        if group is None:
            return 1, 0
        return dist.get_world_size(group), dist.get_rank(group)

    def _sync_seed(self) -> None:
        """Broadcast the seed from rank 0 so that ξ is the same on every rank."""
        group = self._process_group()
        device = next(iter(self.flat_params())).device
        t = torch.tensor([self.seed], dtype=torch.int64, device=device)
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
        if int(t) != self.seed:
            self.seed = int(t)
            self._generators = {}
        self._seed_synced = True

    def _local_generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator for labels and ``z``: seeded by (seed, rank, draw counter), so it
        differs across ranks, needs no state beyond the counter and survives a restore."""
        self._local_draws += 1
        mixed = (
            self.seed * 0x9E3779B97F4A7C15
            ^ (self._world()[1] + 1) * 0xBF58476D1CE4E5B9
            ^ self._local_draws * 0x94D049BB133111EB
        ) % (2**62)
        return torch.Generator(device).manual_seed(mixed)

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {
            **super()._extra_state(),
            "noise_norm": self.noise_norm,
            "fisher_trace": self.fisher_trace,
            "refreshes": self.refreshes,
            "skipped_refreshes": self.skipped_refreshes,
            "local_draws": self._local_draws,
            "cache": self._cache,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._noise_norm = extra["noise_norm"]
        self.fisher_trace = extra["fisher_trace"]
        self.refreshes = extra["refreshes"]
        self.skipped_refreshes = extra["skipped_refreshes"]
        self._local_draws = extra["local_draws"]
        self._cache = self.load_per_param(
            extra["cache"], "Fisher estimate", lambda p: _acc_dtype(p.dtype)
        )


def _cross_entropy_cotangent(logits: Tensor, labels: Tensor) -> Tensor:
    """``∂(Σ_i ℓ_i)/∂logits`` for logits ``[n, R, C]`` and labels ``[n, R]``: row ``r`` of
    example ``i`` gets ``(softmax(logits_ir) − onehot(y_ir)) · [y_ir ≠ −100] / R_i``, ``R_i``
    the rows of example ``i`` with a label (:func:`example_cross_entropy`). A scatter, not
    ``F.one_hot`` (whose range check reads the labels on the host)."""
    up = _upcast(logits)
    check_cross_entropy_outputs(up, "FisherNoiseSGD(fisher='empirical')")
    if labels.shape != up.shape[:2]:
        raise ValueError(
            f"the targets give {labels.shape[1]} per example, the model {up.shape[1]} rows of "
            "logits: set_targets needs one target per logit row"
        )
    labels = labels.to(logits.device)
    valid = labels != IGNORE_INDEX
    weight = valid.to(up.dtype) / valid.sum(1, keepdim=True).clamp_min(1).to(up.dtype)
    onehot = torch.zeros_like(up).scatter_(-1, torch.where(valid, labels, 0).unsqueeze(-1), 1.0)
    return ((torch.softmax(up, -1) - onehot) * weight.unsqueeze(-1)).to(logits.dtype)


def _example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``ℓ_i`` of one example's logit rows (:func:`example_cross_entropy`), upcast."""
    return example_cross_entropy(_upcast(logits), labels)


def _check_params_of(module: nn.Module, params: list[Tensor]) -> None:
    known = {id(p) for p in module.parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in known]
    if missing:
        raise ValueError(f"parameters of shapes {missing} are not parameters of the model")


def example_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``ℓ_i``: :func:`fisher_optim.curvature.examples.example_cross_entropy` of one
    example's rows ``[R, C]``.

    >>> round(float(example_cross_entropy(torch.zeros(3, 4), torch.tensor([1, -100, 2]))), 4)
    1.3863
    """
    return examples.example_cross_entropy(logits, labels, "FisherNoiseSGD(fisher='empirical')")


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _finite(logits: Tensor) -> Tensor:
    """Logits to sample labels from: non-finite entries zeroed, so that a NaN model samples
    arbitrary labels (its NaN estimate is then dropped) instead of failing in multinomial."""
    return torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)


"""What is penalized: the Fisher penalty and the gradient-norm penalties it is compared with.

Every penalty here is the squared norm of a gradient of a *surrogate loss* ``L``:

================== ====================================== ======================= ===========
``penalty``         surrogate loss ``L``                   gradient taken w.r.t.   paper name
================== ====================================== ======================= ===========
``"fisher"``        mean −log p(ŷ|f(x)), ŷ ~ p(·|f(x))      parameters θ            FP
``"random_label"``  mean −log p(ŷ|f(x)), ŷ uniform          parameters θ            GPr
``"gradient"``      loss_fn(f(x), y), true targets          parameters θ            GP
``"input_gradient"`` loss_fn(f(x), y), true targets         inputs x                GPx
================== ====================================== ======================= ===========

``p`` is the ``likelihood``: ``"categorical"`` (the default and the paper's: softmax,
``−log p = CE``), ``"bernoulli"`` (independent binary labels, one logit each) or
``"gaussian"`` (regression, ``N(f(x), σ²)``); see :mod:`fisher_optim.likelihoods`. A model with
one output needs ``"bernoulli"`` or ``"gaussian"``: a softmax over one class makes the penalty
identically 0, so the categorical likelihood refuses it. ``loss_fn`` (GP, GPx) gets the model's
output (after ``output_fn``) and the targets as they are, like the training loss; without
``loss_fn`` it is the likelihood's mean negative log-likelihood over the rows.

so ``P = ||∇ L||²``. For ``"fisher"`` this is ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²``, the
term the FP paper adds to the loss (Jastrzebski et al., ICML 2021, Eq. 3/5). The labels are
drawn once per evaluation and then frozen, so that a finite difference compares gradients of
the same function.

Each penalty is one :class:`Penalty` object (what it differentiates, whether it needs the
targets, which labels, its loss ``L``), registered by name in :data:`PENALTY_REGISTRY`;
``penalty=`` takes a name or an instance. A new penalty is one subclass and one entry.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(4, 3)
>>> p = fisher_penalty(model, torch.randn(8, 4))
>>> bool(p > 0), p.requires_grad
(True, True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._global_rows import RowSlice, rank_counts
from fisher_optim._logits import OutputFn, as_logits, check_batched, model_output, pick_logits
from fisher_optim._modules import frozen_batchnorm_stats, trainable_parameters
from fisher_optim.batch import Batch
from fisher_optim.likelihoods import Likelihood, get_likelihood
from fisher_optim.targets import TargetMask, target_rows

#: ``penalty_scale``: ``"batch"``, ``P = Tr(F_B)`` (the paper's); ``"per_row"``, ``N · Tr(F_B)``.
PENALTY_SCALES = ("batch", "per_row")
LossFn = Callable[[Tensor, Tensor], Tensor]


class Penalty:
    """One penalty ``P = ||∇ L||²``: what it differentiates (:attr:`wrt_inputs`), whether it
    needs the true targets (:attr:`needs_targets`), which labels its surrogate loss ``L``
    uses, and ``L`` itself (:meth:`loss`).

    A new penalty is one subclass plus one entry in :data:`PENALTY_REGISTRY`; its name then
    works wherever ``penalty=`` is taken, and an instance may be passed as well.
    """

    #: The name ``penalty=`` takes.
    name = "penalty"
    #: Whether ``L`` uses the true targets (``set_targets`` before ``step()``).
    needs_targets = False
    #: Whether the gradient is taken w.r.t. the model's first input instead of θ.
    wrt_inputs = False
    #: Whether ``penalty_scale="per_row"`` (``N · P``) is derived for it (see
    #: :class:`PenaltyObjective`).
    per_row = False

    def check_likelihood(self, likelihood: Likelihood) -> None:
        """Raise ``ValueError`` if this penalty has no meaning under ``likelihood``."""

    def loss(self, objective: PenaltyObjective, output: Any) -> Tensor:
        """``L`` of ``objective``'s batch from the model's ``output`` on it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SampledLabelPenalty(Penalty):
    """``L`` = the likelihood's mean −log p(ŷ|f(x)) over the rows with a target, the labels ŷ
    drawn by :meth:`draw` on the first evaluation and then frozen."""

    def draw(
        self, likelihood: Likelihood, logits: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """One label per row of ``logits`` ``[N, C]``, without gradient."""
        raise NotImplementedError

    def loss(self, objective: PenaltyObjective, output: Any) -> Tensor:
        lik = objective.likelihood
        shaped = pick_logits(output, objective.output_fn, objective.examples)
        logits = shaped.reshape(-1, shaped.shape[-1])
        if objective.labels is None:  # first call: decide the rows, then draw their labels
            batch = objective.batch
            rows = target_rows(
                objective.model, batch.args, batch.kwargs, shaped.shape, objective.target_mask
            )
            objective.rows = None if rows is None else rows.reshape(-1).to(logits.device)
        if objective.rows is not None:
            logits = logits[objective.rows]
        if objective.labels is None:
            lik.check_outputs(logits)
            generator = objective.place(logits.shape[0], logits.device)
            objective.labels = self.draw(lik, logits, generator)
        if logits.shape[0] == 0:  # no row has a target: no penalty (zero gradient, not NaN)
            return _upcast(logits).sum() * 0.0
        loss = lik.nll(logits, objective.labels) * objective.weight
        if objective.penalty_scale == "per_row":
            return loss * math.sqrt(objective.total)
        return loss


class FisherPenalty(SampledLabelPenalty):
    """FP: ŷ ~ p_θ(·|f(x)), so ``P = Tr(F_B)`` (Jastrzebski et al., ICML 2021, Eq. 3)."""

    name = "fisher"
    per_row = True

    def draw(
        self, likelihood: Likelihood, logits: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        return likelihood.sample(logits, generator)


class RandomLabelPenalty(SampledLabelPenalty):
    """GPr: ŷ uniform over the label set."""

    name = "random_label"

    def check_likelihood(self, likelihood: Likelihood) -> None:
        if not likelihood.uniform_labels:
            raise ValueError(
                f"penalty='random_label' draws labels uniformly over the label set; the labels "
                f"of {likelihood!r} are real numbers, which have no uniform distribution. Use "
                "penalty='fisher' (labels from the model) or penalty='gradient' (true targets)"
            )

    def draw(
        self, likelihood: Likelihood, logits: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        return likelihood.sample_uniform(logits, generator)


class TrueTargetPenalty(Penalty):
    """``L`` = ``loss_fn(f(x), y)`` on the true targets as given (default: the likelihood's
    mean negative log-likelihood over the rows)."""

    needs_targets = True

    def loss(self, objective: PenaltyObjective, output: Any) -> Tensor:
        if objective.total is None:
            objective.place(objective.batch.num_examples(), objective.batch.first_tensor().device)
        if objective.loss_fn is not None:  # the user's loss sees output and targets as they are
            out = model_output(output, objective.output_fn)
            if objective.examples is not None:
                check_batched(out, objective.examples)
            return objective.loss_fn(out, objective.targets) * objective.weight
        lik = objective.likelihood
        logits = as_logits(output, objective.output_fn, objective.examples)
        lik.check_outputs(logits)
        return lik.nll(logits, lik.as_targets(objective.targets, logits)) * objective.weight


class GradientPenalty(TrueTargetPenalty):
    """GP: the squared norm of the loss gradient w.r.t. the parameters."""

    name = "gradient"


class InputGradientPenalty(TrueTargetPenalty):
    """GPx: the squared norm of the loss gradient w.r.t. the model's first input."""

    name = "input_gradient"
    wrt_inputs = True


#: The built-in penalties by name: a new one is a :class:`Penalty` subclass and an entry here.
PENALTY_REGISTRY: dict[str, type[Penalty]] = {
    cls.name: cls
    for cls in (FisherPenalty, RandomLabelPenalty, GradientPenalty, InputGradientPenalty)
}
#: The names ``penalty=`` takes (the keys of :data:`PENALTY_REGISTRY`).
PENALTIES = tuple(PENALTY_REGISTRY)


def get_penalty(penalty: str | Penalty) -> Penalty:
    """The :class:`Penalty` named ``penalty`` (or the instance itself).

    >>> get_penalty("input_gradient").needs_targets, get_penalty("fisher").needs_targets
    (True, False)
    """
    if isinstance(penalty, Penalty):
        return penalty
    cls = PENALTY_REGISTRY.get(penalty) if isinstance(penalty, str) else None
    if cls is None:
        raise ValueError(
            f"penalty must be one of {tuple(PENALTY_REGISTRY)} or a Penalty instance, got "
            f"{penalty!r}"
        )
    return cls()


def check_penalty(penalty: str | Penalty) -> Penalty:
    """Alias of :func:`get_penalty`: the penalty, or a ``ValueError`` naming the valid ones."""
    return get_penalty(penalty)


def check_penalty_scale(penalty_scale: str, penalty: str | Penalty) -> str:
    """Validate ``penalty_scale``; ``"per_row"`` is derived for penalties with
    :attr:`Penalty.per_row` (``"fisher"``) only."""
    penalty = get_penalty(penalty)
    if penalty_scale not in PENALTY_SCALES:
        raise ValueError(f"penalty_scale must be one of {PENALTY_SCALES}, got {penalty_scale!r}")
    if penalty_scale == "per_row" and not penalty.per_row:
        raise ValueError(
            f"penalty_scale='per_row' is derived for penalty='fisher' (labels sampled from the "
            f"model have zero-mean gradients, so N·Tr(F_B) does not depend on N); with "
            f"penalty={penalty.name!r} the mean gradient does not vanish and N·P grows with N. "
            "Use penalty_scale='batch'"
        )
    return penalty_scale


def check_likelihood(likelihood: str | Likelihood, penalty: str | Penalty = "fisher") -> Likelihood:
    """The :class:`~fisher_optim.likelihoods.Likelihood` named by ``likelihood``, checked
    against ``penalty`` (``"random_label"`` has no meaning for real-valued, Gaussian labels)."""
    lik = get_likelihood(likelihood)
    get_penalty(penalty).check_likelihood(lik)
    return lik


def needs_targets(penalty: str | Penalty) -> bool:
    """Whether ``penalty`` uses the true targets (GP and GPx do; FP and GPr do not)."""
    return get_penalty(penalty).needs_targets


class PenaltyObjective:
    """The surrogate loss ``L`` of one penalty on one batch, with its labels frozen.

    ``loss()`` runs the model on the batch (BatchNorm running statistics untouched) and
    returns ``L``. The first call draws the labels (for ``"fisher"`` from the logits of that
    very forward); later calls, e.g. at shifted parameters or shifted inputs, reuse them.
    ``wrt()`` gives the tensors whose gradient norm is penalized.

    Rows without a target (:mod:`fisher_optim.targets`: padding, ``-100`` labels, the last
    position of a causal LM; or ``target_mask``) get no label and do not enter ``L``, which is
    the mean over the ``N`` rows that have one. With true targets (GP, GPx) ``loss_fn`` sees
    every row and its own ``ignore_index`` decides.

    ``penalty_scale="per_row"`` penalises ``N · Tr(F_B)`` instead of ``Tr(F_B)`` (``L`` is
    multiplied by ``√N``). Why: with labels ŷ_n ~ p_θ(·|x_n) drawn independently per row, each
    row's gradient ``g_n = ∇_θ CE(f_n, ŷ_n)`` has zero mean over its label (the expected score
    vanishes), so the cross terms of ``||(1/N) Σ_n g_n||²`` vanish in expectation and

        E_ŷ[Tr(F_B)] = (1/N²) Σ_n E||g_n||² = (1/N) · (1/N) Σ_n Tr(F_n),

    ``F_n`` the Fisher of row ``n``. ``Tr(F_B)`` thus shrinks as ``1/N`` (as ``1/T`` for a
    language model at fixed batch size), while ``N · Tr(F_B)`` is an unbiased estimate of the
    mean per-row trace ``(1/N) Σ_n Tr(F_n)``, whose scale does not depend on ``B`` or ``T``:
    an ``alpha`` tuned at one batch size or sequence length carries over. ``alpha`` of
    ``"per_row"`` equals ``alpha`` of ``"batch"`` divided by ``N`` at the ``N`` it was tuned at.
    (The paper's ``E[Tr(F_B)] = Tr(F)/N + ||E g||²`` has ``E g = 0`` here; with uniform or true
    labels ``E g ≠ 0``, so the option is offered for ``penalty="fisher"`` only.)

    ``group``: the data-parallel process group whose ranks hold the other slices of the
    global batch (None: this process holds the whole batch). ``L`` is then the rank's part
    of the global batch's surrogate loss: its labels are those one process would draw for
    these rows of the whole batch (:mod:`fisher_optim._global_rows`: the ranks' rows laid end
    to end in rank order, one all-gather of the row counts on the first call), and ``L`` is
    weighted by ``R n_r / N`` (``n_r`` this rank's rows, ``N`` the global batch's), so that
    the mean over the ranks is the mean over the global batch; with ``"per_row"``, ``N`` is
    the global batch's. How the ranks' gradients are combined:
    :mod:`fisher_optim._data_parallel`.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Batch,
        *,
        penalty: str | Penalty = "fisher",
        params: Sequence[Tensor] | None = None,
        output_fn: OutputFn | None = None,
        loss_fn: LossFn | None = None,
        generator: torch.Generator | None = None,
        target_mask: TargetMask | None = None,
        penalty_scale: str = "batch",
        likelihood: str | Likelihood = "categorical",
        group: Any = None,
    ) -> None:
        self.penalty = get_penalty(penalty)
        self.likelihood = check_likelihood(likelihood, self.penalty)
        self.penalty_scale = check_penalty_scale(penalty_scale, self.penalty)
        self.target_mask = target_mask
        self.rows: Tensor | None = None  # flat boolean mask of the rows with a target
        if self.penalty.needs_targets and batch.targets is None:
            raise ValueError(
                f"penalty={self.penalty.name!r} uses the true targets; pass targets=... "
                "(with FisherPenaltySGD: call opt.set_targets(y) before opt.step())"
            )
        self.model = model
        self.batch = batch
        self.params = list(trainable_parameters(model) if params is None else params)
        if not self.params:
            raise ValueError(
                "every parameter of the model is frozen (requires_grad=False), so the penalty "
                "has no gradient and Tr(F_B) sums over no parameter; unfreeze the ones to "
                "penalise (model.requires_grad_(True), or p.requires_grad_(True) for some)"
            )
        #: The number of examples the model is called on (None if the batch has no batch
        #: dimension to read it from), to tell an unbatched call in the error.
        self.examples = _examples(batch)
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.generator = generator
        self.group = group
        #: this rank's weight ``R n_r / N`` and the global batch's ``N`` (set on the first call)
        self.weight = 1.0
        self.total: int | None = None
        self.labels: Tensor | None = None
        self.targets = batch.targets if self.penalty.needs_targets else None
        self.inputs: Tensor | None = None
        if self.penalty.wrt_inputs:
            x = batch.first_tensor()
            if not x.is_floating_point():
                raise TypeError(
                    f"penalty={self.penalty.name!r} differentiates w.r.t. the inputs, so it "
                    "needs a floating-point first input"
                )
            self.inputs = x.detach().requires_grad_(True)

    def wrt(self) -> list[Tensor]:
        return [self.inputs] if self.inputs is not None else self.params

    def place(self, count: int, device: torch.device) -> torch.Generator | RowSlice | None:
        """Set this rank's place in the global batch from its ``count`` rows (one
        all-gather under a ``group``) and return the generator to draw its labels with."""
        if self.group is None:
            self.total = count
            return self.generator
        counts = rank_counts(count, self.group, device)
        rank = dist.get_rank(self.group)
        self.total = sum(counts)
        self.weight = len(counts) * count / self.total if self.total else 0.0
        if self.generator is None:
            return None
        return RowSlice(self.generator, sum(counts[:rank]), self.total)

    def _call(
        self,
        input_shift: Tensor | None = None,
        forward: contextlib.AbstractContextManager[Any] | None = None,
    ) -> Any:
        args, kwargs = self.batch.args, self.batch.kwargs
        if self.inputs is not None:
            x = self.inputs if input_shift is None else self.inputs + input_shift
            args, kwargs = _replace_first_tensor(args, kwargs, self.batch.first_tensor(), x)
        with frozen_batchnorm_stats(self.model), forward or contextlib.nullcontext():
            return self.model(*args, **kwargs)

    def loss(
        self,
        input_shift: Tensor | None = None,
        forward: contextlib.AbstractContextManager[Any] | None = None,
    ) -> Tensor:
        """``L`` at the current parameters (inputs shifted by ``input_shift``), the model's
        forward run inside ``forward`` (e.g. an
        :class:`~fisher_optim.activation_pattern.ActivationPattern` recording or replaying)."""
        return self.penalty.loss(self, self._call(input_shift, forward))


def _examples(batch: Batch) -> int | None:
    try:
        return batch.num_examples()
    except ValueError:
        return None


def _replace_first_tensor(
    args: tuple[Any, ...], kwargs: dict[str, Any], old: Tensor, new: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    for i, a in enumerate(args):
        if a is old:
            return (*args[:i], new, *args[i + 1 :]), kwargs
    key = next(k for k, v in kwargs.items() if v is old)
    return args, {**kwargs, key: new}


def _upcast(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half-precision logits are upcast for the loss)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def squared_norm(tensors: Sequence[Tensor | None]) -> Tensor:
    """``Σ ||t||²`` over the tensors that are not None, accumulated in at least float32.

    A 0-dim tensor, differentiable.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("no gradient to take the norm of: no parameter reaches the loss")
    return torch.stack([_upcast(t).pow(2).sum() for t in present]).sum()


def fisher_penalty(
    model: nn.Module,
    inputs: Tensor | Batch,
    *,
    penalty: str | Penalty = "fisher",
    targets: Tensor | None = None,
    output_fn: OutputFn | None = None,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[Tensor] | None = None,
    target_mask: TargetMask | None = None,
    penalty_scale: str = "batch",
    likelihood: str | Likelihood = "categorical",
) -> Tensor:
    """The penalty ``P = ||∇ L||²`` as a differentiable scalar, to add to a loss.

    With the default ``penalty="fisher"`` this is ``Tr(F_B) = ||(1/B) Σ_i ∇_θ ℓ(x_i, ŷ_i)||²``,
    ŷ_i ~ p_θ(y|x_i) (FP paper, Eq. 3). ``loss + alpha * fisher_penalty(model, x)`` followed by
    ``backward()`` differentiates it exactly (double backprop). ``inputs`` is the model's input
    tensor, or a :class:`Batch` for models called with several arguments.

    Only rows with a target enter ``L`` (automatic for Hugging Face models; ``target_mask``
    for any other model, see :mod:`fisher_optim.targets`); ``penalty_scale="per_row"``
    returns ``N · Tr(F_B)`` (see :class:`PenaltyObjective`).

    ``likelihood`` is the model's predictive distribution ``p_θ(y|x)``: ``"categorical"``
    (softmax, needs ≥ 2 outputs), ``"bernoulli"`` (one logit per binary label) or
    ``"gaussian"`` (regression; ``Gaussian(sigma=...)``), see :mod:`fisher_optim.likelihoods`.
    ``loss_fn`` (GP, GPx) receives the model output (after ``output_fn``) and ``targets``
    exactly as given; without it, the likelihood's negative log-likelihood is used.
    """
    batch = inputs if isinstance(inputs, Batch) else Batch((inputs,), {}, targets)
    if targets is not None:
        batch = Batch(batch.args, batch.kwargs, targets)
    objective = PenaltyObjective(
        model,
        batch,
        penalty=penalty,
        params=params,
        output_fn=output_fn,
        loss_fn=loss_fn,
        generator=generator,
        target_mask=target_mask,
        penalty_scale=penalty_scale,
        likelihood=likelihood,
    )
    wrt = objective.wrt()
    grads = torch.autograd.grad(objective.loss(), wrt, create_graph=True, allow_unused=True)
    return squared_norm(grads)

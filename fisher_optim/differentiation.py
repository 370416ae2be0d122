"""How the penalty is differentiated: exactly (double backprop), or by a finite difference.

For ``P = ||g||²`` with ``g = ∇_θ L`` (labels frozen), ``∇_θ P = 2 H g`` where ``H = ∇²_θ L``
(FP paper, Sec. 4; a Hessian-vector product).

``mode="exact"``: double backprop. ``g`` is computed with ``create_graph=True`` and ``P`` is
differentiated again: one forward, one backward, one double backward (≈ 3x a gradient).

``mode="finite_difference"``: with ``v = g / ||g||`` and step ``r``,

    ∇_θ P = 2 ||g|| H v ≈ 2 ||g|| (∇_θ L(θ + r v) − ∇_θ L(θ)) / r      (forward)
                      ≈   ||g|| (∇_θ L(θ + r v) − ∇_θ L(θ − r v)) / r  (central)

ordinary forward-backward passes only (two for the forward difference, three for the
central one), the shifted ones with the *same* labels, dropout masks and buffers as the
first; the parameters are then restored bitwise. For the input-gradient penalty (GPx,
``g = ∇_x L``) the inputs are shifted instead of θ. No double backward is needed, so it runs
where that cannot: fused attention kernels, and FSDP2 without gathering the parameters.

**Kinks.** On ReLU, max-pool, clamp or top-k-routed networks the gradient jumps where a
unit changes side, and a network of 10⁵–10⁶ units per batch always has units within any
useful step of their kink. A quotient across a kink adds the jump divided by ``r``: without
more care the difference is 4–35x off the exact gradient on SimpleCNN, VGG-11 and ResNet-20
at any float32 step that rounding allows. So every shifted pass runs on the **base point's
activation pattern** (:mod:`fisher_optim.activation_pattern`): the ReLU masks, pooling
winners, clamp regions and routing choices of the unshifted pass are recorded and replayed,
and the quotient differentiates the base point's smooth piece, whose Hessian is exactly the
one double backprop returns. What is left is truncation (``O(r)`` forward, ``O(r²)``
central) and float32 rounding (``O(ε ||∇L|| / r)``).

**The default in float32** is ``fd_scheme="auto"`` at ``r = 3e-5 · max(1, ||θ||)``: the
central difference, which also measures, from the same passes, how far the forward one
would be (``forward_gap``, its truncation error to first order); while that is within 0.5%
(:data:`AUTO_TOLERANCE`), :class:`~fisher_optim.FisherPenaltySGD` takes the forward
difference for the next 9 refreshes (:data:`AUTO_FORWARD_REFRESHES`) and then checks again.
So the refreshes cost about two gradients where the forward difference is accurate
(SimpleCNN, VGG-11, a top-k MoE MLP: under 0.2%) and three where it is not (ResNet-20 and
DenseNet-40 with BatchNorm in training mode, a GELU transformer: 0.4–11% at this step), and
the error stays at the central difference's: within 0.30% (worst of 20 real-data batches)
on each benchmark network at real size (``docs/fd_step_measured.md``,
``benchmarks/fd_step.py``). The functional
:func:`penalty_gradient` has no memory between calls: there ``"auto"`` is the central
difference. In float64 the default is the forward difference at ``r = 1e-8 · max(1, ||θ||)``.

**What it cannot see** it reports: piecewise operations without a replay rule (``rrelu``,
``grid_sample``, ...) are warned about once (:class:`FiniteDifferenceWarning`); a shifted
forward that calls other piecewise operations than the first (data-dependent control flow)
falls back to the plain difference with a warning; and FisherPenaltySGD compares its first
refresh with the exact gradient (``fd_check=True``), which catches what no Python-level
mode sees (extension kernels, ``torch.ops`` calls). A parametrization whose forward runs a
power iteration (``spectral_norm`` in training mode) is one such case: its vectors move with
the shifted weights, which double backprop treats as constants.

Parameters other than float32/float64 are refused (``TypeError``): in float16/bfloat16 no step
lies between rounding (ε ≈ 1e-3 / 8e-3) and truncation. The passes run in the parameters'
precision even under ``torch.autocast`` (autocast is switched off inside), so training under
autocast with float32 parameters works, with float32 differences. ``fd_step`` must be a
finite number > 0.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._as_found import left_as_found
from fisher_optim._data_parallel import ReplicatedPasses, mean_over_ranks
from fisher_optim._fsdp import (
    INPUT_GRADIENT_UNSUPPORTED,
    GatheredForward,
    ShardedPasses,
    compute_dtypes,
    is_sharded,
    shard_like,
)
from fisher_optim._logits import OutputFn
from fisher_optim._modules import math_attention, trainable_parameters
from fisher_optim.activation_pattern import ActivationPattern, PatternMismatch
from fisher_optim.batch import Batch
from fisher_optim.likelihoods import Likelihood
from fisher_optim.penalty import LossFn, PenaltyObjective, squared_norm
from fisher_optim.targets import TargetMask

MODES = ("exact", "finite_difference")
#: Difference schemes of the finite-difference engine (see the module docstring).
FD_SCHEMES = ("forward", "central", "auto")
#: The scheme ``mode="finite_difference"`` uses, per parameter dtype.
DEFAULT_FD_SCHEME = {
    torch.float64: "forward",
    torch.float32: "auto",
}

#: Relative finite-difference step per parameter dtype (times ``max(1, ||θ||)``).
DEFAULT_FD_STEP = {
    torch.float64: 1e-8,
    torch.float32: 3e-5,
}

#: ``fd_scheme="auto"``: the forward difference is trusted while it is within this relative
#: distance of the central one (the gap estimates its truncation error, the central
#: difference's own being far smaller).
AUTO_TOLERANCE = 0.005
#: ``fd_scheme="auto"`` in :class:`~fisher_optim.FisherPenaltySGD`: after a central refresh
#: that trusts the forward difference, this many refreshes use it before the next check.
AUTO_FORWARD_REFRESHES = 9
#: :class:`~fisher_optim.FisherPenaltySGD` (``fd_check=True``) warns when its first finite
#: difference is farther than this (relative L2) from the exact penalty gradient.
EXACT_CHECK_TOLERANCE = 0.01


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_fd_step(fd_step: float | None) -> float | None:
    """``fd_step`` must be None (the default step) or a finite number > 0."""
    if fd_step is None:
        return None
    if isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)):
        raise TypeError(f"fd_step must be a number > 0 or None, got {fd_step!r}")
    if not math.isfinite(fd_step) or fd_step <= 0:
        raise ValueError(
            f"fd_step must be a finite number > 0 or None (the default step), got {fd_step!r}"
        )
    return float(fd_step)


def check_fd_scheme(scheme: str | None) -> str | None:
    """``fd_scheme`` must be None (the dtype's default) or one of :data:`FD_SCHEMES`."""
    if scheme == "guarded":
        raise ValueError(
            "fd_scheme='guarded' was removed: the finite difference now replays the base "
            "point's activation pattern, so no step crosses a kink and there is nothing to "
            f"guard against. Use one of {FD_SCHEMES} or None (the default, 'auto' in float32)"
        )
    if scheme is not None and scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {FD_SCHEMES} or None, got {scheme!r}")
    return scheme


def check_fd_options(mode: str, **options: Any) -> None:
    """The finite-difference options are refused in exact mode, which would ignore them."""
    if mode == "finite_difference":
        return
    for name, value in options.items():
        if value is not None:
            raise ValueError(
                f"{name}={value!r} sets the finite difference, which mode={mode!r} does not "
                f"take: remove {name}, or set mode='finite_difference'"
            )


def check_fd_dtypes(params: Sequence[Tensor], compute_dtypes: Iterable[torch.dtype] = ()) -> None:
    """Refuse parameters the finite difference cannot resolve (anything but float32/64), and
    an FSDP2 ``MixedPrecisionPolicy`` whose ``param_dtype`` (the passes' dtype) is lower."""
    low = sorted({str(d) for d in compute_dtypes if d not in DEFAULT_FD_STEP})
    if low:
        raise TypeError(
            f"mode='finite_difference' on a model sharded with MixedPrecisionPolicy("
            f"param_dtype={', '.join(low)}) would take both gradients in that dtype, where "
            "the shift r·v is mostly rounded away (measured on a small transformer: at best "
            "6.7% off the exact penalty gradient, 160–300% at the float32 default step; "
            "docs/guides/distributed.md). Shard with "
            "MixedPrecisionPolicy(param_dtype=None) or torch.float32 (reduce_dtype may stay low)"
        )
    bad = sorted({str(p.dtype) for p in params if p.dtype not in DEFAULT_FD_STEP})
    if bad:
        raise TypeError(
            f"mode='finite_difference' needs float32 or float64 parameters, got {', '.join(bad)}: "
            "in half precision the difference of two gradients is rounding noise (its "
            "machine epsilon leaves no step between rounding and truncation error). Use "
            "mode='exact', or keep float32 parameters and train under torch.autocast (the "
            "difference passes then run in float32)"
        )


@dataclass
class PenaltyGradient:
    """``grads[i] = ∂P/∂params[i]`` (None where P does not depend on it) and ``value = P``.

    A finite difference also gives, as 0-dim tensors on the device (None where not taken):
    ``forward_gap``, with a central difference, the relative distance of the forward
    difference from it (``||∇L(θ+rv) + ∇L(θ−rv) − 2∇L(θ)|| / ||∇L(θ+rv) − ∇L(θ−rv)||``, the
    forward difference's truncation error to first order); ``exact_error``, with
    ``check_exact=True``, the relative L2 distance of ``grads`` from the exact gradient.
    """

    grads: list[Tensor | None]
    value: Tensor
    forward_gap: Tensor | None = None
    exact_error: Tensor | None = None


def exact_penalty_gradient(objective: PenaltyObjective) -> PenaltyGradient:
    """``∇_θ ||∇L||²`` by double backprop.

    Attention through ``F.scaled_dot_product_attention`` runs on its math backend here: the
    fused (flash, memory-efficient) kernels have no double backward. With a data-parallel
    ``objective.group`` (DDP), the penalty of the global batch
    (:mod:`fisher_optim._data_parallel`): ``ḡ`` and ``H_r ḡ`` are averaged over the ranks.
    """
    if is_sharded(objective.params):
        return _gathered_exact(objective)
    params = objective.params
    group = objective.group
    with math_attention():
        loss = objective.loss()
    g = torch.autograd.grad(loss, objective.wrt(), create_graph=True, allow_unused=True)
    if group is not None and objective.inputs is None:
        return _replicated_exact(g, params, group)
    value = squared_norm(g)
    if not value.requires_grad:  # the gradient does not depend on θ (e.g. a linear loss)
        result = PenaltyGradient([None] * len(params), value.detach())
    else:
        grads = torch.autograd.grad(value, params, allow_unused=True)
        result = PenaltyGradient(list(grads), value.detach())
    return _global_input_penalty(result, params, group)


def _gathered_exact(objective: PenaltyObjective) -> PenaltyGradient:
    """FSDP2: ``2 H̄ ḡ`` of the global batch on the gathered, full parameters (one
    ``full_tensor()`` each, so the full parameters are held on every rank for the
    refresh), as DDP takes it (:func:`_replicated_exact`), each rank keeping its shard."""
    sharded = objective.params
    names = {id(p): n for n, p in objective.model.named_parameters()}
    full = [p.full_tensor().detach().requires_grad_(True) for p in sharded]
    model, params = objective.model, objective.params
    objective.model = GatheredForward(model, {names[id(p)]: f for p, f in zip(sharded, full)})
    objective.params = full
    try:
        result = exact_penalty_gradient(objective)
    finally:
        objective.model, objective.params = model, params
    grads = [None if g is None else shard_like(g, p) for g, p in zip(result.grads, sharded)]
    return PenaltyGradient(grads, result.value)


def _replicated_exact(
    g: Sequence[Tensor | None], params: Sequence[Tensor], group: object
) -> PenaltyGradient:
    """``∇||ḡ||² = 2 H̄ ḡ`` from this rank's ``g_r`` (with its graph): one all-reduce of
    ``ḡ``, ``H_r ḡ`` as the gradient of ``g_r · ḡ``, one all-reduce of it."""
    mean = mean_over_ranks(
        [torch.zeros_like(p) if t is None else t.detach() for t, p in zip(g, params)], group
    )
    value = squared_norm(mean)
    pairs = [(t, m) for t, m in zip(g, mean) if t is not None and t.requires_grad]
    hv: Sequence[Tensor | None] = [None] * len(params)
    if pairs:
        dot = torch.stack([(t * m.to(t.dtype)).sum() for t, m in pairs]).sum()
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    dense = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]
    return PenaltyGradient([2 * h for h in mean_over_ranks(dense, group)], value)


def _global_input_penalty(
    result: PenaltyGradient, params: Sequence[Tensor], group: object
) -> PenaltyGradient:
    """The input-gradient penalty of the global batch from this rank's own, ``P = (1/R²)
    Σ_r P_r`` (:mod:`fisher_optim._data_parallel`); ``result`` itself without a group."""
    if group is None:
        return result
    world = dist.get_world_size(group)
    extra = [t for t in (result.forward_gap, result.exact_error) if t is not None]
    dense = [torch.zeros_like(p) if g is None else g for g, p in zip(result.grads, params)]
    *grads, value, rest = mean_over_ranks(
        [*dense, result.value, torch.stack(extra) if extra else result.value.new_zeros(0)], group
    )
    it = iter(rest)
    return PenaltyGradient(
        [g / world for g in grads],
        value / world,
        None if result.forward_gap is None else next(it),
        None if result.exact_error is None else next(it),
    )


def finite_difference_penalty_gradient(
    objective: PenaltyObjective,
    step: float | None = None,
    scheme: str | None = None,
    replay: bool = True,
    check_exact: bool = False,
) -> PenaltyGradient:
    """``∇_θ ||∇L||²`` by a difference of gradients along ``∇L`` (see the module docstring).

    ``scheme="forward"``: ``(∇L(θ + r v) − ∇L(θ)) / r``, two gradients; ``"central"``:
    ``(∇L(θ + r v) − ∇L(θ − r v)) / 2r``, three, with ``forward_gap``; ``"auto"``: here the
    central one (:class:`~fisher_optim.FisherPenaltySGD` alternates, see
    :data:`AUTO_FORWARD_REFRESHES`). ``None``: :data:`DEFAULT_FD_SCHEME` of the parameters'
    dtype. With ``replay`` (the default) the shifted passes run on the unshifted pass's
    activation pattern (:mod:`fisher_optim.activation_pattern`). Every pass runs in the
    parameters' precision (autocast off) and sees the dropout masks of the first. On
    FSDP2-sharded parameters the passes are sharded (:mod:`fisher_optim._fsdp`); with a
    data-parallel ``objective.group`` (DDP) each pass's gradient is averaged over the ranks
    (:mod:`fisher_optim._data_parallel`): the penalty of the global batch.
    ``check_exact``: also take the exact gradient on the same labels (unsharded only) and
    return the relative distance as ``exact_error``.
    """
    step = check_fd_step(step)
    params = objective.params
    check_fd_dtypes(params)
    scheme = DEFAULT_FD_SCHEME[params[0].dtype] if scheme is None else check_fd_scheme(scheme)
    shift_inputs = objective.inputs is not None
    group = objective.group
    passes = gradient_passes(params, None if shift_inputs else group)
    if isinstance(passes, ShardedPasses):
        check_fd_dtypes(params, compute_dtypes(objective.model))
    if shift_inputs and isinstance(passes, ShardedPasses):
        raise ValueError(INPUT_GRADIENT_UNSUPPORTED)
    rng = _ForwardState(objective.model, params[0].device)
    tensors = passes.tensors()
    pattern = ActivationPattern() if replay else None

    with _no_autocast(params[0].device):
        loss = objective.loss(forward=None if pattern is None else pattern.record())
        if pattern is not None and pattern.unreplayed:
            _warn_unreplayed(pattern.unreplayed)
        if shift_inputs:
            both = torch.autograd.grad(loss, [*objective.wrt(), *params], allow_unused=True)
            direction, grads_at = [both[0]], list(both[1:])
        else:
            grads_at = passes.gradients(loss)
            direction = grads_at
        with torch.no_grad():
            sums = passes.total(torch.stack([squared_norm(direction), squared_norm(tensors)]))
        value = sums[0]
        norm = value.sqrt()
        if step is None:
            r: Tensor | float = DEFAULT_FD_STEP[params[0].dtype] * sums[1].sqrt().clamp_min(1.0)
        else:
            r = step
        scale = r / norm.clamp_min(torch.finfo(norm.dtype).tiny)

        def shifted_loss(input_shift: Tensor | None) -> Tensor:
            """``L`` at the shifted point, on the base point's activation pattern."""
            nonlocal pattern
            rng.restore()  # every pass sees the first one's dropout masks and buffers
            if pattern is not None:
                try:
                    return objective.loss(input_shift, forward=pattern.replay())
                except PatternMismatch as e:
                    _warn_mismatch(e)
                    pattern = None
                    rng.restore()
            return objective.loss(input_shift)

        def grads_shifted(sign: float) -> list[Tensor | None]:
            if shift_inputs:
                shifted = shifted_loss(direction[0] * (sign * scale))
                return list(torch.autograd.grad(shifted, params, allow_unused=True))
            present = [i for i, t in enumerate(grads_at) if t is not None]
            moved = [tensors[i] for i in present]
            saved = [t.detach().clone() for t in moved]
            with torch.no_grad():
                shift = torch._foreach_mul([grads_at[i] for i in present], sign * scale)
                torch._foreach_add_(moved, shift)
            try:
                return passes.gradients(shifted_loss(None))
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(moved, saved)

        ahead = grads_shifted(1.0)
        gap = None
        if scheme == "forward":
            grads = [_difference(b, a, 2 * norm / r) for b, a in zip(grads_at, ahead)]
        else:
            behind = grads_shifted(-1.0)
            gap = _second_difference_ratio(grads_at, ahead, behind, passes.total)
            grads = [_difference(b, a, norm / r) for b, a in zip(behind, ahead)]
        error = None
        if check_exact and not isinstance(passes, ShardedPasses):
            rng.restore()
            if shift_inputs:  # compared with this rank's own, before the ranks are combined
                objective.group = None
            try:
                exact = exact_penalty_gradient(objective).grads
            except (RuntimeError, NotImplementedError):  # no double backward here: no check
                exact = None
            finally:
                objective.group = group
            if exact is not None:
                error = _relative_distance(grads, exact)
    result = PenaltyGradient(passes.wrap(grads), value, gap, error)
    return _global_input_penalty(result, params, group) if shift_inputs else result


def _dense(ts: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(u) if t is None else t for t, u in zip(ts, like)]


def _second_difference_ratio(
    at: list[Tensor | None],
    ahead: list[Tensor | None],
    behind: list[Tensor | None],
    total: Callable[[Tensor], Tensor],
) -> Tensor:
    """``||ahead + behind − 2 at|| / ||ahead − behind||`` on device (no host sync)."""
    keep = [i for i, t in enumerate(zip(at, ahead, behind)) if any(u is not None for u in t)]
    if not keep:
        return torch.zeros(())
    like = [next(u for u in (at[i], ahead[i], behind[i]) if u is not None) for i in keep]
    a, p, m = (_dense([ts[i] for i in keep], like) for ts in (at, ahead, behind))
    second = torch._foreach_add(p, m)
    torch._foreach_add_(second, a, alpha=-2.0)
    first = torch._foreach_sub(p, m)
    sums = total(torch.stack([squared_norm(second), squared_norm(first)]))
    return (sums[0] / sums[1].clamp_min(torch.finfo(sums.dtype).tiny)).sqrt()


def _relative_distance(grads: list[Tensor | None], reference: list[Tensor | None]) -> Tensor:
    """``||grads − reference|| / ||reference||`` (None entries count as zero), on device."""
    pairs = [(g, e) for g, e in zip(grads, reference) if g is not None or e is not None]
    g = _dense([p[0] for p in pairs], [p[0] if p[0] is not None else p[1] for p in pairs])
    e = _dense([p[1] for p in pairs], g)
    diff = squared_norm(torch._foreach_sub(g, e))
    return (diff / squared_norm(e).clamp_min(torch.finfo(diff.dtype).tiny)).sqrt()


class LocalPasses:
    """Gradients of ordinary (unsharded) parameters: ``torch.autograd.grad``."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)

    def tensors(self) -> list[Tensor]:
        return self.params

    def gradients(self, loss: Tensor) -> list[Tensor | None]:
        return list(torch.autograd.grad(loss, self.params, allow_unused=True))

    def total(self, t: Tensor) -> Tensor:
        return t

    def wrap(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        return grads


def gradient_passes(
    params: Sequence[Tensor], group: object = None
) -> LocalPasses | ReplicatedPasses | ShardedPasses:
    """How the finite difference takes gradients: sharded under FSDP2, averaged over the
    ranks of a data-parallel ``group`` (DDP), else by autograd."""
    if is_sharded(params):
        return ShardedPasses(params)
    return LocalPasses(params) if group is None else ReplicatedPasses(params, group)


def default_fd_step(params: Sequence[Tensor]) -> float:
    """``DEFAULT_FD_STEP[dtype] * max(1, ||θ||)`` for the parameters' dtype."""
    check_fd_dtypes(params)
    with torch.no_grad():
        theta = squared_norm(params).sqrt()
    return float(DEFAULT_FD_STEP[params[0].dtype] * theta.clamp_min(1.0))


def compute_penalty_gradient(
    objective: PenaltyObjective,
    mode: str = "exact",
    fd_step: float | None = None,
    fd_scheme: str | None = None,
    check_exact: bool = False,
) -> PenaltyGradient:
    """Dispatch to the engine named by ``mode`` (one of :data:`MODES`).

    The penalty's passes leave the model as found
    (:func:`~fisher_optim._as_found.left_as_found`): rows that an
    ``nn.Embedding(max_norm=...)`` renormalises in these forwards are written back, and
    buffers that a training-mode forward updates (``spectral_norm``'s power-iteration
    vectors) are restored, as BatchNorm's running statistics are never updated here. A
    step thus changes the parameters by the base optimizer's update only, and leaves the
    rest of the model's state as the user's training forward left it, as without the
    penalty.
    """
    check_mode(mode)
    # check=False: the finite-difference engine moves the parameters and restores them itself
    with left_as_found(objective.model, check=False, read_back=False):
        if mode == "exact":
            return exact_penalty_gradient(objective)
        return finite_difference_penalty_gradient(
            objective, fd_step, fd_scheme, check_exact=check_exact
        )


def penalty_gradient(
    model: nn.Module,
    inputs: Tensor | Batch,
    *,
    penalty: str = "fisher",
    mode: str = "exact",
    targets: Tensor | None = None,
    output_fn: OutputFn | None = None,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    fd_step: float | None = None,
    params: Sequence[Tensor] | None = None,
    likelihood: str | Likelihood = "categorical",
    fd_scheme: str | None = None,
    target_mask: TargetMask | None = None,
    penalty_scale: str = "batch",
    group: object = None,
) -> list[Tensor | None]:
    """``∇_θ P`` for ``P = fisher_penalty(model, inputs, ...)``, one tensor per parameter.

    ``params`` defaults to the model's trainable parameters; an entry is None where ``P`` does
    not depend on that parameter. ``likelihood``, ``loss_fn``, ``target_mask``,
    ``penalty_scale``: as in
    :func:`~fisher_optim.penalty.fisher_penalty`. ``fd_step``, ``fd_scheme``: the finite
    difference's step and scheme (None: the dtype's default, see the module docstring).
    ``group``: a data-parallel process group (DDP) whose ranks hold the other slices of the
    global batch: every rank then returns the penalty gradient of the global batch
    (:mod:`fisher_optim._data_parallel`; the labels one process would draw for the whole
    batch when the ranks pass generators in the same state, :mod:`fisher_optim._global_rows`).
    Nothing is written to ``.grad`` and BatchNorm running statistics are left as they were.

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x = torch.randn(16, 4, dtype=torch.float64)
    >>> exact = penalty_gradient(model, x, generator=torch.Generator().manual_seed(1))
    >>> fd = penalty_gradient(model, x, mode="finite_difference",
    ...                       generator=torch.Generator().manual_seed(1))
    >>> cos = torch.nn.functional.cosine_similarity
    >>> bool(cos(torch.cat([t.flatten() for t in exact]),
    ...          torch.cat([t.flatten() for t in fd]), dim=0) > 0.9999)
    True
    """
    check_mode(mode)
    check_fd_step(fd_step)
    check_fd_scheme(fd_scheme)
    check_fd_options(mode, fd_step=fd_step, fd_scheme=fd_scheme)
    batch = inputs if isinstance(inputs, Batch) else Batch((inputs,), {}, targets)
    if targets is not None:
        batch = Batch(batch.args, batch.kwargs, targets)
    objective = PenaltyObjective(
        model,
        batch,
        penalty=penalty,
        params=trainable_parameters(model) if params is None else params,
        output_fn=output_fn,
        loss_fn=loss_fn,
        generator=generator,
        likelihood=likelihood,
        target_mask=target_mask,
        penalty_scale=penalty_scale,
        group=group,
    )
    with torch.enable_grad():
        return compute_penalty_gradient(objective, mode, fd_step, fd_scheme).grads


class FiniteDifferenceWarning(UserWarning):
    """The finite difference could not keep to the base point's linear piece."""


class FiniteDifferenceSchedule:
    """Which difference scheme each refresh of :class:`~fisher_optim.FisherPenaltySGD` takes,
    and what its checks say.

    ``fd_scheme`` None takes the dtype's default (:data:`DEFAULT_FD_SCHEME`). ``"auto"``
    takes the central difference, and the forward one for the next
    :data:`AUTO_FORWARD_REFRESHES` refreshes whenever a central refresh finds the forward
    difference within :data:`AUTO_TOLERANCE` of it (its ``forward_gap``). A first refresh
    checked against the exact penalty gradient (``fd_check``) warns when the difference is
    farther than :data:`EXACT_CHECK_TOLERANCE` from it. No scheme in exact mode, which takes
    no ``fd_scheme`` or ``fd_step`` (``ValueError``).

    >>> schedule = FiniteDifferenceSchedule("finite_difference", None)
    >>> schedule.choose([torch.zeros(1)]), schedule.choose([torch.zeros(1, dtype=torch.float64)])
    ('central', 'forward')
    >>> schedule.judge("central", gap=0.001, error=-1.0)
    >>> schedule.choose([torch.zeros(1)])
    'forward'
    """

    def __init__(self, mode: str, fd_scheme: str | None, fd_step: float | None = None) -> None:
        self.mode = check_mode(mode)
        check_fd_step(fd_step)
        self.fd_scheme = check_fd_scheme(fd_scheme)
        check_fd_options(mode, fd_step=fd_step, fd_scheme=fd_scheme)
        #: ``"auto"``: refreshes left that take the forward difference.
        self.forward_refreshes = 0

    def choose(self, params: Sequence[Tensor]) -> str | None:
        """The scheme of this refresh, for ``params`` (their dtype picks the default)."""
        if self.mode != "finite_difference":
            return None
        scheme = self.fd_scheme
        if scheme is None and params:
            scheme = DEFAULT_FD_SCHEME.get(params[0].dtype)
        if scheme != "auto":
            return scheme
        if self.forward_refreshes > 0:
            self.forward_refreshes -= 1
            return "forward"
        return "central"

    def judge(self, scheme: str | None, gap: float, error: float) -> None:
        """Act on a refresh's checks: the forward difference's relative ``gap`` from the
        central one, the ``error`` from the exact penalty gradient (-1: not taken)."""
        if gap >= 0 and (self.fd_scheme or "auto") == "auto":
            self.forward_refreshes = AUTO_FORWARD_REFRESHES if gap <= AUTO_TOLERANCE else 0
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


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FiniteDifferenceWarning, stacklevel=4)


def _warn_unreplayed(counts: Counter[str]) -> None:
    names = ", ".join(f"{n} ({c}x)" for n, c in sorted(counts.items()))
    _warn_once(
        "unreplayed:" + ",".join(sorted(counts)),
        f"mode='finite_difference': the model calls piecewise operations whose activation "
        f"pattern cannot be replayed: {names}. Where the step moves one of their elements "
        "across a kink, the difference is off by the gradient's jump over the step. Check "
        "against mode='exact' (fisher_optim.penalty_gradient) or use mode='exact'",
    )


def _warn_mismatch(error: PatternMismatch) -> None:
    _warn_once(
        "mismatch",
        f"mode='finite_difference': the shifted forward did not repeat the unshifted one's "
        f"piecewise operations ({error}; data-dependent control flow?), so the difference "
        "was taken without the activation pattern and may cross kinks. Use mode='exact' if "
        "the model's control flow depends on its parameters",
    )


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off on ``device``'s type, so that the difference runs in full precision."""
    return torch.autocast(device.type, enabled=False)


def _difference(at: Tensor | None, shifted: Tensor | None, factor: Tensor) -> Tensor | None:
    """``(shifted − at) * factor``, a missing gradient counting as zero."""
    if at is None and shifted is None:
        return None
    if at is None:
        return shifted * factor
    if shifted is None:
        return -at * factor
    return (shifted - at).mul_(factor)


class _ForwardState:
    """What a forward reads besides the parameters and may change: the global RNG state of
    one device (dropout) and the model's buffers (a power iteration's vectors, a call
    counter). :meth:`restore` puts both back, so that every pass of a difference runs the
    same function as the first."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None
        self.buffers = [b for b in model.buffers() if b.numel()]
        with torch.no_grad():
            self.values = [b.detach().clone() for b in self.buffers]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.values)

"""How the penalty gradient ``∇_θ P`` is computed: exactly, or by a finite difference.

For ``P = ||g||²`` with ``g = ∇_θ L`` (labels frozen), ``∇_θ P = 2 H g`` where ``H = ∇²_θ L``
(FP paper, Sec. 4; a Hessian-vector product).

``mode="exact"``: double backprop. ``g`` is computed with ``create_graph=True`` and ``P`` is
differentiated again: one forward, one backward, one double backward (≈ 3x a gradient).

``mode="finite_difference"``: with ``v = g / ||g||`` and step ``r``,

    ∇_θ P = 2 ||g|| H v ≈ 2 ||g|| (∇_θ L(θ + r v) − ∇_θ L(θ)) / r,

two ordinary forward-backward passes (≈ 2x a gradient), the second at the shifted parameters
with the *same* labels (and the same dropout masks); the parameters are then restored bitwise.
For the input-gradient penalty (GPx, ``g = ∇_x L``) the inputs are shifted instead of θ and
``∇_θ P ≈ 2 ||g|| (∇_θ L(x + r v) − ∇_θ L(x)) / r``.

Choosing the scheme and the step (``benchmarks/fd_step.py``; the table, with the command, is
``docs/fd_step_measured.md``, rendered in the docs' science page). The error of the quotient
has three sources:

* truncation: ``O(r)`` for the forward difference, ``O(r²)`` for the central one
  ``(∇L(θ + r v) − ∇L(θ − r v)) / 2r`` (three gradients, ≈ 3x);
* rounding: ``O(ε ||∇L|| / r)``, ε the machine epsilon (about 6e-8 in float32);
* kinks: on ReLU / max-pool networks the gradient jumps where a unit changes sign. The exact
  mode returns the Hessian of the current linear region (ReLU'' = 0), the true gradient of P
  almost everywhere; a quotient whose step crosses a kink adds the jump divided by ``r``. The
  chance of a crossing grows with ``r`` (and with the number of units), so large steps fail.

Measured against the float64 exact gradient (relative L2 error, median and worst of 5 seeds,
batch 32; smooth = tanh/GELU/average pooling, MLPs and CNNs): in float32 the smooth networks
want a large step (forward at relative step 1e-4: 0.06–0.14%; central at 1e-3: 0.003–0.007%),
but at such steps the ReLU networks are far off (forward at 1e-4: the ReLU/max-pool CNN by
171%, median; at 1e-3 both ReLU nets by 58%–480%, cosine down to 0.18), and at 1e-5 and 3e-6
one ReLU-CNN seed in five still crosses a kink (errors of 12x–40x). At 1e-6 every ReLU run
stayed within 4%; there the forward difference's error is rounding: 2–4% on the ReLU nets,
4–12% on the smooth ones (cosine ≥ 0.992). At a step limited by kinks the central
difference gains nothing per pass: ``r/2`` central has the forward's rounding error and kink
exposure at ``r`` and costs 3 gradients instead of 2. So the default is the **forward**
difference (≈ 2x a gradient) at

    r = DEFAULT_FD_STEP[dtype] · max(1, ||θ||),  1e-6 in float32, 1e-8 in float64

(float64: relative error ≤ 1.6e-7 on all measured networks). In float32 the finite difference
is therefore a few-percent approximation of ``2 H g`` (19% on the tiny tanh CNN of the docs'
example, almost all of it rounding in the two gradients): use the exact mode when you need it
to the last digit. On a network known to be smooth, ``fd_step=1e-4 * max(1, ||θ||)`` brings the
forward difference to about 0.1%.

Parameters other than float32/float64 are refused (``TypeError``): in float16/bfloat16 no
step lies between rounding (ε ≈ 1e-3 / 8e-3) and truncation or kinks. The passes run in the
parameters' precision even under ``torch.autocast`` (autocast is switched off inside), so
training under autocast with float32 parameters works, with float32 differences. ``fd_step``
must be a finite number > 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisher_optim._logits import Likelihood, OutputFn
from fisher_optim._modules import math_attention as _math_attention
from fisher_optim._modules import trainable_parameters
from fisher_optim._targets import TargetMask
from fisher_optim.penalty import Batch, LossFn, PenaltyObjective, squared_norm

MODES = ("exact", "finite_difference")
#: Difference schemes of the finite-difference engine (see the module docstring).
FD_SCHEMES = ("forward", "central")
#: The scheme ``mode="finite_difference"`` uses.
DEFAULT_FD_SCHEME = "forward"

#: Relative finite-difference step per parameter dtype (times ``max(1, ||θ||)``).
DEFAULT_FD_STEP = {
    torch.float64: 1e-8,
    torch.float32: 1e-6,
}


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


def check_fd_dtypes(params: Sequence[Tensor]) -> None:
    """Refuse parameters the finite difference cannot resolve (anything but float32/64)."""
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
    """``grads[i] = ∂P/∂params[i]`` (None where P does not depend on it) and ``value = P``."""

    grads: list[Tensor | None]
    value: Tensor


def exact_penalty_gradient(objective: PenaltyObjective) -> PenaltyGradient:
    """``∇_θ ||∇L||²`` by double backprop.

    Attention through ``F.scaled_dot_product_attention`` runs on its math backend here: the
    fused (flash, memory-efficient) kernels have no double backward.
    """
    params = objective.params
    with _math_attention():
        loss = objective.loss()
    g = torch.autograd.grad(loss, objective.wrt(), create_graph=True, allow_unused=True)
    value = squared_norm(g)
    if not value.requires_grad:  # the gradient does not depend on θ (e.g. a linear loss)
        return PenaltyGradient([None] * len(params), value.detach())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return PenaltyGradient(list(grads), value.detach())


def finite_difference_penalty_gradient(
    objective: PenaltyObjective, step: float | None = None, scheme: str = DEFAULT_FD_SCHEME
) -> PenaltyGradient:
    """``∇_θ ||∇L||²`` by a difference of gradients along ``∇L`` (see the module docstring).

    ``scheme="forward"``: ``(∇L(θ + r v) − ∇L(θ)) / r``, two gradients; ``"central"``:
    ``(∇L(θ + r v) − ∇L(θ − r v)) / 2r``, three. Every pass runs in the parameters' precision
    (autocast off) and sees the dropout masks of the first.
    """
    if scheme not in FD_SCHEMES:
        raise ValueError(f"scheme must be one of {FD_SCHEMES}, got {scheme!r}")
    step = check_fd_step(step)
    params = objective.params
    check_fd_dtypes(params)
    shift_inputs = objective.inputs is not None
    rng = _RngState(params[0].device)

    with _no_autocast(params[0].device):
        loss = objective.loss()
        wrt = objective.wrt() if shift_inputs else []
        both = torch.autograd.grad(loss, [*wrt, *params], allow_unused=True)
        grads_at = list(both[len(wrt) :])
        direction = list(both[: len(wrt)]) if shift_inputs else grads_at
        value = squared_norm(direction).detach()
        norm = value.sqrt()
        r: Tensor | float = _default_fd_step_tensor(params) if step is None else step
        scale = r / norm.clamp_min(torch.finfo(norm.dtype).tiny)

        def grads_shifted(sign: float) -> list[Tensor | None]:
            rng.restore()  # every pass sees the same dropout masks as the first
            if shift_inputs:
                shifted = objective.loss(input_shift=direction[0] * (sign * scale))
                return list(torch.autograd.grad(shifted, params, allow_unused=True))
            present = [i for i, t in enumerate(grads_at) if t is not None]
            moved = [params[i] for i in present]
            saved = [p.detach().clone() for p in moved]
            with torch.no_grad():
                shift = torch._foreach_mul([grads_at[i] for i in present], sign * scale)
                torch._foreach_add_(moved, shift)
            try:
                return list(torch.autograd.grad(objective.loss(), params, allow_unused=True))
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(moved, saved)

        if scheme == "forward":
            ahead, behind, span = grads_shifted(1.0), grads_at, r
        else:
            ahead, behind, span = grads_shifted(1.0), grads_shifted(-1.0), 2 * r
    factor = 2 * norm / span
    grads = [_difference(b, a, factor) for b, a in zip(behind, ahead)]
    return PenaltyGradient(grads, value)


def default_fd_step(params: Sequence[Tensor]) -> float:
    """``DEFAULT_FD_STEP[dtype] * max(1, ||θ||)`` for the parameters' dtype."""
    return float(_default_fd_step_tensor(params))


def _default_fd_step_tensor(params: Sequence[Tensor]) -> Tensor:
    check_fd_dtypes(params)
    with torch.no_grad():
        theta = squared_norm(params).sqrt()
    return DEFAULT_FD_STEP[params[0].dtype] * theta.clamp_min(1.0)


def compute_penalty_gradient(
    objective: PenaltyObjective, mode: str = "exact", fd_step: float | None = None
) -> PenaltyGradient:
    """Dispatch to the engine named by ``mode`` (one of :data:`MODES`)."""
    if check_mode(mode) == "exact":
        return exact_penalty_gradient(objective)
    return finite_difference_penalty_gradient(objective, fd_step)


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
    target_mask: TargetMask | None = None,
    penalty_scale: str = "batch",
) -> list[Tensor | None]:
    """``∇_θ P`` for ``P = fisher_penalty(model, inputs, ...)``, one tensor per parameter.

    ``params`` defaults to the model's trainable parameters; an entry is None where ``P`` does
    not depend on that parameter. ``likelihood``, ``loss_fn``, ``target_mask``,
    ``penalty_scale``: as in
    :func:`~fisher_optim.penalty.fisher_penalty`. Nothing is written to ``.grad`` and
    BatchNorm running statistics are left as they were.

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
    batch = inputs if isinstance(inputs, Batch) else Batch((inputs,), {}, targets)
    if targets is not None:
        batch = Batch(batch.args, batch.kwargs, targets)
    objective = PenaltyObjective(
        model, batch, penalty=penalty,
        params=trainable_parameters(model) if params is None else params,
        output_fn=output_fn, loss_fn=loss_fn, generator=generator, likelihood=likelihood,
        target_mask=target_mask, penalty_scale=penalty_scale,
    )
    with torch.enable_grad():
        return compute_penalty_gradient(objective, mode, fd_step).grads


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


class _RngState:
    """The global RNG state of one device, to replay a forward's random draws (dropout)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


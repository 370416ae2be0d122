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

The forward difference has truncation error ``O(r)`` and rounding error ``O(ε ||∇L|| / r)``.
The default step is ``r = DEFAULT_FD_STEP[dtype] * max(1, ||θ||)``: a fixed fraction of the
weights' norm (1e-6 in float32, 1e-7 in float64), chosen by measuring the cosine between the two
modes over relative steps 1e-2 … 1e-8 (``benchmarks/fd_step.py``; the table is in the docs'
science page). On a small CNN with smooth activations (tanh, GELU, BatchNorm, average pooling)
the default step gives a cosine of 0.9995 (worst of 5 seeds 0.9992) in float32 and 1.0000 in
float64.

Kinks: on ReLU / max-pool networks the loss gradient is only piecewise smooth. The exact mode
returns the Hessian of the current linear region (ReLU'' = 0), which is the true gradient of P
almost everywhere; the difference quotient also sees every unit that changes sign within ``r``,
so it estimates the gradient of P smoothed at scale ``r``. The two then disagree unless ``r`` is
below the distance to the nearest kink, which in float32 is often not resolvable: on a small
ReLU / max-pool CNN the default float32 step gives a median cosine of 0.9999 over 5 seeds but
0.02 at worst (float64: 1.0000 on all 5). Use the
exact mode when you need ``2 H g`` to the last digit; the finite difference is the cheaper
regulariser the FP paper's slides describe.

Finite-difference passes run in the parameters' precision even under ``torch.autocast``: a
difference of two half-precision gradients is rounding noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisher_optim._logits import OutputFn
from fisher_optim._modules import trainable_parameters
from fisher_optim.penalty import Batch, LossFn, PenaltyObjective, squared_norm

MODES = ("exact", "finite_difference")

#: Relative finite-difference step per parameter dtype (times ``max(1, ||θ||)``).
DEFAULT_FD_STEP = {
    torch.float64: 1e-7,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


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
    objective: PenaltyObjective, step: float | None = None
) -> PenaltyGradient:
    """``∇_θ ||∇L||²`` by a forward difference of two gradients along ``∇L`` (see module)."""
    params = objective.params
    shift_inputs = objective.inputs is not None
    rng = _RngState(params[0].device)

    loss = objective.loss()
    wrt = objective.wrt() if shift_inputs else []
    both = torch.autograd.grad(loss, [*wrt, *params], allow_unused=True)
    grads_at = list(both[len(wrt) :])
    direction = list(both[: len(wrt)]) if shift_inputs else grads_at
    value = squared_norm(direction).detach()
    norm = value.sqrt()
    if step is None:
        step = _default_fd_step_tensor(params)  # on the device: no host sync per refresh
    scale = step / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    rng.restore()  # the second forward sees the same dropout masks as the first
    if shift_inputs:
        shifted_loss = objective.loss(input_shift=direction[0] * scale)
        grads_shifted = torch.autograd.grad(shifted_loss, params, allow_unused=True)
    else:
        present = [i for i, t in enumerate(grads_at) if t is not None]
        moved = [params[i] for i in present]
        saved = [p.detach().clone() for p in moved]
        with torch.no_grad():
            torch._foreach_add_(moved, torch._foreach_mul([grads_at[i] for i in present], scale))
        try:
            grads_shifted = torch.autograd.grad(objective.loss(), params, allow_unused=True)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(moved, saved)
    factor = 2 * norm / step
    grads = [_difference(a, b, factor) for a, b in zip(grads_at, grads_shifted)]
    return PenaltyGradient(grads, value)


def default_fd_step(params: Sequence[Tensor]) -> float:
    """``DEFAULT_FD_STEP[dtype] * max(1, ||θ||)`` for the parameters' dtype."""
    return float(_default_fd_step_tensor(params))


def _default_fd_step_tensor(params: Sequence[Tensor]) -> Tensor:
    with torch.no_grad():
        theta = squared_norm(params).sqrt()
    return DEFAULT_FD_STEP.get(params[0].dtype, 1e-3) * theta.clamp_min(1.0)


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
) -> list[Tensor | None]:
    """``∇_θ P`` for ``P = fisher_penalty(model, inputs, ...)``, one tensor per parameter.

    ``params`` defaults to the model's trainable parameters; an entry is None where ``P`` does
    not depend on that parameter. Nothing is written to ``.grad`` and BatchNorm running
    statistics are left as they were.

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
    batch = inputs if isinstance(inputs, Batch) else Batch((inputs,), {}, targets)
    if targets is not None:
        batch = Batch(batch.args, batch.kwargs, targets)
    objective = PenaltyObjective(
        model, batch, penalty=penalty,
        params=trainable_parameters(model) if params is None else params,
        output_fn=output_fn, loss_fn=loss_fn, generator=generator,
    )
    with torch.enable_grad():
        return compute_penalty_gradient(objective, mode, fd_step).grads


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """Restrict scaled-dot-product attention to the math backend (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no fused CPU attention either
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


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


"""Data parallelism (DDP): the penalty of the global batch, from each rank's slice of it.

Under ``DistributedDataParallel`` every rank holds the whole model and a slice of the global
batch, and the training gradient is the mean of the ranks' gradients,
``ḡ = (1/R) Σ_r g_r``. The penalty is that of the global batch, ``P = ||ḡ||²``, as one
process computes it on the whole batch and as FSDP2 computes it (:mod:`fisher_optim._fsdp`);
not the mean of the ranks' own penalties ``(1/R) Σ_r ||g_r||²``, which exceeds it by the
spread of the ``g_r`` and so grows with the number of ranks
(``E||g_r||² = ||ḡ||² + tr(Σ)·R/B`` for i.i.d. examples of covariance ``Σ``). Its gradient is
``∇P = 2 H̄ ḡ`` with ``H̄ = (1/R) Σ_r H_r``:

* the finite difference takes every gradient of its passes through :class:`ReplicatedPasses`,
  which averages it over the ranks (one all-reduce of the parameters' size per pass: two for
  the forward difference, three for the central one), so ``ḡ``, the shift ``r ḡ/||ḡ||`` and
  the difference are those of the global batch, bitwise the same on every rank;
* double backprop all-reduces ``ḡ`` (the gradient of the first backward, detached), takes
  ``H_r ḡ`` on each rank as the gradient of ``g_r · ḡ`` and all-reduces it: two all-reduces.

Each rank's surrogate loss is weighted by ``R n_r / Σ n`` (``n_r`` its rows with a target) so
that the mean over the ranks is the mean over the global batch's rows even when the slices
differ in size (:class:`~fisher_optim.penalty.PenaltyObjective`). For the input-gradient
penalty (GPx) the global ``P`` is a sum over the examples of the global batch, so
``P = (1/R²) Σ_r ||∇_{x_r} L_r||²`` and each rank's own penalty gradient is averaged and
divided by ``R``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ReplicatedPasses", "broadcast_seed", "mean_over_ranks", "sum_over_ranks"]


def mean_over_ranks(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """The mean of ``tensors`` over the ranks of ``group``, with one all-reduce (in at least
    float32; float64 tensors in float64); the tensors themselves for one rank."""
    return sum_over_ranks(tensors, group, mean=True)


def sum_over_ranks(tensors: Sequence[Tensor], group: Any, mean: bool = False) -> list[Tensor]:
    """The sum (``mean``: the mean) of ``tensors`` over the ranks of ``group``, with one
    all-reduce (in at least float32; float64 tensors in float64); the tensors themselves for
    one rank (or no group)."""
    tensors = list(tensors)
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1 or not tensors:
        return tensors
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    if mean:
        flat.div_(world)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


class ReplicatedPasses:
    """Gradients of replicated (DDP) parameters, averaged over the ranks of ``group``: the
    gradient of the global batch on every rank (see the module docstring). Same interface as
    :class:`~fisher_optim.differentiation.LocalPasses`; a parameter the loss does not reach
    gets a zero gradient, so that every rank reduces the same tensors."""

    def __init__(self, params: Sequence[Tensor], group: Any) -> None:
        self.params = list(params)
        self.group = group

    def tensors(self) -> list[Tensor]:
        return self.params

    def gradients(self, loss: Tensor) -> list[Tensor | None]:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        dense = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        return list(mean_over_ranks(dense, self.group))

    def total(self, t: Tensor) -> Tensor:
        return t  # the gradients are already the global batch's

    def wrap(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        return grads


def broadcast_seed(seed: int, group: Any, device: torch.device) -> int:
    """The seed of the group's first rank, broadcast to every rank of ``group`` (on
    ``device``, or the current CUDA device under NCCL)."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t)

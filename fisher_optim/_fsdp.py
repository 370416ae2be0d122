"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the penalty gradient on sharded parameters.

Under FSDP2 every parameter is a ``DTensor`` whose rows are split over the ranks. A forward
all-gathers each block's parameters into unsharded copies and the backward reduce-scatters
the gradient into the sharded ``.grad``, averaged over the ranks: after ``loss.backward()``
each rank holds its shard of the gradient of the *global* batch. Double backprop does not
pass these hooks (``torch.autograd.grad`` over the sharded parameters finds them unused in
the graph, which holds the unsharded copies), so ``mode="exact"`` is refused with a pointer
to ``mode="finite_difference"``. The finite difference (:mod:`fisher_optim.differentiation`) runs
unchanged on :class:`ShardedPasses`: each gradient is taken by ``backward()`` into the
sharded ``.grad`` (the training gradient is set aside and put back), the shift ``θ + r v`` is
applied to each rank's own shard, and the norms ``||g||``, ``||θ||`` are summed over the
ranks with one all-reduce, so every rank computes the same ``∇P`` of the global batch —
the penalty an unsharded model would get on the whole batch. HSDP (``fully_shard`` over a
2-D mesh of replicas × shards) works alike: the backward averages over every rank, and the
norms are summed over the shard dimension only (the replicas hold the same shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without FSDP2 / DTensor
    FSDPModule = DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

EXACT_UNSUPPORTED = (
    "mode='exact' (double backprop) is not supported on an FSDP2-sharded model: its "
    "all-gather/reduce-scatter hooks keep the sharded parameters out of the graph of the "
    "gradient, so their penalty gradient would be missing. Use mode='finite_difference' "
    "(two sharded backwards, or three with fd_scheme='central'; same objective, the "
    "global batch's), or mode='exact' with DistributedDataParallel instead of fully_shard"
)


INPUT_GRADIENT_UNSUPPORTED = (
    "penalty='input_gradient' is not supported on an FSDP2-sharded model (the input gradient "
    "of the global batch is split over the ranks); use another penalty"
)


def is_sharded(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in params)


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds) an FSDP2 ``fully_shard``-ed module."""
    if FSDPModule is None:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules()) or is_sharded(model.parameters())


def compute_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The ``MixedPrecisionPolicy.param_dtype`` of every ``fully_shard``-ed block (if set):
    the dtype the forward and backward run in."""
    dtypes = set()
    for m in model.modules():
        if FSDPModule is not None and isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None and group.mp_policy.param_dtype is not None:
                dtypes.add(group.mp_policy.param_dtype)
    return dtypes


class ShardedPasses:
    """Gradients of FSDP2-sharded parameters, shard by shard (see the module docstring).

    ``tensors()`` are the local shards (views: shifting them shifts the parameters),
    ``gradients(loss)`` the local shards of ``∇L`` of the global batch, ``total(t)`` sums a
    tensor of per-rank partial sums over the ranks, ``wrap`` turns local shards back into
    ``DTensor`` s laid out as the parameters.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        if not all(isinstance(p, DTensor) for p in params):
            raise TypeError(
                "some trainable parameters are sharded (DTensor) and some are not; shard the "
                "whole model with fully_shard (the root module last)"
            )
        meshes = {p.device_mesh for p in params}
        layouts = {tuple(p.placements) for p in params}
        shard_dims = set()
        for placements in layouts:
            dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
            others = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
            if len(dims) != 1 or others:
                shard_dims.add(None)
            else:
                shard_dims.add(dims[0])
        if len(meshes) != 1 or len(shard_dims) != 1 or None in shard_dims:
            raise ValueError(
                "the finite difference under FSDP2 supports parameters sharded over one "
                "dimension of one device mesh (fully_shard's default, or HSDP: a 2-D mesh of "
                "replicas and shards); tensor parallelism is not supported"
            )
        self.params = list(params)
        mesh = next(iter(meshes))
        # the shards' partial sums add up over the ranks of the shard dimension; replicas
        # (HSDP's other dimension) hold the same shards
        self.group = mesh.get_group(shard_dims.pop()) if mesh.ndim > 1 else mesh.get_group()

    def tensors(self) -> list[Tensor]:
        with torch.no_grad():
            return [p.to_local() for p in self.params]

    def gradients(self, loss: Tensor) -> list[Tensor | None]:
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            loss.backward()
            return [None if p.grad is None else p.grad.to_local() for p in self.params]
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def total(self, t: Tensor) -> Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def wrap(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        return [
            None
            if g is None
            else DTensor.from_local(
                g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            for g, p in zip(grads, self.params)
        ]


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor``; any other tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def global_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of each tensor, as one plain 1-D tensor; a sharded ``DTensor``'s norm is
    taken over all its shards (one all-reduce for all of them)."""
    if not is_sharded(tensors):
        return torch.stack(torch._foreach_norm(list(tensors)))
    local = torch.stack(
        [t.to_local().to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum() for t in tensors]
    )
    return ShardedPasses(tensors).total(local).sqrt()

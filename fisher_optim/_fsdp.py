"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the penalty gradient on sharded parameters.

Under FSDP2 every parameter is a ``DTensor`` whose rows are split over the ranks. A forward
all-gathers each block's parameters into unsharded copies and the backward reduce-scatters
the gradient into the sharded ``.grad``, averaged over the ranks: after ``loss.backward()``
each rank holds its shard of the gradient of the *global* batch. Double backprop does not
pass these hooks (``torch.autograd.grad`` over the sharded parameters finds them unused in
the graph, which holds the unsharded copies), so ``mode="exact"`` runs on gathered copies
instead: each parameter's ``full_tensor()``, the model called on them with FSDP2's forward
hooks off (:class:`GatheredForward`), ``2 H̄ ḡ`` of the global batch as under DDP, and each
rank keeps its shard; the full parameters are held on every rank during a refresh. The
finite difference (:mod:`fisher_optim.differentiation`) runs unchanged on
:class:`ShardedPasses`: each gradient is taken by ``backward()`` into the sharded
``.grad`` (the training gradient is set aside and put back), the shift ``θ + r v`` is
applied to each rank's own shard, and the norms ``||g||``, ``||θ||`` are summed over the
ranks with one all-reduce, so every rank computes the same ``∇P`` of the global batch —
the penalty an unsharded model would get on the whole batch. HSDP (``fully_shard`` over a
2-D mesh of replicas × shards) works alike: the backward averages over every rank, and the
norms are summed over the shard dimension only (the replicas hold the same shards).
``FisherNoiseSGD``'s per-example pass runs on the model with its parameters gathered in
place (:func:`gathered_parameters`, hooks off), and each rank keeps its part of the
full-size results (:func:`shard_like`, :func:`local_part`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without FSDP2 / DTensor
    FSDPModule = DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

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


def shard_like(t: Tensor, param: Tensor, src_data_rank: int | None = 0) -> Tensor:
    """The full tensor ``t`` laid out as the ``DTensor`` ``param`` (each rank its shard):
    scattered from rank ``src_data_rank``, or, with None, cut from each rank's own ``t``
    (no communication; ``t`` must then be the same on every rank)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=src_data_rank)


def local_part(param: Tensor, t: Tensor) -> Tensor:
    """The entries of the full tensor ``t`` (shaped like ``param``, after any leading
    dimensions) that this rank's shard of the ``DTensor`` ``param`` holds, cut without
    communication; ``t`` itself when ``param`` is not a ``DTensor``."""
    if DTensor is None or not isinstance(param, DTensor):
        return t
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    lead = t.dim() - param.dim()
    for d, (size, start) in enumerate(zip(shape, offset)):
        t = t.narrow(lead + d, start, size)
    return t


def mesh_group(params: Sequence[Tensor], owner: str) -> Any:
    """The ranks that hold the other slices of the global batch under FSDP2: the process
    group of the parameters' device mesh for a 1-D mesh, every rank for HSDP (each holds its
    own slice of the batch)."""
    mesh = next(p.device_mesh for p in params if hasattr(p, "device_mesh"))
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{owner}: the model is sharded over a {mesh.ndim}-D device mesh of "
            f"{mesh.size()} ranks inside a process group of {dist.get_world_size()}: HSDP "
            "is supported over a mesh of every rank (init_device_mesh(device, (replicas, "
            "shards)))"
        )
    return dist.group.WORLD


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


class GatheredForward(nn.Module):
    """The sharded ``model`` called on its gathered, full ``params`` (``{name: tensor}``),
    with FSDP2's forward hooks of every submodule off for the call: a plain forward on
    tensors of autograd's own, so double backprop reaches them. Relies on FSDP2 keeping its
    hooks in the modules' forward-hook registries (as torch 2.13 does; with its hooks left
    on, the call raises rather than returning a wrong gradient)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.wrapped = model  # a submodule, so that BatchNorm layers are found through it
        self.__dict__["full"] = params  # not parameters of this module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with fsdp_hooks_off(self.wrapped):
            return torch.func.functional_call(self.wrapped, self.full, args, kwargs)


@contextlib.contextmanager
def fsdp_hooks_off(model: nn.Module) -> Iterator[None]:
    """The forward (pre-)hooks of every submodule of ``model`` off for the block, FSDP2's
    included, and put back after it (hooks registered inside the block are the block's own
    to remove)."""
    saved = []
    for mod in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(mod, attr)
            saved.append((hooks, dict(hooks)))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, kept in saved:
            hooks.update(kept)


@contextlib.contextmanager
def gathered_subset(model: nn.Module, params: list[Tensor], owner: str) -> Iterator[list[Tensor]]:
    """``params`` (parameters of ``model``) as they are for the block, or, when they are
    sharded, their full ``Parameter`` s, the model called on them
    (:func:`gathered_parameters`)."""
    if not is_sharded(params):
        yield params
        return
    with gathered_parameters(model) as full:
        missing = [tuple(p.shape) for p in params if id(p) not in full]
        if missing:
            raise ValueError(
                f"{owner}: parameters of shapes {missing} are not sharded parameters of the "
                "FSDP2 model; shard the whole model with fully_shard (the root module last)"
            )
        yield [full[id(p)] for p in params]


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[dict[int, nn.Parameter]]:
    """The sharded ``model`` as a plain, unsharded one for the block: every ``DTensor``
    parameter registered in it is replaced by a ``Parameter`` of its gathered
    ``full_tensor()`` (one all-gather each, in module order, the same on every rank; the
    same ``requires_grad``; a tied parameter's slots share one), and FSDP2's forward hooks
    are off (:func:`fsdp_hooks_off`). So per-example passes keyed by parameter identity,
    ``torch.func`` over the module's own parameters and forward hooks all see an
    ordinary model; the full parameters are held on every rank for the block. Yields
    ``{id(sharded): full}``; each sharded ``Parameter`` is put back in its slots after."""
    full: dict[int, nn.Parameter] = {}
    slots: list[tuple[nn.Module, str, Tensor]] = []
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if DTensor is None or not isinstance(p, DTensor):
                    continue
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                slots.append((mod, name, p))
    for mod, name, p in slots:
        mod._parameters[name] = full[id(p)]
    try:
        with fsdp_hooks_off(model):
            yield full
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p

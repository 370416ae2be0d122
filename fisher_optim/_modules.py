"""Small helpers about modules: unwrapping, BatchNorm statistics, trainable parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind ``DistributedDataParallel``/``DataParallel`` wrappers.

    Running a forward through the wrapped module directly fires no DDP reducer hooks.
    A ``torch.compile``-d module is kept as it is (its forward stays compiled).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Run forwards that use batch statistics but never update running statistics.

    Every BatchNorm layer (``_BatchNorm`` subclasses, and any module with a
    ``track_running_stats`` flag and running buffers, such as ``GhostBatchNorm``) has
    ``track_running_stats`` switched off for the duration: in training mode it then
    normalises with the statistics of the current batch, exactly as the training forward
    does, and leaves ``running_mean``, ``running_var`` and ``num_batches_tracked``
    bitwise untouched. In eval mode it keeps using the running statistics.
    """
    switched = []
    for m in model.modules():
        is_bn = isinstance(m, _BatchNorm) or hasattr(m, "running_mean")
        if is_bn and m.training and getattr(m, "track_running_stats", False):
            m.track_running_stats = False
            switched.append(m)
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters that require a gradient, each once, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Restrict scaled-dot-product attention to the math backend (twice differentiable:
    the fused flash and memory-efficient kernels have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no fused CPU attention either
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])

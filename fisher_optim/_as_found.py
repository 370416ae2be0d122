"""Leaving a model exactly as found: after a measurement, and around a functional call.

A measurement must leave the model as it found it: the same ``Parameter`` objects, the same
buffers (bitwise), the same ``requires_grad`` flags, ``.grad`` and train/eval flags.
:func:`left_as_found` restores all of them, whatever the forwards in between did (a
module that counts its calls in a buffer, an exception halfway).

``torch.func`` transforms (``vmap(grad(f))``) need the model as a function of its
parameters. ``torch.func.functional_call`` does this by attribute path; on a model that
registers one module under several paths (``nn.ModuleList([block] * n)``,
``nn.Sequential(shared, act, shared)``) its restore can leave the functorch wrappers in
place of the original ``Parameter`` objects, silently breaking the model (an optimizer no
longer moves it, ``copy.deepcopy`` fails). :func:`substituted_parameters` swaps by
*identity* instead: every slot that holds a given ``Parameter`` object (in every module,
each module visited once) gets the replacement, and every slot gets its own original object
back afterwards, also when the call raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["left_as_found", "substituted_parameters"]


@contextlib.contextmanager
def left_as_found(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, every module's train/eval flag, ``Parameter`` objects and buffers
    (objects and values), and every parameter's ``requires_grad`` and ``.grad``.

    >>> import torch
    >>> bn = nn.BatchNorm1d(2)
    >>> with left_as_found(bn):
    ...     _ = bn(torch.randn(4, 2))  # training mode: updates the running statistics
    >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
    ([0.0, 0.0], 0)
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    params = [dict(m._parameters) for m in modules]
    buffers = [
        {k: (b, b.detach().clone()) for k, b in m._buffers.items() if b is not None}
        for m in modules
    ]
    grads = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        saved = []
        for m, flag, own, bufs in zip(modules, flags, params, buffers, strict=True):
            m.training = flag
            for name, p in own.items():
                if m._parameters.get(name) is not p:
                    m._parameters[name] = p
            for name, (b, value) in bufs.items():
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                saved.append((b, value))
        # kernels may update buffers in place without a version bump: compare values, all
        # at once (one host sync, not one per buffer), and restore those that changed
        for (b, value), changed in zip(saved, _changed(saved)):
            if changed:
                with torch.no_grad():
                    b.copy_(value)
        for p, requires_grad, grad in grads:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad


def _changed(pairs: list[tuple[Tensor, Tensor]]) -> list[bool]:
    """Whether each ``(current, saved)`` pair differs (a change of shape or dtype, or of any
    value, NaN counting as a change), read back with one host sync per device."""
    out = [b.shape != v.shape or b.dtype != v.dtype for b, v in pairs]
    by_device: dict[torch.device, list[int]] = {}
    for i, (b, _) in enumerate(pairs):
        if not out[i] and b.numel():
            by_device.setdefault(b.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([(pairs[i][0] != pairs[i][1]).any() for i in indices]).tolist()
        for i, flag in zip(indices, flags):
            out[i] = bool(flag)
    return out


@contextlib.contextmanager
def substituted_parameters(model: nn.Module, values: Mapping[int, Tensor]) -> Iterator[None]:
    """Within the block, each parameter ``p`` of ``model`` with ``id(p)`` in ``values`` reads
    as ``values[id(p)]`` wherever it is registered; afterwards the model holds exactly the
    ``Parameter`` objects it held before.

    >>> block = nn.Linear(2, 2)
    >>> net = nn.Sequential(block, nn.Tanh(), block)
    >>> w = block.weight
    >>> with substituted_parameters(net, {id(w): torch.zeros(2, 2)}):
    ...     float(net[2].weight.abs().sum())
    0.0
    >>> net[0].weight is w and net[2].weight is w
    True
    """
    slots = [
        (m, name, p)
        for m in model.modules()  # each module once, however often it is registered
        for name, p in m._parameters.items()
        if p is not None and id(p) in values
    ]
    try:
        for m, name, p in slots:
            m._parameters[name] = values[id(p)]  # type: ignore[assignment]
        yield
    finally:
        for m, name, p in reversed(slots):
            m._parameters[name] = p

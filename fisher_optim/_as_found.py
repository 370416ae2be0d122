"""Leaving a model exactly as found: after a measurement, and around a functional call.

A measurement must leave the model as it found it: the same ``Parameter`` objects with the
same values, the same buffers (bitwise), the same ``requires_grad`` flags, ``.grad`` and
train/eval flags. :func:`left_as_found` restores all of them, whatever the forwards in
between did (a module that counts its calls in a buffer, an exception halfway).

Parameter values: a forward may change a parameter in place. ``nn.Embedding`` and
``nn.EmbeddingBag`` with ``max_norm`` rescale the rows they look up (``embedding_renorm_``);
these weights (:func:`renormalising_parameters`) are copied on entry and written back on exit
(:func:`parameter_values_kept`), so a measurement sees the rows renormalised, as the
training forward would use them, and leaves them as found. Any other in-place change of a
parameter (one that bumps its version counter: a forward that clamps its weight, say) cannot
be undone without a copy of every parameter, and raises a ``RuntimeError`` naming the
parameter. (Parametrizations - ``nn.utils.parametrize``, ``weight_norm``, ``spectral_norm``
- change no parameter in place: their power-iteration vectors are buffers, restored above.)

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

__all__ = [
    "left_as_found",
    "parameter_values_kept",
    "renormalised_on_copies",
    "renormalising_parameters",
    "substituted_parameters",
]

#: Modules whose forward rescales rows of their ``weight`` in place when ``max_norm`` is set.
RENORMALISING = (nn.Embedding, nn.EmbeddingBag)

#: ``id``s of the parameters whose values an enclosing :func:`parameter_values_kept` block
#: will write back.
_KEPT: set[int] = set()


def renormalising_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights that a forward of ``model`` may change in place: those of the
    :data:`RENORMALISING` modules with ``max_norm`` set (each parameter once)."""
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, RENORMALISING) and m.max_norm is not None:
            w = m._parameters.get("weight")
            if w is not None:
                found.setdefault(id(w), w)
    return list(found.values())


@contextlib.contextmanager
def parameter_values_kept(
    model: nn.Module, *, check: bool = True, read_back: bool = True
) -> Iterator[None]:
    """Write back, on exit, the values of the :func:`renormalising_parameters` (when a forward
    changed them); with ``check``, then raise a ``RuntimeError`` if a forward changed any
    other parameter in place (its version counter moved), which cannot be undone. The check
    is skipped when the block raises (its exception is not masked), and with
    ``check=False`` (for code that moves parameters and restores them itself, as the
    finite-difference penalty engine does).

    ``read_back=False`` writes the values back without first reading whether they changed
    (no host sync; see :func:`left_as_found`).

    In nested blocks only the outermost writes back: all the forwards of one measurement
    (its passes are nested blocks) see the rows as the first renormalised them, which is
    how the training forward leaves them.

    >>> emb = nn.Embedding(3, 2, max_norm=1.0)
    >>> with torch.no_grad():
    ...     _ = emb.weight.fill_(5.0)
    >>> with parameter_values_kept(emb):
    ...     _ = emb(torch.tensor([0]))  # renormalises row 0 in place
    >>> emb.weight[0].tolist()
    [5.0, 5.0]
    """
    renormalising = renormalising_parameters(model)
    kept = [(p, p.detach().clone()) for p in renormalising if id(p) not in _KEPT]
    skip = {id(p) for p in renormalising}
    others = [(name, p) for name, p in model.named_parameters() if id(p) not in skip]
    versions = [(name, p, p._version) for name, p in others] if check else []
    _KEPT.update(id(p) for p, _ in kept)
    try:
        yield
    finally:
        _KEPT.difference_update(id(p) for p, _ in kept)
        with torch.no_grad():
            for p, value in kept:
                if not read_back or not torch.equal(p, value):
                    p.copy_(value)
    changed = [name for name, p, version in versions if p._version != version]
    if changed:
        raise RuntimeError(
            f"the model changed parameter(s) {changed} in place during a forward that "
            "fisher_optim ran for a measurement, and this cannot be undone: a measurement "
            "must leave the model as found. Move the in-place update out of forward() "
            "(e.g. into the training loop, after optimizer.step())"
        )


def renormalised_on_copies(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block the :func:`renormalising_parameters` read as differentiable copies
    (``p.clone()``, gradients flow to ``p``): a forward renormalises the copies, never the
    parameters. For a graph that outlives the block (the Hessian operator reuses one), where
    writing the values back after the forward would invalidate the tensors it saved.

    >>> emb = nn.Embedding(3, 2, max_norm=1.0)
    >>> with torch.no_grad():
    ...     _ = emb.weight.fill_(5.0)
    >>> with renormalised_on_copies(emb):
    ...     out = emb(torch.tensor([0]))
    >>> out.norm().item() <= 1.0, emb.weight[0].tolist()
    (True, [5.0, 5.0])
    """
    return substituted_parameters(
        model, {id(p): p.clone() for p in renormalising_parameters(model)}
    )


@contextlib.contextmanager
def left_as_found(
    model: nn.Module, *, check: bool = True, read_back: bool = True
) -> Iterator[None]:
    """Restore, on exit, every module's train/eval flag, ``Parameter`` objects and buffers
    (objects and values), every parameter's ``requires_grad`` and ``.grad``, and the values
    of the parameters a forward renormalises in place; with ``check``, raise if a forward
    changed another parameter in place (:func:`parameter_values_kept`).

    With ``read_back`` (the default) only the buffers and weights whose values changed are
    written (one host sync to find them), so the version counters of the others stay put
    (a pending backward may hold them). ``read_back=False`` writes them all back without
    reading anything: no host sync, for the optimizers' own passes inside ``step()``, after
    the user's backward.

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
        with parameter_values_kept(model, check=check, read_back=read_back):
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
        flags = _changed(saved) if read_back else [True] * len(saved)
        for (b, value), changed in zip(saved, flags):
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

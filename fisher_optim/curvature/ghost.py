"""The ghost pass: one batched forward and backward that hands every covered layer's input
and output gradient to a per-layer rule (:mod:`.layers`), the engine behind the per-example
gradient norms (:mod:`.per_example`) and the per-example Gram matrix (:mod:`.covariance`).

Which layers a rule may take is *established*, never guessed from shapes: a forward of the
first example alone (the probe) records each layer's input shape and, under a
``TorchFunctionMode``, every use of its parameters. A rule takes a layer only when the
layer is called once, its parameters are used exactly once and only inside its own forward
(a weight tied by ``F.linear(h, emb.weight)``, or used again by a parent, is not), its input
is computed from the batch, and the dimension holding the examples is known: the one
dimension that has ``B`` entries in the batch and 1 in the probe, with slice 0 equal to the
probe's input. So a Linear or LayerNorm fed ``[T, B, D]`` (``nn.TransformerEncoderLayer``
with ``batch_first=False``) is taken with the examples in dimension 1, also when ``T == B``;
a convolution over frames folded into its batch dimension is not taken. The probe's output
must equal the batch's first example's, and the last example run alone the batch's last
(:func:`.examples.check_examples_alone`): a tensor of the batch shared by all examples is
never cut silently, nor are examples that interact. Every other trainable parameter
is returned to the caller, which takes it per example (:func:`.examples.example_grads`).
The backward asks autograd for no weight gradients of the covered layers (it
differentiates w.r.t. the inputs of the first layers), so the whole costs about one
ordinary forward+backward; ``.grad`` is never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from .._as_found import left_as_found
from .._logits import OutputFn, as_logits
from .._modules import trainable_parameters
from ..batch import Batch, Inputs, batch_size, call_model, slice_batch
from .examples import check_examples_alone, renormalise_first, values_close
from .layers import LayerRule, rule_for

__all__ = ["CotangentFn", "LayerFn", "ghost_backward"]

CotangentFn = Callable[[Tensor], Iterable[Tensor]]
"""Maps detached logits ``[B, R, C]`` (R rows per example) to cotangents ``[B, R, C]``."""

LayerFn = Callable[[LayerRule, nn.Module, Tensor, Tensor], None]
"""``(rule, layer, input, output gradient)``, both with the examples in dimension 0."""


# --------------------------------------------------------------------------------------
# Which layers the rules may take
# --------------------------------------------------------------------------------------


def _uses_batch_statistics(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)


def _shared_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters registered in more than one module (tied weights)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, v in owners.items() if v > 1}


def _check_no_batch_statistics(model: nn.Module) -> None:
    bad = [name for name, m in model.named_modules() if _uses_batch_statistics(m)]
    if bad:
        raise ValueError(
            f"BatchNorm layers {bad} normalise with batch statistics, so per-example "
            "gradients are not defined; evaluate the model in eval mode with running "
            "statistics (fisher_optim._modules.eval_mode)"
        )


@dataclass
class _LayerState:
    rule: LayerRule
    calls: int = 0
    ok: bool = True
    saved: Tensor | None = None
    version: int = 0
    #: the dimension of the layer's input (and output) that indexes the examples
    batch_dim: int = 0
    #: the one-example probe: calls, whether its parameters were used once and only by
    #: the layer itself, its (detached) first input and its output's shape
    probe_calls: int = 0
    probe_ok: bool = False
    probe_input: Tensor | None = None
    probe_output_shape: tuple[int, ...] | None = None
    #: whether the input's first example is the probe's, still on the device
    pending: Tensor | None = None

    @property
    def taken(self) -> bool:
        """Whether the rule takes the layer (called once, its input checked)."""
        return self.ok and self.calls == 1


class _ParameterUses(TorchFunctionMode):
    """Records the innermost running module at every differentiable use (a torch call
    whose result requires grad) of the watched parameters."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.stack: list[nn.Module] = []
        self.uses: dict[int, list[nn.Module | None]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        hits = {id(a) for a in leaves if isinstance(a, Tensor) and id(a) in self.watched}
        if hits and any(isinstance(o, Tensor) and o.requires_grad for o in tree_leaves(out)):
            where = self.stack[-1] if self.stack else None
            for k in hits:
                self.uses.setdefault(k, []).append(where)
        return out


def _probe(model: nn.Module, inputs: Inputs, layers: dict[nn.Module, _LayerState]) -> Any:
    """Run the first example alone and record, per layer, its first input, its output's
    shape, and whether each of its trainable parameters is used exactly once, by the layer
    itself (a weight also used elsewhere, e.g. tied by ``F.linear(h, emb.weight)``, is not).
    Returns the model's output (checked against the batch's first example by the caller).

    Comparing a layer's shapes here with those in the batched forward tells which
    dimension holds the examples (the one that is ``n`` there and 1 here), whatever the
    layout (``[T, B, D]`` of a ``batch_first=False`` transformer included, also when
    ``T == B``); comparing the values checks that its first slice is this example.
    """
    watched = {id(p) for m in layers for p in m.parameters(recurse=False)}
    uses = _ParameterUses(watched)

    def push(m: nn.Module, args: Any) -> None:
        uses.stack.append(m)

    def pop(m: nn.Module, args: Any, out: Any) -> None:
        if uses.stack:
            uses.stack.pop()

    def record(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        st = layers[m]
        st.probe_calls += 1
        first = args[0] if args else None
        if isinstance(first, Tensor) and isinstance(out, Tensor):
            st.probe_input, st.probe_output_shape = first.detach().clone(), tuple(out.shape)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop, always_call=True))
    for m in layers:
        handles.append(m.register_forward_hook(record))
    try:
        with torch.enable_grad(), uses:
            out = call_model(model, slice_batch(inputs, 0, 1))
    finally:
        for h in handles:
            h.remove()
    for m, st in layers.items():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        st.probe_ok = st.probe_calls == 1 and all(uses.uses.get(id(p)) == [m] for p in own)
    return out


def _batch_dims(shape: tuple[int, ...], probe_shape: tuple[int, ...] | None, n: int) -> list[int]:
    """The dimensions that may index the ``n`` examples of a tensor of ``shape`` that had
    ``probe_shape`` for one example: the one dimension that is ``n`` here and 1 there
    (for ``n == 1``, every dimension of size 1)."""
    if probe_shape is None or len(shape) != len(probe_shape):
        return []
    if n == 1:
        return [d for d, s in enumerate(shape) if s == 1] if shape == probe_shape else []
    diffs = [d for d, (s, p) in enumerate(zip(shape, probe_shape, strict=True)) if s != p]
    if len(diffs) == 1 and shape[diffs[0]] == n and probe_shape[diffs[0]] == 1:
        return diffs
    return []


def _same_example(t: Tensor, probe: Tensor, dim: int) -> Tensor | None:
    """Whether slice 0 of ``t`` along ``dim`` is ``probe`` (up to rounding), as a 0-dim bool
    tensor on the device (read with the other layers', :meth:`_BatchedHooks.resolve`), or
    None when the shapes differ."""
    first = t.detach().narrow(dim, 0, 1)
    return values_close(first, probe) if first.shape == probe.shape else None


def _input_leaves(inputs: Inputs) -> tuple[Inputs, list[Tensor], set[int]]:
    """The batch with its float tensors as fresh leaves that require grad, those leaves, and
    the storages of its other tensors (integer ids)."""
    leaves: list[Tensor] = []
    storages: set[int] = set()

    def convert(t: Tensor) -> Tensor:
        if t.is_floating_point():
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        storages.add(t.untyped_storage().data_ptr())
        return t

    if isinstance(inputs, Tensor):
        return convert(inputs), leaves, storages

    def maybe(v: Any) -> Any:
        return convert(v) if isinstance(v, Tensor) else v

    if isinstance(inputs, Batch):
        args = tuple(maybe(a) for a in inputs.args)
        return Batch(args, {k: maybe(v) for k, v in inputs.kwargs.items()}), leaves, storages
    return {k: maybe(v) for k, v in inputs.items()}, leaves, storages


class _ReachesInputs:
    """Whether an autograd node's graph reaches one of the input leaves (memoised)."""

    def __init__(self, leaves: list[Tensor]) -> None:
        self.leaves = {id(t) for t in leaves}
        self.memo: dict[Any, bool] = {}

    def __call__(self, node: Any) -> bool:
        if node is None:
            return False
        stack = [(node, False)]
        while stack:  # post-order, iterative: deep networks exceed the recursion limit
            current, expanded = stack.pop()
            if current in self.memo and not expanded:
                continue
            variable = getattr(current, "variable", None)
            if variable is not None:  # AccumulateGrad: a leaf
                self.memo[current] = id(variable) in self.leaves
                continue
            children = [fn for fn, _ in current.next_functions if fn is not None]
            if expanded:
                self.memo[current] = any(self.memo[fn] for fn in children)
            else:
                self.memo[current] = False  # in progress (the graph has no cycles)
                stack.append((current, True))
                stack.extend((fn, False) for fn in children if fn not in self.memo)
        return self.memo[node]


def _derives_from_inputs(t: Tensor, reaches: _ReachesInputs, storages: set[int]) -> bool:
    """Whether ``t`` is computed from the model's batch: its rows are then examples. A tensor
    made inside the model (position ids, a parameter table) may have the batch's length by
    chance; its layer then takes the always-correct vmap route."""
    if t.is_floating_point():
        return t.grad_fn is not None and reaches(t.grad_fn) or id(t) in reaches.leaves
    return t.untyped_storage().data_ptr() in storages


# --------------------------------------------------------------------------------------
# The batched pass
# --------------------------------------------------------------------------------------


@dataclass
class _BatchedHooks:
    """The hooks of the batched forward and backward: each covered layer's input is
    checked and kept by its forward, its output gradient handed with it to ``on_layer``."""

    layers: dict[nn.Module, _LayerState]
    n: int
    leaves: list[Tensor]
    storages: set[int]
    on_layer: LayerFn
    #: the caller has checked the values for this model and layout: no host syncs
    checked: bool = False
    reaches: _ReachesInputs = field(init=False)

    def __post_init__(self) -> None:
        self.reaches = _ReachesInputs(self.leaves)

    def attach(self) -> list[RemovableHandle]:
        return [m.register_forward_hook(self.forward_hook) for m in self.layers]

    def forward_hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        st = self.layers[m]
        st.calls += 1
        first = args[0] if args else None
        dim = self._examples_dim(m, st, first, out)
        if dim is None:
            st.ok = False
            if (  # not taken (a tied embedding), but its output is still computed from the batch
                isinstance(first, Tensor)
                and isinstance(out, Tensor)
                and out.grad_fn is not None
                and _derives_from_inputs(first, self.reaches, self.storages)
            ):
                self.reaches.memo[out.grad_fn] = True
            return
        assert isinstance(first, Tensor) and isinstance(out, Tensor)
        st.batch_dim = dim
        st.saved, st.version = first.detach(), first._version
        if out.grad_fn is not None:  # the output's rows are examples too (ids -> embeddings)
            self.reaches.memo[out.grad_fn] = True
        if out.requires_grad:
            out.register_hook(lambda g, m=m: self.grad_hook(m, g))

    def _examples_dim(self, m: nn.Module, st: _LayerState, first: Any, out: Any) -> int | None:
        """The dimension of the layer's input and output that holds the examples, or None
        when the rule cannot take this call (see the module doc)."""
        if (
            st.calls > 1
            or not st.probe_ok
            or st.probe_input is None
            or not isinstance(first, Tensor)
            or not isinstance(out, Tensor)
            or not _derives_from_inputs(first, self.reaches, self.storages)
        ):
            return None
        limit = st.rule.batch_dim_limit(m, first.dim())
        out_dims = _batch_dims(tuple(out.shape), st.probe_output_shape, self.n)
        dims = [
            d
            for d in _batch_dims(tuple(first.shape), tuple(st.probe_input.shape), self.n)
            if d < limit and d in out_dims
        ]
        if not dims:
            return None
        if not self.checked:
            st.pending = _same_example(first, st.probe_input, dims[0])
            if st.pending is None:
                return None
        return dims[0]

    def resolve(self) -> None:
        """Read the layers' first-example checks back, all at once (one host read), and
        give up the layers whose input does not start with the probe's example."""
        pending = [st for st in self.layers.values() if st.pending is not None]
        if not pending:
            return
        device = pending[0].pending.device  # type: ignore[union-attr]
        oks = torch.stack([st.pending.to(device) for st in pending]).tolist()  # type: ignore[union-attr]
        for st, ok in zip(pending, oks, strict=True):
            st.ok, st.pending = st.ok and ok, None

    def grad_hook(self, m: nn.Module, g: Tensor) -> None:
        st = self.layers[m]
        if not st.taken or st.saved is None:
            return
        if st.saved._version != st.version:
            raise RuntimeError(
                f"the input of {type(m).__name__} was modified in place after its forward; "
                "per-example gradient norms need it unchanged"
            )
        a, g = st.saved, g.detach()
        if st.batch_dim:
            a, g = a.movedim(st.batch_dim, 0), g.movedim(st.batch_dim, 0)
        self.on_layer(st.rule, m, a, g)


def _cotangents_of(
    logits: Tensor,
    alone: dict[int, Any],
    n: int,
    cotangents: CotangentFn,
    output_fn: OutputFn | None,
    checked: bool = False,
) -> list[Tensor]:
    """The cotangents ``[N·R, C]`` for the batch's logits, once the rows of the examples run
    ``alone`` (the probe, the last example) are checked against them
    (:func:`.examples.check_examples_alone`; not if ``checked`` before)."""
    if n == 0 or logits.shape[0] % n:
        raise ValueError(
            f"{logits.shape[0]} logit rows for {n} examples: each example must "
            "own the same number of rows (the batch must be dimension 0)"
        )
    logits3 = logits.detach().reshape(n, -1, logits.shape[-1])
    if not checked:
        check_examples_alone(
            [(i, logits3[i], as_logits(a, output_fn).detach()) for i, a in alone.items()],
            n,
            "per-example gradients",
        )
    return [g.reshape(logits.shape) for g in cotangents(logits3)]


def _backward(
    logits: Tensor,
    gs: list[Tensor],
    leaves: list[Tensor],
    layers: dict[nn.Module, _LayerState],
    params: list[Tensor],
) -> list[Tensor]:
    """One backward per cotangent, w.r.t. the input leaves (and the weights of the taken
    embeddings, whose integer inputs have no gradient), which runs the layers' gradient
    hooks; returns the trainable parameters outside the taken layers that it reaches."""
    taken = [m for m, st in layers.items() if st.taken]
    covered = {id(p) for m in taken for p in m.parameters(recurse=False)}
    others = [p for p in params if id(p) not in covered]
    embeddings = [
        p
        for m in taken
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    ]
    targets = leaves + embeddings + others
    used: list[Tensor] = []
    if not (logits.requires_grad and targets):
        return used
    for k, g in enumerate(gs):
        grads = torch.autograd.grad(
            logits, targets, g, retain_graph=k + 1 < len(gs), allow_unused=True
        )
        if k == 0:
            start = len(leaves) + len(embeddings)
            used = [p for p, d in zip(others, grads[start:], strict=True) if d is not None]
    return used


def ghost_backward(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    on_layer: LayerFn,
    *,
    output_fn: OutputFn | None = None,
    trusted: Collection[nn.Module] | None = None,
    optimizer_pass: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """One forward and one backward per cotangent, handing each covered layer's rule,
    input and output gradient to ``on_layer`` (examples in dimension 0); the shared core
    of the ghost norms and of the per-example Gram matrix (:mod:`.covariance`).

    A layer with a rule (:func:`.layers.rule_for`) is *covered* when the layer is called
    once, its parameters are its own, used once and only by it (see :func:`_probe`), its
    input is computed from the batch, and the dimension holding the examples is known (see
    :func:`_batch_dims`). Returns the cotangents ``[N·R, C]`` (flat like the logits) and
    the trainable parameters outside the covered layers that the cotangents reach: the
    caller takes those per example (:func:`.examples.example_grads`). The model runs in
    the mode it is in and is left as found.

    ``trusted``: the layers that a checked call on this model and input layout covered
    (``FisherNoiseSGD`` checks once per layout and records them from ``on_layer``). Only
    those are then covered, and without what reads values back to the host: the
    first-example comparisons of the layers' inputs and of the logits, and the read-back of
    the buffers left as found (all are written back); the probe's structural checks (calls,
    parameter uses, shapes) still decide. ``optimizer_pass=True`` (an optimizer's own pass
    inside ``step()``, after the user's backward): a forward that changes a parameter in place
    (a clamp) is no error, as in training, and the buffers are written back without reading
    which changed (:func:`fisher_optim._as_found.left_as_found` ``check``, ``read_back``).
    """
    checked = trusted is not None
    host_reads = not (checked or optimizer_pass)
    as_found = {"check": host_reads, "read_back": host_reads}
    with left_as_found(model, **as_found):
        _check_no_batch_statistics(model)
        params = trainable_parameters(model)
        n = batch_size(inputs)
        shared = _shared_parameters(model)
        layers = {}
        for m in model.modules():
            rule = rule_for(m, shared)
            if rule is not None:  # watched either way: its output may be the batch's
                layers[m] = _LayerState(rule, ok=trusted is None or m in trusted)
        renormalise_first(model, inputs)
        alone: dict[int, Any] = {}
        # each forward starts from the buffers the batch's forward starts from
        with left_as_found(model, **as_found):
            if n > 0:
                alone[0] = _probe(model, inputs, layers)
        if n > 1 and not checked:  # the other end of the batch, for mixing examples
            with left_as_found(model, **as_found), torch.no_grad():
                alone[n - 1] = call_model(model, slice_batch(inputs, n - 1, n))
        inputs, leaves, storages = _input_leaves(inputs)
        hooks = _BatchedHooks(layers, n, leaves, storages, on_layer, checked)
        handles = hooks.attach()
        try:
            with torch.enable_grad():
                logits = as_logits(call_model(model, inputs), output_fn)
                hooks.resolve()
                gs = _cotangents_of(logits, alone, n, cotangents, output_fn, checked)
                used = _backward(logits, gs, leaves, layers, params)
        finally:
            for h in handles:
                h.remove()
            for st in layers.values():
                st.saved = st.probe_input = st.pending = None
    return gs, used

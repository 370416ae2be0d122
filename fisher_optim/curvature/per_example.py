"""Per-example gradient norms from one batched backward ("ghost norms").

For a layer ``z = W a + b`` applied at positions ``t = 1..T`` of example ``i`` (T = 1
for a dense layer on a flat input, the sequence length for a transformer, the number of
output pixels for a convolution after im2col), the per-example weight gradient is
``∇_W ℓ_i = Σ_t g_{it} a_{it}^T`` with ``g = ∂ℓ/∂z``. Its squared Frobenius norm needs
neither a per-example backward nor, when ``T² < d_in·d_out``, the gradient itself:

    ||Σ_t g_t a_t^T||²_F = Σ_{t,t'} (a_t·a_{t'}) (g_t·g_{t'})       (Gram form)

(Goodfellow, "Efficient per-example gradient computations", 2015; Li et al. 2022 "ghost
clipping"; Bu et al. 2023, "book-keeping"; Opacus fast gradient clipping). The layer
inputs are kept by forward hooks and the output gradients caught by tensor hooks during
one batched backward of ``Σ_i ℓ_i`` (a sum, so that nothing is scaled by 1/N). When the
Gram form is dearer than ``d_in·d_out`` per position, the per-example gradient is formed
instead: by a batched matrix product, or, for convolutions with at least 16 input channels
per group, as the weight gradient of one grouped convolution with the examples as groups
(Rochette et al., 2019), the backend's fastest kernel for it. Convolutions are unfolded
(im2col) by one strided copy. The backward asks autograd for no weight gradients of these
layers (it differentiates w.r.t. the inputs of the first layers), so the whole costs about
one ordinary forward+backward; ``.grad`` is never touched.

Covered exactly: ``Linear``, ``Conv1d``/``Conv2d`` (any stride, dilation, groups and
padding mode, by unfolding), ``Embedding`` (summing gradients of repeated tokens),
``BatchNorm`` in eval mode (running statistics), ``LayerNorm`` and ``GroupNorm`` (their
affine parameters). Which layers a rule may take is *established*, never guessed from
shapes: a forward of the first example alone (the probe) records each layer's input shape
and, under a ``TorchFunctionMode``, every use of its parameters. A rule takes a layer only
when the layer is called once, its parameters are used exactly once and only inside its own
forward (a weight tied by ``F.linear(h, emb.weight)``, or used again by a parent, is not),
and the dimension holding the examples is known: the one dimension that has ``B`` entries
in the batch and 1 in the probe, with slice 0 equal to the probe's input. So a Linear or
LayerNorm fed ``[T, B, D]`` (``nn.TransformerEncoderLayer`` with ``batch_first=False``) is
taken with the examples in dimension 1, also when ``T == B``; a convolution over frames
folded into its batch dimension is not taken. Every other trainable parameter (a module of
another type, a module called twice or registered twice, parameters shared between
modules or used outside their module) goes per example: by ``torch.func.vmap(grad)`` over
single examples, with the parameters substituted by identity
(:func:`fisher_optim._as_found.substituted_parameters`), or, for a model that ``vmap``
cannot run (data-dependent control flow, as in Hugging Face attention-mask code), one
example at a time. The model is left exactly as found
(:func:`fisher_optim._as_found.left_as_found`): the same ``Parameter`` objects, buffers,
flags and ``.grad``.

BatchNorm must normalise with running statistics (eval mode): with batch statistics
examples interact and per-example gradients are not defined. The public functions here
evaluate the model in eval mode and restore every module's flag afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .._as_found import left_as_found, substituted_parameters
from .._logits import OutputFn, as_logits, check_cross_entropy_outputs
from .._modules import eval_mode, trainable_parameters
from .._targets import TargetMask
from ._data import (
    CallBatch,
    Inputs,
    batch_size,
    call_model,
    check_positive_int,
    iter_chunks,
    labels_of,
    model_device,
    model_inputs,
    row_targets,
    rows_shape,
    slice_batch,
    to_device,
)
from .examples import check_first_example, same_values

__all__ = [
    "CotangentFn",
    "group_gradient_stats",
    "per_example_grad_norms",
    "per_example_sq_norms",
    "target_cotangents",
]

CotangentFn = Callable[[Tensor], Iterable[Tensor]]
"""Maps detached logits ``[B, R, C]`` (R rows per example) to cotangents ``[B, R, C]``."""

# Most elements a per-example gradient block may hold at once (bounds memory).
_MAX_BLOCK_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------
# Per-layer rules: (module, saved input, output gradient) -> squared norms [B]
# --------------------------------------------------------------------------------------


def _sq_norms(t: Tensor) -> Tensor:
    """``Σ_j t[i, j...]²`` per row ``i`` (one fused pass: no squared copy)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).square()


def _matmul_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """``||g_i^T a_i||²_F`` for ``a: [B, L, K]``, ``g: [B, L, O]`` (cheaper form chosen)."""
    n, length, k = a.shape
    o = g.shape[-1]
    if length == 1:
        return _sq_norms(a) * _sq_norms(g)
    if o * k <= length * (o + k):  # materialise the per-example gradient, in blocks
        step = max(1, _MAX_BLOCK_ELEMENTS // (o * k))
        return torch.cat(
            [
                _sq_norms(torch.bmm(g[s : s + step].transpose(1, 2), a[s : s + step]))
                for s in range(0, n, step)
            ]
        )
    step = max(1, _MAX_BLOCK_ELEMENTS // (length * length))
    out = []
    for s in range(0, n, step):
        aa = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))
        gg = torch.bmm(g[s : s + step], g[s : s + step].transpose(1, 2))
        out.append((aa * gg).sum((1, 2)))
    return torch.cat(out)


def _linear_rule(m: nn.Linear, a: Tensor, g: Tensor) -> Tensor:
    n = a.shape[0]
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    out = g.new_zeros(n)
    if m.weight.requires_grad:
        out = out + _matmul_sq_norms(a3, g3)
    if m.bias is not None and m.bias.requires_grad:
        out = out + _sq_norms(g3.sum(1))
    return out


def _unfold(
    a: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    """``F.unfold(a, kernel, dilation=dilation, stride=stride)`` (no padding) as one
    strided copy: an order of magnitude faster than ``im2col`` on CPU."""
    n, c, h, w = a.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = a.stride()
    view = a.as_strided(
        (n, c, kh, kw, ho, wo), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw), a.storage_offset()
    )
    return view.reshape(n, c * kh * kw, ho * wo)


def _grouped_conv_sq_norms(
    a: Tensor,
    g: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    groups: int,
) -> Tensor:
    """Per-example conv weight gradients as the weight gradient of one grouped convolution
    with the examples stacked as groups (Rochette et al. 2019): the backend's own kernel."""
    n, c, h, w = a.shape
    o = g.shape[1]
    step = max(1, _MAX_BLOCK_ELEMENTS // (o * (c // groups) * kernel[0] * kernel[1]))
    out = []
    for s in range(0, n, step):
        ab, gb = a[s : s + step], g[s : s + step]
        b = ab.shape[0]
        per_example = torch.nn.grad.conv2d_weight(
            ab.reshape(1, b * c, h, w),
            (b * o, c // groups, *kernel),
            gb.reshape(1, b * o, *gb.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=b * groups,
        )
        out.append(_sq_norms(per_example.reshape(b, -1)))
    return torch.cat(out)


def conv_operands(
    m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A convolution's input ``a`` and output gradient ``g`` as a 2-d convolution's, with its
    ``(kernel, dilation, stride, padding)``: padding other than symmetric zeros is applied to
    ``a`` as the module's forward does ('same' may be asymmetric), and a 1-d convolution is a
    2-d one of height 1."""
    kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
    if m.padding_mode == "zeros" and not isinstance(m.padding, str):
        padding = m.padding  # symmetric zero padding: left to the kernels
    else:
        pad = list(m._reversed_padding_repeated_twice)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a, padding = (F.pad(a, pad, mode=mode) if any(pad) else a), (0,) * len(kernel)
    if isinstance(m, nn.Conv1d):
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation = (1, *kernel), (1, *dilation)
        stride, padding = (1, *stride), (0, *padding)
    return a, g, kernel, dilation, stride, padding


def _conv_rule(m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    n, groups = a.shape[0], m.groups
    out = g.new_zeros(n)
    if m.weight.requires_grad:
        a, g, kernel, dilation, stride, padding = conv_operands(m, a, g)
        cin, cout = a.shape[1] // groups, g.shape[1] // groups
        k, length = cin * kernel[0] * kernel[1], g.shape[2] * g.shape[3]
        if cin >= 16 and cout * k <= length * (cout + k):
            # per-example gradients are the cheaper form and the backend forms them fastest
            out = out + _grouped_conv_sq_norms(a, g, kernel, dilation, stride, padding, groups)
        else:
            if any(padding):
                a = F.pad(a, [padding[1], padding[1], padding[0], padding[0]])
            cols = _unfold(a, kernel, dilation, stride)  # [B, Cin*k, L]
            cols = cols.reshape(n * groups, k, length).transpose(1, 2)  # [B*G, L, Cin/G*k]
            gg = g.reshape(n * groups, cout, length).transpose(1, 2)  # [B*G, L, Cout/G]
            out = out + _matmul_sq_norms(cols, gg).reshape(n, groups).sum(1)
    if m.bias is not None and m.bias.requires_grad:
        out = out + _sq_norms(g.flatten(2).sum(2))
    return out


def _affine_sq_norms(m: nn.Module, xhat: Tensor, g: Tensor, channels_first: bool) -> Tensor:
    """Per-example squared gradient norms of ``y = xhat * weight + bias``.

    ``channels_first``: the parameters index dimension 1 (BatchNorm, GroupNorm) rather than
    the trailing dimensions (LayerNorm).
    """
    n = g.shape[0]
    out = g.new_zeros(n)
    for p, t in ((m.weight, g * xhat), (m.bias, g)):
        if p is not None and p.requires_grad:
            if channels_first:  # sum over the spatial dims
                per = t.reshape(n, t.shape[1], -1).sum(2)
            else:  # sum over the positions
                per = t.reshape(n, -1, p.numel()).sum(1)
            out = out + _sq_norms(per)
    return out


def _batchnorm_rule(m: _BatchNorm, a: Tensor, g: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    rm, rv = m.running_mean, m.running_var
    assert rm is not None and rv is not None
    xhat = (a - rm.reshape(shape)) * torch.rsqrt(rv.reshape(shape) + m.eps)
    return _affine_sq_norms(m, xhat.to(g.dtype), g, True)


def _layernorm_rule(m: nn.LayerNorm, a: Tensor, g: Tensor) -> Tensor:
    xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    return _affine_sq_norms(m, xhat.to(g.dtype), g, False)


def _groupnorm_rule(m: nn.GroupNorm, a: Tensor, g: Tensor) -> Tensor:
    xhat = F.group_norm(a, m.num_groups, eps=m.eps)
    return _affine_sq_norms(m, xhat.to(g.dtype), g, True)


def _embedding_rule(m: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
    n, d = ids.shape[0], g.shape[-1]
    ids, g = ids.reshape(n, -1), g.reshape(n, -1, d)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
    # Rows of the per-example gradient: sum the output gradients of equal tokens.
    example = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    keys, inverse = torch.unique(example * m.num_embeddings + ids, return_inverse=True)
    rows = g.new_zeros(keys.numel(), d).index_add_(0, inverse.reshape(-1), g.reshape(-1, d))
    return g.new_zeros(n).index_add_(0, keys // m.num_embeddings, _sq_norms(rows))


_RULES: dict[type[nn.Module], Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.Linear: _linear_rule,
    nn.Conv1d: _conv_rule,
    nn.Conv2d: _conv_rule,
    nn.Embedding: _embedding_rule,
    nn.BatchNorm1d: _batchnorm_rule,
    nn.BatchNorm2d: _batchnorm_rule,
    nn.BatchNorm3d: _batchnorm_rule,
    nn.LayerNorm: _layernorm_rule,
    nn.GroupNorm: _groupnorm_rule,
}


def _uses_batch_statistics(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)


def _has_rule(
    m: nn.Module, shared: set[int], types: Container[type[nn.Module]] | None = None
) -> bool:
    """Whether ``m``'s own trainable parameters are all covered by a ghost-norm rule
    (of ``types``, default :data:`_RULES`) and none is registered in another module too."""
    own = [(name, p) for name, p in m.named_parameters(recurse=False) if p.requires_grad]
    if type(m) not in (_RULES if types is None else types) or not own:
        return False
    if any(name not in ("weight", "bias") or id(p) in shared for name, p in own):
        return False
    embedding = isinstance(m, nn.Embedding)
    return not (embedding and (m.max_norm is not None or m.scale_grad_by_freq))


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


# --------------------------------------------------------------------------------------
# Which layers the rules may take: the batch dimension and the parameter uses, by a probe
# --------------------------------------------------------------------------------------


@dataclass
class _LayerState:
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


def _batch_dim_limit(m: nn.Module, ndim: int) -> int:
    """The examples must sit in a dimension below this one for the rule of ``m``: the
    dimensions a layer mixes (features, channels, normalised dims) cannot hold them, and
    a convolution or batch/group norm takes its own dimension 0 as the batch."""
    if isinstance(m, nn.Linear):
        return ndim - 1
    if isinstance(m, nn.LayerNorm):
        return ndim - len(m.normalized_shape)
    if isinstance(m, nn.Embedding):
        return ndim
    return 1


def _same_example(t: Tensor, probe: Tensor, dim: int) -> bool:
    """Whether slice 0 of ``t`` along ``dim`` is ``probe`` (up to rounding)."""
    return same_values(t.detach().narrow(dim, 0, 1), probe)


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


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

    if isinstance(inputs, CallBatch):
        args = tuple(maybe(a) for a in inputs.args)
        return CallBatch(args, {k: maybe(v) for k, v in inputs.kwargs.items()}), leaves, storages
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


LayerFn = Callable[[nn.Module, Tensor, Tensor], None]
"""``(layer, input, output gradient)``, both with the examples in dimension 0."""


def ghost_backward(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    on_layer: LayerFn,
    *,
    output_fn: OutputFn | None = None,
    layer_types: Container[type[nn.Module]] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """One forward and one backward per cotangent, handing each covered layer's input and
    output gradient to ``on_layer`` (examples in dimension 0); the shared core of the ghost
    norms and of the per-example Gram matrix (:mod:`.covariance`).

    A layer of a type in ``layer_types`` (default: those with a norm rule) is *covered*
    when the layer is called once, its parameters are its own, used once and only by it
    (see :func:`_probe`), its input is computed from the batch, and the dimension holding
    the examples is known (see :func:`_batch_dims`). Returns the cotangents ``[N·R, C]``
    (flat like the logits) and the trainable parameters outside the covered layers that
    the cotangents reach: the caller takes those per example
    (:func:`per_example_fallback_grads`). The model runs in the mode it is in.
    """
    with left_as_found(model):
        return _ghost_backward(model, inputs, cotangents, on_layer, output_fn, layer_types)


def _ghost_backward(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    on_layer: LayerFn,
    output_fn: OutputFn | None,
    layer_types: Container[type[nn.Module]] | None,
) -> tuple[list[Tensor], list[Tensor]]:
    _check_no_batch_statistics(model)
    params = trainable_parameters(model)
    n = batch_size(inputs)
    shared = _shared_parameters(model)
    layers = {m: _LayerState() for m in model.modules() if _has_rule(m, shared, layer_types)}
    alone = _probe(model, inputs, layers) if n > 0 else None
    inputs, leaves, input_storages = _input_leaves(inputs)
    reaches_input = _ReachesInputs(leaves)

    def pre_hook(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # A layer fed by a tensor without history gets a leaf input, so that the backward
        # reaches it without asking for any weight gradient.
        first = args[0] if args else None
        if (
            layers[m].calls == 0
            and isinstance(first, Tensor)
            and first.is_floating_point()
            and not first.requires_grad
        ):
            leaf = first.detach().requires_grad_(True)
            leaves.append(leaf)
            return (leaf, *args[1:])
        return None

    def fwd_hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        st = layers[m]
        st.calls += 1
        first = args[0] if args else None
        if (
            st.calls > 1
            or not st.probe_ok
            or st.probe_input is None
            or not isinstance(first, Tensor)
            or not isinstance(out, Tensor)
            or not _derives_from_inputs(first, reaches_input, input_storages)
        ):
            st.ok = False
            return
        limit = _batch_dim_limit(m, first.dim())
        out_dims = _batch_dims(tuple(out.shape), st.probe_output_shape, n)
        dims = [
            d
            for d in _batch_dims(tuple(first.shape), tuple(st.probe_input.shape), n)
            if d < limit and d in out_dims
        ]
        if not dims or not _same_example(first, st.probe_input, dims[0]):
            st.ok = False
            return
        st.batch_dim = dims[0]
        st.saved, st.version = first.detach(), first._version
        if out.grad_fn is not None:  # the output's rows are examples too (ids -> embeddings)
            reaches_input.memo[out.grad_fn] = True
        if out.requires_grad:
            out.register_hook(lambda g, m=m: grad_hook(m, g))

    def grad_hook(m: nn.Module, g: Tensor) -> None:
        st = layers[m]
        if not (st.ok and st.calls == 1) or st.saved is None:
            return
        if st.saved._version != st.version:
            raise RuntimeError(
                f"the input of {type(m).__name__} was modified in place after its forward; "
                "per-example gradient norms need it unchanged"
            )
        a, g = st.saved, g.detach()
        if st.batch_dim:
            a, g = a.movedim(st.batch_dim, 0), g.movedim(st.batch_dim, 0)
        on_layer(m, a, g)

    handles = []
    for m in layers:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(fwd_hook))
    used: list[Tensor] = []
    gs: list[Tensor] = []
    try:
        with torch.enable_grad():
            logits = as_logits(call_model(model, inputs), output_fn)
            if n == 0 or logits.shape[0] % n:
                raise ValueError(
                    f"{logits.shape[0]} logit rows for {n} examples: each example must "
                    "own the same number of rows (the batch must be dimension 0)"
                )
            logits3 = logits.detach().reshape(n, -1, logits.shape[-1])
            check_first_example(
                logits3[0], as_logits(alone, output_fn).detach(), n, "per-example gradients"
            )
            gs = [g.reshape(logits.shape) for g in cotangents(logits3)]
            covered = {
                id(p)
                for m, st in layers.items()
                if st.ok and st.calls == 1
                for p in m.parameters(recurse=False)
            }
            others = [p for p in params if id(p) not in covered]
            embeddings = [
                p
                for m, st in layers.items()
                if isinstance(m, nn.Embedding) and st.ok and st.calls == 1
                for p in m.parameters(recurse=False)
                if p.requires_grad
            ]
            targets = leaves + embeddings + others
            if logits.requires_grad and targets:
                for k, g in enumerate(gs):
                    grads = torch.autograd.grad(
                        logits, targets, g, retain_graph=k + 1 < len(gs), allow_unused=True
                    )
                    if k == 0:
                        start = len(leaves) + len(embeddings)
                        used = [
                            p for p, d in zip(others, grads[start:], strict=True) if d is not None
                        ]
    finally:
        for h in handles:
            h.remove()
        for st in layers.values():
            st.saved = st.probe_input = None
    return gs, used


def per_example_sq_norms(
    model: nn.Module,
    inputs: Inputs,
    cotangents: CotangentFn,
    *,
    output_fn: OutputFn | None = None,
    fallback_chunk_size: int = 32,
) -> Tensor:
    """``Σ_k ||J_i^T G_k,i||²`` for each example ``i``: the engine behind the norms here.

    ``J_i = ∂ logits_i / ∂θ`` (θ = trainable parameters, logits of example ``i`` as ``R``
    rows of ``as_logits``) and ``G_1, G_2, ...`` are the cotangents ``[B, R, C]`` that
    ``cotangents(logits)`` yields for the detached logits ``[B, R, C]``. With
    ``G = ∂ℓ/∂logits`` this is the squared norm of the per-example gradient ``∇_θ ℓ_i``.
    One forward of the first example alone (the probe), one batched forward, one backward
    per cotangent (see the module doc for the method). The model is run in the mode it is
    in; BatchNorm must use running statistics. The model is left as found.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> sq = per_example_sq_norms(net, x, lambda logits: [torch.ones_like(logits)])
    >>> bool(torch.allclose(sq, 2 * (x.square().sum(1) + 1)))
    True
    """
    check_positive_int("fallback_chunk_size", fallback_chunk_size)
    params = trainable_parameters(model)
    n = batch_size(inputs)
    total = torch.zeros(n, dtype=torch.float64, device=model_device(model))

    def on_layer(m: nn.Module, a: Tensor, g: Tensor) -> None:
        total.add_(_RULES[type(m)](m, a, g).to(total.dtype))

    with left_as_found(model):
        gs, used = ghost_backward(model, inputs, cotangents, on_layer, output_fn=output_fn)
        gs3 = [g.reshape(n, -1, g.shape[-1]) for g in gs] if used else []
        for start, stop in iter_chunks(inputs, fallback_chunk_size):
            for g3 in gs3:
                grads = per_example_fallback_grads(model, inputs, g3, used, output_fn, start, stop)
                total[start:stop] += _sq_norms(grads).to(total.dtype)
    dtype = params[0].dtype if params else torch.get_default_dtype()
    return total.to(dtype)


def per_example_fallback_grads(
    model: nn.Module,
    inputs: Inputs,
    g3: Tensor,
    params: list[Tensor],
    output_fn: OutputFn | None,
    start: int,
    stop: int,
) -> Tensor:
    """``J_i^T G_i`` restricted to ``params``, flat ``[stop - start, Σ numel]``, for the
    examples ``start:stop``, ``g3`` the cotangent ``[N, R, C]``.

    By ``torch.func.vmap(grad)`` over single examples, the parameters substituted by
    identity (:func:`fisher_optim._as_found.substituted_parameters`, so a model with
    a module registered twice is left exactly as found); a model that ``vmap`` cannot run
    (data-dependent control flow, as in the attention-mask code of Hugging Face models)
    is run one example at a time instead. Exact either way.
    """
    x = slice_batch(inputs, start, stop)
    g = g3[start:stop]
    try:
        return _vmap_grads(model, x, g, params, output_fn)
    except Exception:  # noqa: BLE001 - the loop below reruns the model and re-raises its errors
        return _loop_grads(model, x, g, params, output_fn)


def _vmap_grads(
    model: nn.Module, x: Inputs, g: Tensor, params: list[Tensor], output_fn: OutputFn | None
) -> Tensor:
    from torch.func import grad, vmap

    keys = [id(p) for p in params]
    flat, spec = tree_flatten(model_inputs(x))
    slots = [i for i, v in enumerate(flat) if isinstance(v, Tensor)]

    def surrogate(theta: tuple[Tensor, ...], tensors: tuple[Tensor, ...], gi: Tensor) -> Tensor:
        leaves = list(flat)
        for i, t in zip(slots, tensors, strict=True):
            leaves[i] = t.unsqueeze(0)
        args, kwargs = tree_unflatten(leaves, spec)
        with substituted_parameters(model, dict(zip(keys, theta, strict=True))):
            out = model(*args, **kwargs)
        return (as_logits(out, output_fn) * gi).sum()

    theta = tuple(p.detach() for p in params)
    tensors = tuple(flat[i] for i in slots)
    with torch.no_grad():
        grads = vmap(grad(surrogate), in_dims=(None, 0, 0))(theta, tensors, g)
    return torch.cat([d.flatten(1) for d in grads], 1)


def _loop_grads(
    model: nn.Module, x: Inputs, g: Tensor, params: list[Tensor], output_fn: OutputFn | None
) -> Tensor:
    rows = []
    with torch.enable_grad():
        for i in range(g.shape[0]):
            logits = as_logits(call_model(model, slice_batch(x, i, i + 1)), output_fn)
            grads = torch.autograd.grad(
                logits, params, g[i].reshape(logits.shape), allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (d if d is not None else torch.zeros_like(p)).flatten()
                        for d, p in zip(grads, params, strict=True)
                    ]
                )
            )
    return torch.stack(rows)


# --------------------------------------------------------------------------------------
# Public measurements
# --------------------------------------------------------------------------------------


def target_cotangents(targets: Tensor, ignore_index: int = -100) -> CotangentFn:
    """Cotangents ``∂ℓ_i/∂logits`` of the cross-entropy with the given integer targets.

    ``ℓ_i`` is the mean cross-entropy over example ``i``'s rows whose target is not
    ``ignore_index`` (``F.cross_entropy`` of that example alone).
    """
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError("targets must be integer class indices")

    def make(logits: Tensor) -> Iterable[Tensor]:
        n, rows, _ = logits.shape
        if targets.numel() != n * rows:
            raise ValueError(
                f"{targets.numel()} targets for {n} examples with {rows} logit rows each"
            )
        y = targets.reshape(n, rows).to(logits.device)
        valid = y != ignore_index
        check_cross_entropy_outputs(logits, "the per-example gradient with targets")
        onehot = F.one_hot(torch.where(valid, y, 0), logits.shape[-1]).to(logits.dtype)
        weight = valid.to(logits.dtype) / valid.sum(1, keepdim=True).clamp_min(1)
        return [(torch.softmax(logits, -1) - onehot) * weight.unsqueeze(-1)]

    return make


def _row_target_cotangents(
    model: nn.Module, x: Inputs, targets: Tensor, target_mask: TargetMask | None = None
) -> CotangentFn:
    """:func:`target_cotangents` of the targets matched to the logit rows
    (:func:`~._data.row_targets`: a Hugging Face causal LM's shift, padding excluded)."""

    def make(logits: Tensor) -> Iterable[Tensor]:
        n, rows = logits.shape[:2]
        y = row_targets(model, x, targets, rows_shape(model, n, rows), target_mask)
        return target_cotangents(y)(logits)

    return make


def per_example_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor | None = None,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
    target_mask: TargetMask | None = None,
) -> Tensor:
    """``||∇_θ ℓ(x_i, y_i)||`` for every example, with the true targets ``y_i``.

    ``ℓ`` is the cross-entropy of example ``i`` alone (the mean over its rows for
    ``[B, T, C]`` logits, rows with target -100 ignored), θ the trainable parameters.
    ``targets`` default to those the batch carries (a Hugging Face dict's ``"labels"``, a
    :class:`fisher_optim.Batch`'s ``targets``); for a Hugging Face model its conventions
    apply (:mod:`fisher_optim._targets`: padding excluded, a causal LM's ``labels``
    shifted by one, as its own loss does); ``target_mask`` (called like the model, a
    boolean row mask) excludes rows for any other model. The model is evaluated in eval
    mode (BatchNorm with running statistics) and left exactly as found; ``.grad`` is not
    touched. Computed by ghost norms (see the module doc): one batched forward+backward
    per chunk of ``chunk_size`` examples.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> norms = per_example_grad_norms(net, x, y)
    >>> g = torch.autograd.grad(F.cross_entropy(net(x[:1]), y[:1]), list(net.parameters()))
    >>> bool(torch.isclose(norms[0], torch.cat([t.flatten() for t in g]).norm()))
    True
    """
    check_positive_int("chunk_size", chunk_size)
    device = model_device(model)
    targets = labels_of(inputs) if targets is None else targets
    if targets is None:
        raise ValueError(
            "per_example_grad_norms needs the true targets: pass targets=..., or a batch "
            "that carries them (a mapping with 'labels', a Batch with targets)"
        )
    inputs, targets = to_device(inputs, device), targets.to(device)
    n = batch_size(inputs)
    if targets.shape[:1] != (n,):
        raise ValueError(f"targets must have {n} rows (one per example), got {targets.shape}")
    out = []
    with eval_mode(model):
        for start, stop in iter_chunks(inputs, chunk_size):
            x = slice_batch(inputs, start, stop)
            cot = _row_target_cotangents(model, x, targets[start:stop], target_mask)
            out.append(per_example_sq_norms(model, x, cot, output_fn=output_fn))
    return torch.cat(out).clamp_min(0).sqrt()


def group_gradient_stats(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    groups: Tensor,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """Mean gradient of each group of examples: its norm, and cosines between groups.

    For group ``k`` with examples ``S_k``: ``ḡ_k = (1/|S_k|) Σ_{i∈S_k} ∇_θ ℓ(x_i, y_i)``.
    Returns ``{"group_ids": [...], "count": {k: |S_k|}, "grad_norm": {k: ||ḡ_k||},
    "cosine_matrix": Tensor[K, K]}`` plus ``"cosine"`` (a float) when there are exactly two
    groups - e.g. clean vs. noisy labels, as in Jastrzebski et al. (ICML 2021), Fig. 5/12,
    where memorised noisy examples have large, misaligned gradients. ``groups`` is a bool
    mask or integer group ids, one per example. Eval mode; the model is left as found.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> stats = group_gradient_stats(net, x, y, torch.tensor([1, 1, 1, 0, 0, 0]).bool())
    >>> stats["group_ids"], stats["count"]
    ([False, True], {False: 3, True: 3})
    """
    check_positive_int("chunk_size", chunk_size)
    device = model_device(model)
    inputs, targets = to_device(inputs, device), targets.to(device)
    n = batch_size(inputs)
    groups = torch.as_tensor(groups).to(device)
    if groups.shape != (n,) or groups.is_floating_point() or groups.is_complex():
        raise ValueError(
            f"groups must be a bool mask or integer ids of shape ({n},), got "
            f"{groups.dtype} {tuple(groups.shape)}"
        )
    ids = groups.unique().tolist()
    counts = {k: int((groups == k).sum()) for k in ids}
    params = trainable_parameters(model)
    sums = [[torch.zeros_like(p) for p in params] for _ in ids]
    with eval_mode(model), left_as_found(model), torch.enable_grad():
        alone = as_logits(call_model(model, slice_batch(inputs, 0, 1)), output_fn)
        for start, stop in iter_chunks(inputs, chunk_size):
            chunk = slice_batch(inputs, start, stop)
            logits = as_logits(call_model(model, chunk), output_fn)
            if start == 0:
                first = logits[: logits.shape[0] // stop]
                check_first_example(first, alone, n, "group_gradient_stats")
            shape = rows_shape(model, stop - start, logits.shape[0] // (stop - start))
            y = row_targets(model, chunk, targets[start:stop], shape).reshape(-1)
            check_cross_entropy_outputs(logits, "group_gradient_stats")
            losses = F.cross_entropy(logits, y, reduction="none").reshape(stop - start, -1)
            valid = (y != -100).reshape(stop - start, -1).to(losses.dtype)
            per_example = (losses * valid).sum(1) / valid.sum(1).clamp_min(1)
            present = [j for j, k in enumerate(ids) if bool((groups[start:stop] == k).any())]
            for r, j in enumerate(present):
                mask = (groups[start:stop] == ids[j]).to(per_example.dtype)
                loss = (per_example * mask).sum() / counts[ids[j]]
                grads = torch.autograd.grad(
                    loss, params, retain_graph=r + 1 < len(present), allow_unused=True
                )
                for acc, d in zip(sums[j], grads, strict=True):
                    if d is not None:
                        acc += d
    flat = torch.stack([torch.cat([t.flatten() for t in s]) for s in sums]).double()
    norms = flat.norm(dim=1)
    cosine = (flat @ flat.T) / (norms[:, None] * norms[None, :])
    stats: dict[str, Any] = {
        "group_ids": ids,
        "count": counts,
        "grad_norm": {k: float(v) for k, v in zip(ids, norms, strict=True)},
        "cosine_matrix": cosine,
    }
    if len(ids) == 2:
        stats["cosine"] = float(cosine[0, 1])
    return stats

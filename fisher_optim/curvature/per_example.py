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
affine parameters). Every other trainable parameter (a module of another type, a module
called twice, parameters shared between modules, a layer that does not see the batch
in dimension 0) is handled by ``torch.func.vmap(grad)`` over single examples. A
parameter that a parent module uses directly, outside its own module's forward (for
instance a weight tied by ``F.linear(h, emb.weight)``), is not seen by the hooks:
such models need the plain ``vmap`` route (tie weights by sharing the ``Parameter``
between modules instead, which is detected).

BatchNorm must normalise with running statistics (eval mode): with batch statistics
examples interact and per-example gradients are not defined. The public functions here
evaluate the model in eval mode and restore every module's flag afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._logits import OutputFn, as_logits
from .._modules import eval_mode, trainable_parameters
from ._data import (
    Inputs,
    batch_size,
    call_model,
    check_positive_int,
    iter_chunks,
    model_device,
    slice_batch,
    to_device,
)

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


def _conv_rule(m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    n, groups = a.shape[0], m.groups
    out = g.new_zeros(n)
    if m.weight.requires_grad:
        kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            padding = m.padding  # symmetric zero padding: left to the kernels below
        else:  # pad as the module's forward does ('same' may be asymmetric)
            pad = list(m._reversed_padding_repeated_twice)
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            a, padding = (F.pad(a, pad, mode=mode) if any(pad) else a), (0,) * len(kernel)
        if isinstance(m, nn.Conv1d):  # a 1-d convolution is a 2-d one of height 1
            a, g = a.unsqueeze(2), g.unsqueeze(2)
            kernel, dilation = (1, *kernel), (1, *dilation)
            stride, padding = (1, *stride), (0, *padding)
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


def _has_rule(m: nn.Module, shared: set[int]) -> bool:
    """Whether ``m``'s own trainable parameters are all covered by a ghost-norm rule."""
    own = [(name, p) for name, p in m.named_parameters(recurse=False) if p.requires_grad]
    if type(m) not in _RULES or not own:
        return False
    if any(name not in ("weight", "bias") or id(p) in shared for name, p in own):
        return False
    embedding = isinstance(m, nn.Embedding)
    return not (embedding and (m.max_norm is not None or m.scale_grad_by_freq))


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


@dataclass
class _LayerState:
    calls: int = 0
    ok: bool = True
    saved: Tensor | None = None
    version: int = 0


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
    return {k: convert(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}, leaves, storages


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
    One forward, one backward per cotangent (see the module doc for the method). The model
    is run in the mode it is in; BatchNorm must use running statistics.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> sq = per_example_sq_norms(net, x, lambda logits: [torch.ones_like(logits)])
    >>> bool(torch.allclose(sq, 2 * (x.square().sum(1) + 1)))
    True
    """
    check_positive_int("fallback_chunk_size", fallback_chunk_size)
    bad = [name for name, m in model.named_modules() if _uses_batch_statistics(m)]
    if bad:
        raise ValueError(
            f"BatchNorm layers {bad} normalise with batch statistics, so per-example "
            "gradients are not defined; evaluate the model in eval mode with running "
            "statistics (fisher_optim._modules.eval_mode)"
        )
    params = trainable_parameters(model)
    n = batch_size(inputs)
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared = {k for k, v in owners.items() if v > 1}
    layers = {m: _LayerState() for m in model.modules() if _has_rule(m, shared)}
    total = torch.zeros(n, dtype=torch.float64, device=model_device(model))
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
            or not isinstance(first, Tensor)
            or not isinstance(out, Tensor)
            or first.shape[:1] != (n,)
            or out.shape[:1] != (n,)
            or not _derives_from_inputs(first, reaches_input, input_storages)
        ):
            st.ok = False
            return
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
        total.add_(_RULES[type(m)](m, st.saved, g.detach()).to(total.dtype))

    handles = []
    for m in layers:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(fwd_hook))
    try:
        with torch.enable_grad():
            logits = as_logits(call_model(model, inputs), output_fn)
            if logits.shape[0] % n:
                raise ValueError(
                    f"{logits.shape[0]} logit rows for {n} examples: each example must "
                    "own the same number of rows (the batch must be dimension 0)"
                )
            logits3 = logits.detach().reshape(n, -1, logits.shape[-1])
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
            used: list[Tensor] = []
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
            st.saved = None
    if used:
        total += _vmap_sq_norms(model, inputs, gs, used, output_fn, fallback_chunk_size)
    dtype = params[0].dtype if params else torch.get_default_dtype()
    return total.to(dtype)


def _vmap_sq_norms(
    model: nn.Module,
    inputs: Inputs,
    gs: list[Tensor],
    params: list[Tensor],
    output_fn: OutputFn | None,
    chunk_size: int,
) -> Tensor:
    """Per-example squared norms of ``J_i^T G_i`` restricted to ``params``, by vmap."""
    from torch.func import functional_call, grad, vmap

    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    subset = {names[id(p)]: p.detach() for p in params}
    n = batch_size(inputs)
    gs3 = [g.reshape(n, -1, g.shape[-1]) for g in gs]

    def surrogate(theta: dict[str, Tensor], x: Inputs, g: Tensor) -> Tensor:
        if isinstance(x, Tensor):
            out = functional_call(model, theta, (x.unsqueeze(0),))
        else:
            out = functional_call(model, theta, (), {k: v.unsqueeze(0) for k, v in x.items()})
        return (as_logits(out, output_fn) * g).sum()

    per_example = vmap(grad(surrogate), in_dims=(None, 0, 0))
    result = []
    with torch.no_grad():
        for start, stop in iter_chunks(inputs, chunk_size):
            x = slice_batch(inputs, start, stop)
            acc = torch.zeros(stop - start, dtype=torch.float64, device=gs[0].device)
            for g in gs3:
                for d in per_example(subset, x, g[start:stop]).values():
                    acc += d.flatten(1).square().sum(1).to(acc.dtype)
            result.append(acc)
    return torch.cat(result)


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
        onehot = F.one_hot(torch.where(valid, y, 0), logits.shape[-1]).to(logits.dtype)
        weight = valid.to(logits.dtype) / valid.sum(1, keepdim=True).clamp_min(1)
        return [(torch.softmax(logits, -1) - onehot) * weight.unsqueeze(-1)]

    return make


def per_example_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    output_fn: OutputFn | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """``||∇_θ ℓ(x_i, y_i)||`` for every example, with the true targets ``y_i``.

    ``ℓ`` is the cross-entropy of example ``i`` alone (the mean over its rows for
    ``[B, T, C]`` logits, rows with target -100 ignored), θ the trainable parameters. The
    model is evaluated in eval mode (BatchNorm with running statistics) and left exactly as
    found; ``.grad`` is not touched. Computed by ghost norms (see the module doc): one
    batched forward+backward per chunk of ``chunk_size`` examples.

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
    inputs, targets = to_device(inputs, device), targets.to(device)
    n = batch_size(inputs)
    if targets.shape[:1] != (n,):
        raise ValueError(f"targets must have {n} rows (one per example), got {targets.shape}")
    out = []
    with eval_mode(model):
        for start, stop in iter_chunks(inputs, chunk_size):
            x = slice_batch(inputs, start, stop)
            cot = target_cotangents(targets[start:stop])
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
    with eval_mode(model), torch.enable_grad():
        for start, stop in iter_chunks(inputs, chunk_size):
            logits = as_logits(call_model(model, slice_batch(inputs, start, stop)), output_fn)
            y = targets[start:stop].reshape(-1)
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

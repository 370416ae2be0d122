"""Per-layer rules: everything the library knows about one layer family, in one place.

A rule takes a layer's input ``a`` and the gradient ``g = ∂(Σ_i ℓ_i)/∂z`` of its output
``z``, both with the examples in dimension 0, and gives from them alone

* ``sq_norms(m, a, g)``: ``||∇_θ ℓ_i||²`` over the layer's own trainable parameters, for
  each example ``i`` (``[B]``), and
* ``gram(m, a, g, out)``: ``out[i, j] += <∇_θ ℓ_i, ∇_θ ℓ_j>`` (the ``[B, B]`` Gram matrix),
* ``sq_grads(m, a, g)``: ``Σ_i ∇_p ℓ_i ⊙ ∇_p ℓ_i`` for each trainable parameter ``p``
  (shaped like ``p``; ``B · diag F`` for the Fisher noise of :class:`~fisher_optim.FisherNoiseSGD`),

besides what it accepts (``accepts(m)``: e.g. not an ``Embedding`` with ``max_norm``) and
where the examples may sit (``batch_dim_limit(m, ndim)``: the dimensions a layer mixes,
its features or channels, cannot hold them). For a linear map ``z_t = W a_t + b`` applied
at positions ``t = 1..T`` the per-example weight gradient is ``Σ_t g_t a_t^T``, and

    ||Σ_t g_t a_t^T||²_F = Σ_{t,t'} (a_t·a_{t'}) (g_t·g_{t'}),
    <Σ_t g_it a_it^T, Σ_t g_jt a_jt^T> = Σ_{t,t'} (a_it·a_jt') (g_it·g_jt')

(Goodfellow 2015; Li et al. 2022 "ghost clipping"; Bu et al. 2023), and at ``T = 1``

    Σ_i (g_i a_i^T) ⊙ (g_i a_i^T) = Σ_i (g_i ⊙ g_i)(a_i ⊙ a_i)^T = (g ⊙ g)^T (a ⊙ a)

(one matrix product, no per-example tensor; Dangel et al. 2020, BackPACK's
``SumGradSquared``), or, when ``T²`` is
dearer than ``d_in·d_out``, the per-example gradients are formed in blocks of bounded
memory: by a batched matrix product, or for convolutions with at least 16 input channels
per group as the weight gradient of one grouped convolution with the examples as groups
(Rochette et al. 2019). Convolutions of any stride, dilation, groups and padding mode are
unfolded (im2col) by one strided copy.

Adding a layer family is one entry in :data:`RULES`: a :class:`LayerRule` whose three
methods give the norms, the Gram matrix and the sums of squares (the normalisation layers
need only ``normalised``, the rest is :class:`AffineRule`'s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["MAX_BLOCK_ELEMENTS", "RULES", "LayerRule", "rule_for", "sq_norms", "trained"]

#: Most elements a per-example gradient block may hold at once (bounds memory).
MAX_BLOCK_ELEMENTS = 1 << 25

BlockFn = Callable[[int, int], Tensor]
"""``(start, stop) -> [stop - start, d]``: per-example gradients of examples start:stop."""


def sq_norms(t: Tensor) -> Tensor:
    """``Σ_j t[i, j...]²`` per row ``i`` (one fused pass: no squared copy)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).square()


def _add_outer(per: Tensor, out: Tensor) -> None:
    """``out += P P^T`` for the per-example gradients ``P`` (rows) of one parameter."""
    per = per.flatten(1)
    out += (per @ per.T).to(out.dtype)


def _trains(p: Tensor | None) -> bool:
    return p is not None and p.requires_grad


def trained(m: nn.Module) -> list[Tensor]:
    """``m``'s trainable ``weight`` and ``bias``, in that order: the parameters a rule's
    :meth:`LayerRule.sq_grads` answers for."""
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if _trains(p)]


def sum_sq_rows(n: int, dim: int, block: BlockFn) -> Tensor:
    """``Σ_i J_i ⊙ J_i`` (``[dim]``) of the rows of ``J`` (``[n, dim]``), formed ``block``
    by block (at most :data:`MAX_BLOCK_ELEMENTS` elements at once)."""
    step = max(1, MAX_BLOCK_ELEMENTS // max(1, dim))
    total: Tensor | None = None
    for s in range(0, n, step):
        part = block(s, min(s + step, n)).square().sum(0)
        total = part if total is None else total + part
    assert total is not None
    return total


# --------------------------------------------------------------------------------------
# Linear maps at T positions: norms and Gram matrices
# --------------------------------------------------------------------------------------


def matmul_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """``||g_i^T a_i||²_F`` for ``a: [B, L, K]``, ``g: [B, L, O]`` (cheaper form chosen)."""
    n, length, k = a.shape
    o = g.shape[-1]
    if length == 1:
        return sq_norms(a) * sq_norms(g)
    if o * k <= length * (o + k):  # materialise the per-example gradient, in blocks
        step = max(1, MAX_BLOCK_ELEMENTS // (o * k))
        return torch.cat(
            [
                sq_norms(torch.bmm(g[s : s + step].transpose(1, 2), a[s : s + step]))
                for s in range(0, n, step)
            ]
        )
    step = max(1, MAX_BLOCK_ELEMENTS // (length * length))
    out = []
    for s in range(0, n, step):
        aa = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))
        gg = torch.bmm(g[s : s + step], g[s : s + step].transpose(1, 2))
        out.append((aa * gg).sum((1, 2)))
    return torch.cat(out)


def matmul_sq_grads(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_i (g_i^T a_i) ⊙ (g_i^T a_i)`` (``[O, K]``) for ``a: [B, L, K]``, ``g: [B, L, O]``:
    ``(g ⊙ g)^T (a ⊙ a)`` at ``L = 1``, else the per-example gradients in blocks."""
    n, length, k = a.shape
    o = g.shape[-1]
    if length == 1:
        return g[:, 0].square().T @ a[:, 0].square()

    def grads(s: int, e: int) -> Tensor:
        return torch.bmm(g[s:e].transpose(1, 2), a[s:e]).flatten(1)

    return sum_sq_rows(n, o * k, grads).reshape(o, k)


def dense_gram(n: int, dim: int, block: BlockFn, out: Tensor) -> None:
    """``out += J J^T`` with the rows of ``J`` (``[n, dim]``) produced ``block`` by block.

    One block of at most :data:`MAX_BLOCK_ELEMENTS` elements; when all n rows fit, ``J``
    is formed once, otherwise each pair of blocks is formed (the later block of a pair is
    recomputed: memory stays bounded at the price of extra work).
    """
    step = max(1, MAX_BLOCK_ELEMENTS // max(1, dim))
    if step >= n:
        j = block(0, n)
        out += (j @ j.T).to(out.dtype)
        return
    for s in range(0, n, step):
        e = min(s + step, n)
        ji = block(s, e)
        out[s:e, s:e] += (ji @ ji.T).to(out.dtype)
        for s2 in range(e, n, step):
            e2 = min(s2 + step, n)
            cross = (ji @ block(s2, e2).T).to(out.dtype)
            out[s:e, s2:e2] += cross
            out[s2:e2, s:e] += cross.T


def _pairwise_linear_gram(a: Tensor, g: Tensor, out: Tensor) -> None:
    """``out[i, j] += Σ_{t,t'} (a_it·a_jt')(g_it·g_jt')`` for ``a: [N, T, K]``, ``g: [N, T, O]``."""
    n, length = a.shape[:2]
    if length == 1:
        a2, g2 = a[:, 0], g[:, 0]
        out += ((a2 @ a2.T) * (g2 @ g2.T)).to(out.dtype)
        return
    step = max(1, MAX_BLOCK_ELEMENTS // (n * length * length))
    for s in range(0, n, step):
        e = min(s + step, n)
        aa = torch.einsum("itk,jsk->ijts", a[s:e], a)
        gg = torch.einsum("ito,jso->ijts", g[s:e], g)
        out[s:e] += (aa * gg).sum((2, 3)).to(out.dtype)


def matmul_gram(a: Tensor, g: Tensor, out: Tensor) -> None:
    """Gram of the per-example gradients ``g_i^T a_i`` (``a: [N, T, K]``, ``g: [N, T, O]``),
    by inner products or by forming the gradients, whichever costs fewer operations."""
    n, length, k = a.shape
    o = g.shape[-1]
    dense = n * length * k * o + n * n * k * o
    pairwise = n * n * length * length * (k + o)
    if length == 1 or pairwise <= dense:
        _pairwise_linear_gram(a, g, out)
    else:
        dense_gram(n, k * o, lambda s, e: torch.bmm(g[s:e].transpose(1, 2), a[s:e]).flatten(1), out)


# --------------------------------------------------------------------------------------
# Convolutions: unfolded, or as one grouped convolution
# --------------------------------------------------------------------------------------


def unfold(
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


class ConvGeometry(NamedTuple):
    """A 2-d convolution's ``kernel``, ``dilation``, ``stride``, symmetric zero ``padding``
    and ``groups``: what the per-example weight gradients of a convolution need."""

    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int

    def sizes(self, a: Tensor, g: Tensor) -> tuple[int, int, int, int]:
        """``(C_in/G, C_out/G, C_in/G·k, L)`` for input ``a`` and output gradient ``g``."""
        cin, cout = a.shape[1] // self.groups, g.shape[1] // self.groups
        return cin, cout, cin * self.kernel[0] * self.kernel[1], g.shape[2] * g.shape[3]

    def columns(self, a: Tensor) -> Tensor:
        """The unfolded input ``[B, C_in·k, L]`` (padded as the convolution pads)."""
        (ph, pw) = self.padding
        if ph or pw:
            a = F.pad(a, [pw, pw, ph, ph])
        return unfold(a, self.kernel, self.dilation, self.stride)

    def grouped_grads(self, a: Tensor, g: Tensor) -> Tensor:
        """Per-example weight gradients ``[B, C_out·C_in/G·k]`` as the weight gradient of
        one grouped convolution with the examples stacked as groups (Rochette et al. 2019):
        the backend's fastest kernel for it."""
        b, c = a.shape[:2]
        o = g.shape[1]
        per_example = torch.nn.grad.conv2d_weight(
            a.reshape(1, b * c, *a.shape[2:]),
            (b * o, c // self.groups, *self.kernel),
            g.reshape(1, b * o, *g.shape[2:]),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=b * self.groups,
        )
        return per_example.reshape(b, -1)


def conv_operands(
    m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, ConvGeometry]:
    """A convolution's input ``a`` and output gradient ``g`` as a 2-d convolution's, with its
    geometry: padding other than symmetric zeros is applied to ``a`` as the module's forward
    does ('same' may be asymmetric), and a 1-d convolution is a 2-d one of height 1."""
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
    return a, g, ConvGeometry(kernel, dilation, stride, padding, m.groups)  # type: ignore[arg-type]


class LayerRule:
    """What the library knows about one layer family (see the module doc). Subclasses give
    :meth:`sq_norms` and :meth:`gram`; the defaults accept every layer of ``types`` and
    need the examples in dimension 0."""

    types: tuple[type[nn.Module], ...] = ()

    def accepts(self, m: nn.Module) -> bool:
        """Whether the rule is exact for ``m`` (beyond its type)."""
        return True

    def batch_dim_limit(self, m: nn.Module, ndim: int) -> int:
        """The examples must sit in a dimension below this one of an ``ndim``-d input."""
        return 1

    def sq_norms(self, m: Any, a: Tensor, g: Tensor) -> Tensor:
        """``[B]``: the squared norms of the per-example gradients of ``m``'s parameters."""
        raise NotImplementedError

    def gram(self, m: Any, a: Tensor, g: Tensor, out: Tensor) -> None:
        """``out [B, B] += `` the Gram matrix of those per-example gradients."""
        raise NotImplementedError

    def sq_grads(self, m: Any, a: Tensor, g: Tensor) -> list[Tensor]:
        """``Σ_i ∇_p ℓ_i ⊙ ∇_p ℓ_i`` (shaped like ``p``) for each ``p`` of :func:`trained`
        ``(m)``: the sums of squares of the per-example gradients, entry by entry."""
        raise NotImplementedError


class LinearRule(LayerRule):
    """``nn.Linear`` on ``[..., d_in]``: positions are all dimensions but the last."""

    types = (nn.Linear,)

    def batch_dim_limit(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    @staticmethod
    def _operands(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        n = a.shape[0]
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])

    def sq_norms(self, m: nn.Linear, a: Tensor, g: Tensor) -> Tensor:
        a3, g3 = self._operands(a, g)
        out = g.new_zeros(a.shape[0])
        if _trains(m.weight):
            out = out + matmul_sq_norms(a3, g3)
        if _trains(m.bias):
            out = out + sq_norms(g3.sum(1))
        return out

    def gram(self, m: nn.Linear, a: Tensor, g: Tensor, out: Tensor) -> None:
        a3, g3 = self._operands(a, g)
        if _trains(m.weight):
            matmul_gram(a3, g3, out)
        if _trains(m.bias):
            _add_outer(g3.sum(1), out)

    def sq_grads(self, m: nn.Linear, a: Tensor, g: Tensor) -> list[Tensor]:
        """Weight ``Σ_i (Σ_t g_it a_it^T)^{⊙2}``, bias ``Σ_i (Σ_t g_it)^{⊙2}``."""
        a3, g3 = self._operands(a, g)
        out = []
        if _trains(m.weight):
            out.append(matmul_sq_grads(a3, g3))
        if _trains(m.bias):
            out.append(g3.sum(1).square().sum(0))
        return out


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d``: any stride, dilation, groups and padding mode."""

    types = (nn.Conv1d, nn.Conv2d)

    def sq_norms(self, m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
        out = g.new_zeros(a.shape[0])
        if _trains(m.weight):
            out = out + self._weight_sq_norms(*conv_operands(m, a, g))
        if _trains(m.bias):
            out = out + sq_norms(g.flatten(2).sum(2))
        return out

    @staticmethod
    def _weight_sq_norms(a: Tensor, g: Tensor, geo: ConvGeometry) -> Tensor:
        n, groups = a.shape[0], geo.groups
        cin, cout, k, length = geo.sizes(a, g)
        if cin >= 16 and cout * k <= length * (cout + k):
            # per-example gradients are the cheaper form and the backend forms them fastest
            step = max(1, MAX_BLOCK_ELEMENTS // (groups * cout * k))
            return torch.cat(
                [
                    sq_norms(geo.grouped_grads(a[s : s + step], g[s : s + step]))
                    for s in range(0, n, step)
                ]
            )
        cols = geo.columns(a).reshape(n * groups, k, length).transpose(1, 2)  # [B*G, L, k]
        gg = g.reshape(n * groups, cout, length).transpose(1, 2)  # [B*G, L, Cout/G]
        return matmul_sq_norms(cols, gg).reshape(n, groups).sum(1)

    def gram(self, m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor, out: Tensor) -> None:
        if _trains(m.weight):
            dim, block = self._weight_block(*conv_operands(m, a, g))
            dense_gram(a.shape[0], dim, block, out)
        if _trains(m.bias):
            _add_outer(g.flatten(2).sum(2), out)

    @staticmethod
    def _weight_block(a: Tensor, g: Tensor, geo: ConvGeometry) -> tuple[int, BlockFn]:
        """The dimension and a block function of the per-example weight gradients."""
        cin, cout, k, length = geo.sizes(a, g)
        groups = geo.groups

        def unfolded(s: int, e: int) -> Tensor:
            b = e - s
            cols = geo.columns(a[s:e]).reshape(b * groups, k, length)
            gg = g[s:e].reshape(b * groups, cout, length)
            return torch.bmm(gg, cols.transpose(1, 2)).reshape(b, -1)

        def grouped(s: int, e: int) -> Tensor:  # the backend's grouped-convolution kernel
            return geo.grouped_grads(a[s:e], g[s:e])

        return groups * cout * k, grouped if cin >= 16 else unfolded

    def sq_grads(self, m: nn.Conv1d | nn.Conv2d, a: Tensor, g: Tensor) -> list[Tensor]:
        """Weight ``Σ_i (∇_W ℓ_i)^{⊙2}`` from the per-example weight gradients formed in
        blocks (:meth:`_weight_block`, in the weight's layout), bias ``Σ_i (Σ_t g_it)^{⊙2}``."""
        out = []
        if _trains(m.weight):
            dim, block = self._weight_block(*conv_operands(m, a, g))
            out.append(sum_sq_rows(a.shape[0], dim, block).reshape(m.weight.shape))
        if _trains(m.bias):
            out.append(g.flatten(2).sum(2).square().sum(0))
        return out


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` (not with ``max_norm`` or ``scale_grad_by_freq``): the gradient of
    a row is the sum of the output gradients of its token's occurrences."""

    types = (nn.Embedding,)

    def accepts(self, m: nn.Module) -> bool:
        return m.max_norm is None and not m.scale_grad_by_freq  # type: ignore[union-attr]

    def batch_dim_limit(self, m: nn.Module, ndim: int) -> int:
        return ndim

    @staticmethod
    def _operands(m: nn.Embedding, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        n, d = ids.shape[0], g.shape[-1]
        ids, g = ids.reshape(n, -1), g.reshape(n, -1, d)
        if m.padding_idx is not None:
            g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    @staticmethod
    def _rows(m: nn.Embedding, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of the per-example gradients that may be nonzero, ``[B·T, D]`` (the
        output gradients of equal tokens of one example summed; the unused tail zero), and
        their keys ``example · V + token``. By a sort, not ``torch.unique``: nothing is read
        back to the host."""
        n, d = g.shape[0], g.shape[-1]
        example = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
        keys, order = torch.sort((example * m.num_embeddings + ids).reshape(-1))
        starts = torch.ones_like(keys, dtype=torch.bool)
        starts[1:] = keys[1:] != keys[:-1]
        segment = starts.cumsum(0) - 1  # the distinct key each occurrence adds to
        rows = g.new_zeros(keys.numel(), d).index_add_(0, segment, g.reshape(-1, d)[order])
        return rows, keys.new_zeros(keys.numel()).scatter_(0, segment, keys)

    def sq_norms(self, m: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
        ids, g = self._operands(m, ids, g)
        rows, keys = self._rows(m, ids, g)
        return g.new_zeros(g.shape[0]).index_add_(0, keys // m.num_embeddings, sq_norms(rows))

    def sq_grads(self, m: nn.Embedding, ids: Tensor, g: Tensor) -> list[Tensor]:
        """``Σ_i (row v of ∇ℓ_i)^{⊙2}``: each example's rows squared, added at their token
        (no ``[B, V, D]`` tensor)."""
        ids, g = self._operands(m, ids, g)
        rows, keys = self._rows(m, ids, g)
        out = g.new_zeros(m.weight.shape)
        return [out.index_add_(0, keys % m.num_embeddings, rows.square())]

    def gram(self, m: nn.Embedding, ids: Tensor, g: Tensor, out: Tensor) -> None:
        """``out[i, j] += Σ_{t,t'} [id_it = id_jt'] (g_it·g_jt')``: rows of equal tokens meet."""
        ids, g = self._operands(m, ids, g)
        n, length = ids.shape
        step = max(1, MAX_BLOCK_ELEMENTS // (n * length * length))
        for s in range(0, n, step):
            e = min(s + step, n)
            same = (ids[s:e, None, :, None] == ids[None, :, None, :]).to(g.dtype)
            gg = torch.einsum("ito,jso->ijts", g[s:e], g)
            out[s:e] += (same * gg).sum((2, 3)).to(out.dtype)


class AffineRule(LayerRule):
    """``y = normalised(x) * weight + bias``: the normalisation layers. A subclass gives
    ``normalised`` (``x̂`` from the input, with no parameters) and ``channels_first``
    (the parameters index dimension 1, not the trailing dimensions)."""

    channels_first = True

    def normalised(self, m: Any, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _per_example(self, m: Any, a: Tensor, g: Tensor) -> list[Tensor]:
        """The per-example gradients ``[B, numel]`` of the trainable weight and bias."""
        n = g.shape[0]
        xhat = self.normalised(m, a).to(g.dtype)
        out = []
        for p, t in ((m.weight, g * xhat), (getattr(m, "bias", None), g)):
            if _trains(p):
                if self.channels_first:  # sum over the spatial dims
                    out.append(t.reshape(n, t.shape[1], -1).sum(2))
                else:  # sum over the positions
                    out.append(t.reshape(n, -1, p.numel()).sum(1))
        return out

    def sq_norms(self, m: Any, a: Tensor, g: Tensor) -> Tensor:
        out = g.new_zeros(g.shape[0])
        for per in self._per_example(m, a, g):
            out = out + sq_norms(per)
        return out

    def gram(self, m: Any, a: Tensor, g: Tensor, out: Tensor) -> None:
        for per in self._per_example(m, a, g):
            _add_outer(per, out)

    def sq_grads(self, m: Any, a: Tensor, g: Tensor) -> list[Tensor]:
        return [
            per.square().sum(0).reshape(p.shape)
            for per, p in zip(self._per_example(m, a, g), trained(m), strict=True)
        ]


class BatchNormRule(AffineRule):
    """``BatchNorm1d/2d/3d`` with running statistics (eval mode; with batch statistics
    examples interact and per-example gradients are not defined)."""

    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def normalised(self, m: _BatchNorm, a: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        rm, rv = m.running_mean, m.running_var
        assert rm is not None and rv is not None
        return (a - rm.reshape(shape)) * torch.rsqrt(rv.reshape(shape) + m.eps)


class LayerNormRule(AffineRule):
    types = (nn.LayerNorm,)
    channels_first = False

    def batch_dim_limit(self, m: nn.Module, ndim: int) -> int:
        return ndim - len(m.normalized_shape)  # type: ignore[arg-type]

    def normalised(self, m: nn.LayerNorm, a: Tensor) -> Tensor:
        return F.layer_norm(a, m.normalized_shape, eps=m.eps)


class GroupNormRule(AffineRule):
    types = (nn.GroupNorm,)

    def normalised(self, m: nn.GroupNorm, a: Tensor) -> Tensor:
        return F.group_norm(a, m.num_groups, eps=m.eps)


class RMSNormRule(LayerNormRule):
    """``nn.RMSNorm`` (Zhang & Sennrich 2019): ``y = x / rms(x) * weight``, no bias."""

    types = (nn.RMSNorm,)

    def normalised(self, m: nn.RMSNorm, a: Tensor) -> Tensor:
        return F.rms_norm(a, m.normalized_shape, eps=m.eps)


#: The rule of every covered layer type (exact types: a subclass may change the math).
RULES: dict[type[nn.Module], LayerRule] = {
    t: rule
    for rule in (
        LinearRule(),
        ConvRule(),
        EmbeddingRule(),
        BatchNormRule(),
        LayerNormRule(),
        GroupNormRule(),
        RMSNormRule(),
    )
    for t in rule.types
}


def rule_for(m: nn.Module, shared: set[int]) -> LayerRule | None:
    """The rule that covers ``m``'s own trainable parameters, or None: ``m`` must be of a
    type in :data:`RULES` that accepts it, with trainable parameters, all named ``weight``
    or ``bias`` and none registered in another module too (``shared``: their ``id``s)."""
    rule = RULES.get(type(m))
    own = [(name, p) for name, p in m.named_parameters(recurse=False) if p.requires_grad]
    if rule is None or not own or not rule.accepts(m):
        return None
    if any(name not in ("weight", "bias") or id(p) in shared for name, p in own):
        return None
    return rule

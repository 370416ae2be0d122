r"""Ghost BatchNorm: batch statistics of small virtual batches inside a large batch.

Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization gap in
large batch training of neural networks", NeurIPS 2017, Sec. 4 (Algorithm 1); Wen et al.
(AISTATS 2020) use it for every large-batch run. In training, the batch ``x`` of ``N`` examples
(``[N, C, *]``, channels in dimension 1) is split along dimension 0 into consecutive chunks of
``virtual_batch_size`` examples, the last one possibly smaller (``x.split(virtual_batch_size)``),
and chunk ``k`` is normalised with its own statistics:

    y = (x − μ_k) / sqrt(σ²_k + eps) · γ + β,    μ_k, σ²_k the mean and biased variance of
    chunk k over its examples and spatial positions, per channel.

The running statistics evolve exactly as ``K`` consecutive BatchNorm calls on the chunks would
(``F.batch_norm`` chunk by chunk): with momentum ``m``,
``r_K = (1 − m)^K r_0 + Σ_k m (1 − m)^{K−k} s_k`` with ``s_k = μ_k`` for the mean and the
unbiased variance ``σ²_k · n_k / (n_k − 1)`` for the variance (``n_k`` values per channel in
chunk ``k``); with ``momentum=None`` (cumulative average) ``r_K = (t r_0 + Σ_k s_k)/(t + K)``,
``t`` the number of batches tracked before. ``num_batches_tracked`` grows by ``K``. The closed
forms equal the sequential updates up to floating-point rounding.

Batch statistics are used (per chunk) in training mode and whenever there are no running
statistics; running statistics otherwise (eval mode: exactly ``nn.BatchNorm``). Switching
``track_running_stats`` off at run time (as :func:`fisher_optim._modules.frozen_batchnorm_stats`
does) keeps the per-chunk normalisation and updates nothing. A batch of at most
``virtual_batch_size`` examples is handled by ``F.batch_norm`` itself (bitwise BatchNorm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fisher_optim.validate import check_positive_int


class GhostBatchNorm(_BatchNorm):
    r"""BatchNorm over virtual batches of ``virtual_batch_size`` examples, for ``[N, C, *]`` inputs.

    Drop-in for ``nn.BatchNorm1d``/``2d``/``3d`` (same parameters, buffers and ``state_dict``
    keys); see the module docstring for the exact normalisation and running-statistics rule.

    Args:
        num_features: ``C``, the number of channels (dimension 1 of the input).
        virtual_batch_size: examples per ghost batch (≥ 1; the last chunk may be smaller, and
            every chunk needs more than one value per channel in training).
        eps, momentum, affine, track_running_stats, device, dtype: as in ``nn.BatchNorm2d``.

    >>> _ = torch.manual_seed(0)
    >>> gbn, bn = GhostBatchNorm(3, virtual_batch_size=4), nn.BatchNorm2d(3)
    >>> x = torch.randn(8, 3, 5, 5)
    >>> y = gbn(x)
    >>> torch.allclose(y[:4], bn(x[:4]), atol=1e-6) and torch.allclose(y[4:], bn(x[4:]), atol=1e-6)
    True
    >>> torch.allclose(gbn.running_mean, bn.running_mean), int(gbn.num_batches_tracked)
    (True, 2)
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_positive_int("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape [N, C, *], got {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        has_running = self.running_mean is not None and self.running_var is not None
        use_batch_stats = self.training or not has_running
        if not use_batch_stats or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)  # one chunk (or eval): exactly nn.BatchNorm
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels in dimension 1, got {tuple(input.shape)}"
            )
        update = self.training and self.track_running_stats and has_running
        vbs = self.virtual_batch_size
        n_full = input.shape[0] // vbs
        parts = [input[: n_full * vbs].reshape(n_full, vbs, *input.shape[1:])]
        if input.shape[0] > n_full * vbs:
            parts.append(input[n_full * vbs :].unsqueeze(0))
        outputs, means, variances = [], [], []
        for part in parts:  # [K, b, C, *]: the full chunks at once, then the remainder
            y, mean, var = self._normalize_chunks(part)
            outputs.append(y.reshape(-1, *input.shape[1:]))
            means.append(mean)
            variances.append(var)
        if update:
            self._update_running_stats(torch.cat(means), torch.cat(variances))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _normalize_chunks(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalise each chunk of ``x`` (``[K, b, C, *]``) with its statistics; return the
        output, the per-chunk means ``[K, C]`` and unbiased variances ``[K, C]``."""
        dims = (1, *range(3, x.dim()))
        count = x.shape[1] * x[0, 0, 0].numel()
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got a ghost batch of "
                f"input size {tuple(x.shape[1:])} (virtual_batch_size={self.virtual_batch_size}; "
                "avoid a final chunk of one example)"
            )
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        var, mean = torch.var_mean(xc, dim=dims, correction=0, keepdim=True)
        y = (xc - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            shape = (1, 1, -1, *([1] * (x.dim() - 3)))
            y = y * self.weight.to(compute).view(shape) + self.bias.to(compute).view(shape)
        k, c = x.shape[0], x.shape[2]
        unbiased = var.detach().reshape(k, c) * (count / (count - 1))
        return y.to(x.dtype), mean.detach().reshape(k, c), unbiased

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply the K sequential BatchNorm updates in closed form (module docstring)."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        k = means.shape[0]
        before = int(self.num_batches_tracked)
        self.num_batches_tracked.add_(k)
        rm = self.running_mean.to(means.dtype)
        rv = self.running_var.to(means.dtype)
        if self.momentum is None:  # cumulative moving average, factor 1/t at call t
            total = before + k
            new_mean = (rm * before + means.sum(0)) / total
            new_var = (rv * before + variances.sum(0)) / total
        else:
            m = float(self.momentum)
            powers = torch.arange(k - 1, -1, -1, device=means.device, dtype=means.dtype)
            weights = (m * (1 - m) ** powers).unsqueeze(1)  # chunk j gets m (1 − m)^{K−1−j}
            decay = (1 - m) ** k
            new_mean = decay * rm + (weights * means).sum(0)
            new_var = decay * rv + (weights * variances).sum(0)
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)


def convert_to_ghost_batchnorm(model: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``2d``/``3d`` of ``model`` by a :class:`GhostBatchNorm`.

    In place: each replacement shares the original's ``weight``/``bias`` parameters and running
    buffers (so an optimizer built before the conversion keeps working, and eval outputs are
    unchanged) and its training flag. Returns ``model`` (or the replacement, when ``model`` is
    itself a BatchNorm layer). ``SyncBatchNorm`` and other ``_BatchNorm`` subclasses are left
    as they are.

    >>> net = convert_to_ghost_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 32)
    >>> type(net[1]).__name__, net[1].virtual_batch_size
    ('GhostBatchNorm', 32)
    """
    if _is_plain_batchnorm(model):
        return _ghost_of(model, virtual_batch_size)
    for name, child in list(model.named_children()):
        if _is_plain_batchnorm(child):
            setattr(model, name, _ghost_of(child, virtual_batch_size))
        else:
            convert_to_ghost_batchnorm(child, virtual_batch_size)
    return model


def _is_plain_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(
        m, nn.SyncBatchNorm
    )


def _ghost_of(bn: _BatchNorm, virtual_batch_size: int) -> GhostBatchNorm:
    ghost = GhostBatchNorm(
        bn.num_features,
        virtual_batch_size,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=False,
        track_running_stats=False,
    )
    ghost.affine = bn.affine
    ghost.track_running_stats = bn.track_running_stats
    for name in ("weight", "bias"):
        ghost._parameters[name] = bn._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        ghost._buffers[name] = bn._buffers.get(name)
    ghost.train(bn.training)
    return ghost

r"""The second moment of the per-example gradients of one batch: its diagonal, and draws.

With ``g_i = ∇_θ ℓ_i`` the gradient of example ``i``'s loss ``ℓ_i = −log p_θ(y_i | x_i)``
(the mean over the example's rows that have a label, for ``[B, T, C]`` logits) under a
likelihood of :mod:`fisher_optim.likelihoods`, the batch of ``M`` examples has the second
moment

    S = (1/M) Σ_i g_i g_i^T,

the (batch) Fisher when the labels ``y_i ~ p_θ(·|x_i)`` are sampled from the model, the
empirical Fisher when they are the true targets. Wen et al. (AISTATS 2020) shape the noise of
:class:`fisher_optim.FisherNoiseSGD` by it; this module computes the two things that noise
needs, without ever forming a ``d × d`` matrix:

* :func:`sum_sq_example_grads`: ``Σ_i g_i ⊙ g_i`` (``M · diag S``; its sum is ``M · Tr S``),
  from one batched backward: each covered layer's rule
  (:meth:`~fisher_optim.curvature.layers.LayerRule.sq_grads`) forms its parameters' sum of
  squares from the layer's input ``a`` and output gradient ``g`` (for a ``Linear`` on flat
  inputs ``(g ⊙ g)^T (a ⊙ a)``, no per-example tensor); every other parameter takes
  per-example gradients in chunks (:func:`~fisher_optim.curvature.examples.example_grads`);
* :func:`example_grad_draws`: ``v = (1/sqrt(M)) Σ_i z_i g_i``, ``z_i ~ N(0, 1)`` i.i.d., so
  that ``Cov(v) = S`` exactly: one forward and one backward of ``Σ_i z_i ℓ_i / sqrt(M)``,
  however many draws (they share the forward, ``is_grads_batched``).

The cotangent of every per-example gradient is the likelihood's
(:meth:`~fisher_optim.likelihoods.Likelihood.example_score`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from .._global_rows import GlobalRows, RowSlice, draw_rows
from .._logits import OutputFn, pick_logits
from ..batch import Batch
from ..likelihoods import Likelihood
from ..targets import TargetMask, target_rows
from .examples import example_grads
from .ghost import ghost_backward
from .layers import LayerRule, trained

__all__ = [
    "PER_EXAMPLE_CHUNK",
    "accumulation_dtype",
    "example_grad_draws",
    "sample_row_labels",
    "sum_sq_example_grads",
]

#: Examples per chunk of the labels drawn and of the per-example gradients (bounds memory).
PER_EXAMPLE_CHUNK = 64


def sample_row_labels(
    likelihood: Likelihood,
    logits: Tensor,
    has_target: Tensor | None,
    generator: torch.Generator | GlobalRows | None,
    chunk_size: int | None = None,
) -> Tensor:
    """``ŷ ~ p_θ(·|z)`` for every row of ``logits`` ``[n, R, C]``, drawn chunk by chunk of
    ``chunk_size`` examples (:data:`PER_EXAMPLE_CHUNK` by default), rows where
    ``has_target`` (``[n·R]`` or ``[n, R]``, None for all) is false marked without a label:
    ``[n, R, *label_shape]``.

    With a :class:`~fisher_optim._global_rows.GlobalRows` the rows are this rank's of the
    global batch (:mod:`fisher_optim._global_rows`), labelled as one process labels the
    whole batch whatever the chunks: each chunk takes its rows of the global draw, made
    from the generator's state at the start (so the random numbers, not the logits, are
    drawn once per chunk), and the generator ends as after one draw.

    >>> from fisher_optim.likelihoods import Categorical
    >>> g = torch.Generator().manual_seed(0)
    >>> logits = torch.tensor([[[0.0, 50.0], [50.0, 0.0]]])
    >>> sample_row_labels(Categorical(), logits, torch.tensor([True, False]), g).tolist()
    [[1, -100]]
    """
    n, rows, classes = logits.shape
    chunk_size = chunk_size or PER_EXAMPLE_CHUNK
    placed = generator.place(n * rows, logits.device) if isinstance(generator, GlobalRows) else None
    state = None if placed is None else placed.generator.get_state()
    out = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        gen: torch.Generator | RowSlice | None = generator  # type: ignore[assignment]
        if placed is not None:  # this chunk's rows of the global batch's draw
            placed.generator.set_state(state)
            gen = RowSlice(placed.generator, placed.start + start * rows, placed.total)
        drawn = likelihood.sample(logits[start:stop].reshape(-1, classes), gen)
        out.append(drawn.reshape(stop - start, rows, *likelihood.label_shape(classes)))
    labels = torch.cat(out)
    return likelihood.drop_rows(labels, None if has_target is None else has_target.reshape(n, rows))


def sum_sq_example_grads(
    model: nn.Module,
    batch: Batch,
    params: list[Tensor],
    likelihood: Likelihood,
    *,
    targets: Tensor | None = None,
    generator: torch.Generator | GlobalRows | None = None,
    output_fn: OutputFn | None = None,
    target_mask: TargetMask | None = None,
    trusted: Collection[nn.Module] | None = None,
    covered: set[nn.Module] | None = None,
) -> list[Tensor]:
    """``Σ_i g_i ⊙ g_i`` for each of ``params`` (at least float32), over the examples of
    ``batch`` (see the module doc).

    The labels are ``targets`` (``[n, ...]``: one label per logit row, as the likelihood
    takes them; the empirical Fisher) or, when None, drawn from the model with
    ``generator`` (:func:`sample_row_labels`, a
    :class:`~fisher_optim._global_rows.GlobalRows` for this rank's rows of a global
    batch; the Fisher), rows without a target
    (:func:`fisher_optim.targets.target_rows`, ``target_mask``) left out. The model runs in
    the mode it is in (BatchNorm must use running statistics) and as in an optimizer's own
    pass (:func:`~fisher_optim.curvature.ghost.ghost_backward` ``optimizer_pass``);
    ``trusted`` layers are covered without host reads, and the layers the rules took are
    added to ``covered``.

    >>> from fisher_optim.likelihoods import Categorical
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> sq = sum_sq_example_grads(net, Batch((x,), {}), [net.bias], Categorical(), targets=y)
    >>> g = torch.softmax(net(x), -1) - torch.eye(2)[y]
    >>> bool(torch.allclose(sq[0], g.detach().square().sum(0)))
    True
    """
    _check_params_of(model, params)
    n = batch.num_examples()
    index = {id(p): k for k, p in enumerate(params)}
    sums = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params]
    shapes: list[torch.Size] = []  # of the logits, as the model gives them
    labels: list[Tensor] = []  # [n, R, ...]: set by the cotangents
    taken = set() if covered is None else covered

    def picked(output: Any) -> Tensor:
        logits = pick_logits(output, output_fn)
        shapes.append(logits.shape)
        return logits

    def cotangents(logits: Tensor) -> list[Tensor]:
        up = _upcast(logits)
        if targets is None:  # the shape of the batch's logits (not the probe's)
            rows = logits.shape[0] * logits.shape[1]
            shape = next(s for s in shapes if math.prod(s[:-1]) == rows)
            has_target = target_rows(model, batch.args, batch.kwargs, shape, target_mask)
            y = sample_row_labels(likelihood, logits, has_target, generator)
        else:
            likelihood.check_outputs(up, "FisherNoiseSGD(fisher='empirical')")
            y = likelihood.example_labels(targets, up)
        labels.append(y)
        return [likelihood.example_score(up, y).to(logits.dtype)]

    def on_layer(rule: LayerRule, m: nn.Module, a: Tensor, g: Tensor) -> None:
        taken.add(m)
        own = [index.get(id(p)) for p in trained(m)]
        if all(k is None for k in own):
            return
        dtype = accumulation_dtype(g.dtype)  # fp16/bf16 layers: squared in float32
        a = a.to(dtype) if a.is_floating_point() else a  # (an embedding's ids stay)
        for k, sq in zip(own, rule.sq_grads(m, a, g.to(dtype)), strict=True):
            if k is not None:
                sums[k].add_(sq.to(sums[k].dtype))

    _, used = ghost_backward(
        model, batch, cotangents, on_layer,
        output_fn=picked, trusted=trusted, optimizer_pass=True,
    )  # fmt: skip
    rest = [p for p in used if id(p) in index]  # no rule covers them: per example

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return likelihood.example_nll(_upcast(logits), y)

    for start in range(0, n if rest else 0, PER_EXAMPLE_CHUNK):
        stop = min(start + PER_EXAMPLE_CHUNK, n)
        grads = example_grads(model, batch, labels[0][start:stop], rest, loss, output_fn, start)
        for p, d in zip(rest, grads):
            s = sums[index[id(p)]]
            s.add_(d.to(s.dtype).pow(2).sum(0))
    return sums


def example_grad_draws(
    model: nn.Module,
    batch: Batch,
    params: list[Tensor],
    likelihood: Likelihood,
    *,
    targets: Tensor | None = None,
    generator: torch.Generator | GlobalRows | None = None,
    draws: int | None = None,
    output_fn: OutputFn | None = None,
    target_mask: TargetMask | None = None,
) -> list[Tensor]:
    """``v = (1/sqrt(M)) Σ_i z_i g_i`` for each of ``params`` (zeros where the loss does not
    reach it): ``Cov(v) = (1/M) Σ_i g_i g_i^T`` (see the module doc).

    One forward of ``batch`` (in the model's mode: batch statistics in training, so that
    ``g_i = ∂ℓ_i/∂θ`` includes the coupling through them) and one backward of the
    likelihood's cotangent weighted by ``z_i / sqrt(M)``. The labels are ``targets`` or,
    when None, drawn with ``generator`` (rows without a target left out, as in
    :func:`sum_sq_example_grads`); so is ``z``, one per example (with a
    :class:`~fisher_optim._global_rows.GlobalRows`, this rank's of the global batch's).
    ``draws=K`` gives ``K`` independent draws (fresh labels and ``z``) stacked in a leading
    dimension, from the one forward (across ranks, the ``K`` draws of each rank's rows lie
    end to end: independent draws, but another layout than one process's for ``K > 1``).

    >>> from fisher_optim.likelihoods import Gaussian
    >>> torch.manual_seed(0) and None
    >>> net, x = nn.Linear(3, 2), torch.randn(64, 3)
    >>> g = torch.Generator().manual_seed(0)
    >>> v = example_grad_draws(net, Batch((x,), {}), [net.bias], Gaussian(), generator=g, draws=4000)
    >>> bool(torch.allclose(v[0].T @ v[0] / 4000, torch.eye(2), atol=0.1))  # bias: S = I
    True
    """
    n = batch.num_examples()
    shaped = pick_logits(model(*batch.args, **batch.kwargs), output_fn, n)
    logits = _upcast(shaped.reshape(-1, shaped.shape[-1]))
    rows, classes = logits.shape
    if rows % n:
        raise ValueError(f"the model gave {rows} rows of logits for {n} examples")
    per = rows // n
    k = 1 if draws is None else draws
    detached = logits.detach().reshape(1, n, per, classes)
    if targets is None:
        has_target = target_rows(model, batch.args, batch.kwargs, shaped.shape, target_mask)
        many = detached.expand(k, -1, -1, -1).reshape(k * n, per, classes)
        keep = None if has_target is None else has_target.reshape(1, -1).expand(k, -1)
        labels = sample_row_labels(likelihood, many, keep, generator, chunk_size=k * n)
    else:
        likelihood.check_outputs(logits, "FisherNoiseSGD(fisher='empirical')")
        y = likelihood.example_labels(targets, detached[0])
        labels = y.expand(k, *y.shape).reshape(k * n, *y.shape[1:])
    labels = labels.to(logits.device)
    placed = (
        generator.place(k * n, logits.device) if isinstance(generator, GlobalRows) else generator
    )
    z = draw_rows(
        placed, k * n,
        lambda m, g: torch.randn((m, 1, 1), generator=g, device=logits.device, dtype=logits.dtype),
    )  # fmt: skip
    many = detached.expand(k, -1, -1, -1).reshape(k * n, per, classes)
    cotangent = (likelihood.example_score(many, labels) * z / math.sqrt(n)).reshape(
        k, rows, classes
    )
    grads = torch.autograd.grad(
        logits, params, cotangent[0] if draws is None else cotangent,
        allow_unused=True, is_grads_batched=draws is not None,
    )  # fmt: skip
    lead = () if draws is None else (k,)
    return [
        torch.zeros((*lead, *p.shape), device=p.device, dtype=p.dtype) if g is None else g
        for p, g in zip(params, grads)
    ]


def _check_params_of(module: nn.Module, params: list[Tensor]) -> None:
    known = {id(p) for p in module.parameters()}
    missing = [tuple(p.shape) for p in params if id(p) not in known]
    if missing:
        raise ValueError(f"parameters of shapes {missing} are not parameters of the model")


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))

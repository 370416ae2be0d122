"""Likelihoods: the model's predictive distribution ``p_θ(y | z)`` over the label of one row
``z`` of the logits, from which the Fisher's labels are drawn (the *true* Fisher, FP paper
Eq. 2) and whose score gives the per-example gradients.

``"categorical"`` (softmax over ``C ≥ 2`` classes, the FP paper's, the default),
``"bernoulli"`` (independent binary labels, e.g. one logit of a binary classifier) or
``"gaussian"`` (regression with fixed σ, whose Fisher is ``J^T J / σ²``); pass a name in
:data:`LIKELIHOODS` or an instance (``likelihood=Gaussian(sigma=0.5)``) to any function
with ``likelihood=``; subclass :class:`Likelihood` for another.

>>> get_likelihood("categorical")
Categorical()
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fisher_optim._global_rows import RowSlice, draw_rows
from fisher_optim.targets import IGNORE_INDEX

__all__ = [
    "LABEL_KINDS",
    "LIKELIHOODS",
    "LIKELIHOOD_REGISTRY",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "get_likelihood",
    "sample_labels",
]

LABEL_KINDS = ("sample", "uniform")


def sample_labels(
    logits: Tensor, kind: str = "sample", generator: torch.Generator | None = None
) -> Tensor:
    """Draw one label per row of ``logits`` (``[N, C]``), without gradient.

    ``kind="sample"``: ŷ ~ softmax(logits), the model's own predictive distribution
    (FP paper, Eq. 2), by one uniform per row and the inverse cumulative distribution.
    ``kind="uniform"``: ŷ uniform over the C classes (the GPr penalty). ``generator`` may be
    a :class:`~fisher_optim._global_rows.RowSlice`: the rows are then a rank's slice of a
    global batch, labelled as one process would label them.

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_labels(torch.tensor([[0.0, 50.0], [50.0, 0.0]]), generator=g).tolist()
    [1, 0]
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"kind must be one of {LABEL_KINDS}, got {kind!r}")
    if logits.shape[-1] < 2:
        raise ValueError(
            f"the logits have {logits.shape[-1]} column(s): a softmax over one class is "
            "identically 1, so every label is 0 and its gradient is identically 0; a "
            "categorical label needs at least 2 classes"
        )
    if generator is not None and generator.device != logits.device:
        return sample_labels(logits.detach().to(generator.device), kind, generator).to(
            logits.device
        )
    rows, classes = logits.shape
    device = logits.device
    with torch.no_grad():
        if kind == "uniform":
            return draw_rows(
                generator,
                rows,
                lambda n, g: torch.randint(classes, (n,), device=device, generator=g),
            )
        probs = torch.softmax(logits.detach().float(), dim=-1)
        # Rows with non-finite logits get uniform labels: the loss at them is then non-finite
        # and the caller (e.g. FisherPenaltySGD) skips the result, instead of crashing here.
        bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(bad, torch.ones_like(probs), probs)
        # one uniform u per row and the inverse of the cumulative distribution (in float64):
        # the first class whose cumulative probability exceeds u. One random number per row,
        # so that a rank can draw those of the whole global batch (fisher_optim._global_rows);
        # no check of the probabilities on the host (torch.multinomial reads them: two syncs
        # on a GPU)
        u = draw_rows(
            generator,
            rows,
            lambda n, g: torch.rand(n, 1, dtype=torch.float64, device=device, generator=g),
        )
        cdf = probs.to(torch.float64).cumsum(-1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return picked.squeeze(-1).clamp_max(classes - 1)


class Likelihood:
    r"""The model's predictive distribution ``p_θ(y | z)`` over the label of one row ``z``.

    The Fisher is ``F = E_x E_{ŷ ~ p_θ(·|x)} [∇_θ ℓ ∇_θ ℓ^T]`` with ``ℓ = −log p_θ(ŷ|x)``
    (FP paper, Eq. 2); by the chain rule ``∇_θ ℓ = J^T s`` with ``J = ∂z/∂θ`` and the score
    ``s = ∂ℓ/∂z``, so ``F = E_x J^T Λ(z) J`` with ``Λ(z) = E_ŷ[s s^T]``, the Fisher of the
    likelihood in its own parameters ``z``. A subclass gives the sampling of ``ŷ``, ``ℓ``,
    ``s`` and a factorisation ``Λ = Σ_k u_k u_k^T``. Rows are ``[N, C]``: logits
    ``[..., C]`` flattened, one row per position; the surrogate loss of a batch is the mean
    of ``ℓ`` over its rows.
    """

    name = "likelihood"
    #: Whether the label set has a uniform distribution (``penalty="random_label"``).
    uniform_labels = False

    def check_outputs(self, logits: Tensor, what: str | None = None) -> None:
        """Raise if rows of ``logits.shape[-1]`` outputs cannot carry this likelihood;
        ``what`` names a measurement of true targets (None: the Fisher)."""

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ŷ ~ p_θ(·|z) per row, without gradient."""
        raise NotImplementedError

    def sample_uniform(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ŷ uniform over the label set (the GPr penalty), if ``uniform_labels``."""
        raise ValueError(f"{self!r} has no uniform distribution over its labels")

    def nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over the rows of ``ℓ(z, ŷ)`` (constants dropped), at least in float32."""
        raise NotImplementedError

    def score(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``∂ℓ/∂z`` per row (``[..., C]``), 0 at rows without a label (see :meth:`labelled`):
        the one cotangent of every per-example gradient (:meth:`example_score`)."""
        raise NotImplementedError

    def row_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``ℓ(z, y)`` of every row (``[...]`` for logits ``[..., C]``), 0 at rows without a
        label; in the dtype of ``logits``."""
        raise NotImplementedError

    def label_shape(self, classes: int) -> tuple[int, ...]:
        """The shape of one row's label for rows of ``classes`` outputs: one value per output
        (the default; a class index for :class:`Categorical`)."""
        return (classes,)

    def labelled(self, labels: Tensor) -> Tensor:
        """Which rows (``[...]`` for labels ``[..., *label_shape]``) have a label: here those
        with an entry that is not NaN (NaN marks an output without a target, as ``-100``
        does a class index)."""
        return ~labels.isnan().all(-1)

    def drop_rows(self, labels: Tensor, keep: Tensor | None) -> Tensor:
        """``labels`` with the rows where ``keep`` (``[...]``, None for all) is false marked
        as having no label (NaN; ``-100`` for class indices)."""
        if keep is None:
            return labels
        keep = keep.reshape(labels.shape[:-1]).to(labels.device)
        return labels.masked_fill(~keep.unsqueeze(-1), float("nan"))

    def example_labels(self, targets: Tensor, logits: Tensor) -> Tensor:
        """``targets`` as the labels ``[n, R, *label_shape]`` of logits ``[n, R, C]``."""
        n, rows, classes = logits.shape
        shape = (n, rows, *self.label_shape(classes))
        if targets.numel() != math.prod(shape):
            raise ValueError(
                f"{targets.numel()} targets for {n} examples with {rows} logit rows of "
                f"{classes} outputs each: likelihood='{self.name}' needs "
                f"{self._per_row(classes)} per logit row"
            )
        return targets.reshape(shape).to(logits.device, _float(logits).dtype)

    def _per_row(self, classes: int) -> str:
        return f"{classes} targets (one per output)"

    def example_score(self, logits: Tensor, labels: Tensor) -> Tensor:
        r"""``∂ℓ_i/∂z`` for logits ``[n, R, C]`` and labels ``[n, R, *label_shape]``, with
        ``ℓ_i`` the mean of ``ℓ`` over the ``R_i`` rows of example ``i`` that have a label:
        the :meth:`score` over ``R_i`` (0 at rows without a label and for an example without
        any), so that ``J_i^T`` of it is the per-example gradient ``g_i = ∇_θ ℓ_i``.

        >>> Categorical().example_score(torch.zeros(1, 2, 2), torch.tensor([[0, -100]])).abs()
        tensor([[[0.5000, 0.5000],
                 [0.0000, 0.0000]]])
        """
        valid = self.labelled(labels).to(logits.dtype)
        weight = valid / valid.sum(1, keepdim=True).clamp_min(1)
        return self.score(logits, labels) * weight.unsqueeze(-1)

    def example_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``ℓ_i``, the mean of ``ℓ`` over the rows ``[..., R, C]`` of an example that have a
        label (``[...]``), 0 for an example without any (no gradient rather than NaN).

        >>> float(Categorical().example_nll(torch.zeros(3, 4), torch.tensor([1, -100, 2])))
        1.3862943649291992
        """
        count = self.labelled(labels).sum(-1).clamp_min(1)
        return self.row_nll(logits, labels).sum(-1) / count

    def fisher_factors(self, logits: Tensor) -> list[Tensor]:
        """Vectors ``u_k`` (each ``[N, C]``) with ``E_ŷ[s s^T] = Σ_k u_k u_k^T`` per row."""
        raise NotImplementedError

    def as_targets(self, targets: Tensor, logits: Tensor) -> Tensor:
        """True targets matched to the rows of ``logits`` (for the default GP/GPx loss)."""
        if targets.numel() != logits.numel():
            raise ValueError(
                f"the {self.name} likelihood needs one target per output: targets of shape "
                f"{tuple(targets.shape)} for outputs of {logits.numel()} entries"
            )
        return targets.reshape(logits.shape).to(_float(logits).dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    r"""ŷ ~ softmax(z) over ``C ≥ 2`` classes, ``ℓ = CE(z, ŷ)``, ``s = p − e_ŷ``.

    ``Λ = diag(p) − p p^T = Σ_k p_k (p − e_k)(p − e_k)^T``. The default: the FP paper's.
    """

    name = "categorical"
    uniform_labels = True

    def check_outputs(self, logits: Tensor, what: str | None = None) -> None:
        if logits.shape[-1] >= 2:
            return
        if what is not None:
            raise ValueError(
                f"{what} takes a softmax over the model's outputs (likelihood='categorical'), "
                f"but the model has {logits.shape[-1]} output per row: over one class the "
                "cross-entropy is identically 0 and so is every gradient of it. Give the model "
                "one output per class (2 for a binary task), or pass likelihood='bernoulli' "
                "(one logit of a binary classifier) or likelihood='gaussian' (regression)"
            )
        raise ValueError(
            f"the model has {logits.shape[-1]} output(s) per row, and the default "
            "likelihood='categorical' takes a softmax over them: over one class it is "
            "identically 1, so Tr(F_B) and Tr(F) would be identically 0 and the penalty "
            "would do nothing. Choose the likelihood of a one-output model: "
            "likelihood='bernoulli' (one logit of a binary classifier, ŷ ~ "
            "Bernoulli(sigmoid(z))) or likelihood='gaussian' (regression, ŷ ~ N(z, σ²); "
            "Gaussian(sigma=...) for σ ≠ 1)"
        )

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.check_outputs(logits)
        return sample_labels(logits, "sample", generator)

    def sample_uniform(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.check_outputs(logits)
        return sample_labels(logits, "uniform", generator)

    def nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(_float(logits), labels)

    def score(self, logits: Tensor, labels: Tensor) -> Tensor:
        # a scatter, not F.one_hot, whose range check reads the labels on the host
        valid = labels != IGNORE_INDEX
        probs = torch.softmax(logits, -1)
        onehot = torch.zeros_like(probs).scatter_(-1, torch.where(valid, labels, 0)[..., None], 1)
        return (probs - onehot) * valid.unsqueeze(-1).to(probs.dtype)

    def row_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        valid = labels != IGNORE_INDEX
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.where(valid, labels, 0).reshape(-1),
            reduction="none",
        ).reshape(labels.shape)
        return losses * valid.to(losses.dtype)

    def label_shape(self, classes: int) -> tuple[int, ...]:
        return ()

    def labelled(self, labels: Tensor) -> Tensor:
        """Rows whose class index is not ``-100`` (``F.cross_entropy``'s ``ignore_index``)."""
        return labels != IGNORE_INDEX

    def drop_rows(self, labels: Tensor, keep: Tensor | None) -> Tensor:
        if keep is None:
            return labels
        return labels.masked_fill(~keep.reshape(labels.shape).to(labels.device), IGNORE_INDEX)

    def example_labels(self, targets: Tensor, logits: Tensor) -> Tensor:
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                "likelihood='categorical' takes integer class indices as targets, got "
                f"{targets.dtype}; for one target per output use likelihood='bernoulli' "
                "(binary) or 'gaussian' (real)"
            )
        n, rows, classes = logits.shape
        if targets.numel() != n * rows:
            raise ValueError(
                f"{targets.numel()} targets for {n} examples with {rows} logit rows each: "
                "likelihood='categorical' needs one class index per logit row"
            )
        return targets.reshape(n, rows).to(logits.device)

    def fisher_factors(self, logits: Tensor) -> list[Tensor]:
        probs = torch.softmax(logits, -1)
        eye = torch.eye(logits.shape[-1], dtype=probs.dtype, device=probs.device)
        return [probs[:, k : k + 1].sqrt() * (probs - eye[k]) for k in range(logits.shape[-1])]

    def as_targets(self, targets: Tensor, logits: Tensor) -> Tensor:
        if targets.numel() != logits.shape[0]:
            raise ValueError(
                f"likelihood='categorical' needs one class index per row: targets of shape "
                f"{tuple(targets.shape)} for {logits.shape[0]} rows of logits"
            )
        return targets.reshape(-1)


class Bernoulli(Likelihood):
    r"""Each output an independent binary label: ŷ_c ~ Bernoulli(sigmoid(z_c)).

    ``ℓ = Σ_c BCE-with-logits(z_c, ŷ_c)``, ``s = sigmoid(z) − ŷ``, ``Λ = diag(p (1 − p))``
    with ``p = sigmoid(z)``. One output per row (``[B, 1]``) is a binary classifier with one
    logit; ``C`` outputs are ``C`` independent labels (multi-label classification).
    ``penalty='random_label'`` draws ŷ_c ~ Bernoulli(1/2).

    >>> Bernoulli().score(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    tensor([[-0.5000]])
    """

    name = "bernoulli"
    uniform_labels = True

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            probs = torch.sigmoid(_float(logits.detach()))
            probs = torch.where(torch.isfinite(probs), probs, torch.full_like(probs, 0.5))
            return (_uniform_like(generator, probs) < probs).to(probs.dtype)

    def sample_uniform(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        half = torch.full(logits.shape, 0.5, dtype=_float(logits).dtype, device=logits.device)
        return (_uniform_like(generator, half) < half).to(half.dtype)

    def nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = _float(logits)
        return F.binary_cross_entropy_with_logits(z, labels.to(z.dtype), reduction="sum") / max(
            z.shape[0], 1
        )

    def score(self, logits: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(logits.dtype)
        return torch.where(y.isnan(), 0, torch.sigmoid(logits) - y)

    def row_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(logits.dtype)
        losses = F.binary_cross_entropy_with_logits(logits, y.nan_to_num(), reduction="none")
        return torch.where(y.isnan(), 0, losses).sum(-1)

    def fisher_factors(self, logits: Tensor) -> list[Tensor]:
        p = torch.sigmoid(logits)
        scale = (p * (1 - p)).sqrt()
        eye = torch.eye(logits.shape[-1], dtype=p.dtype, device=p.device)
        return [scale[:, k : k + 1] * eye[k] for k in range(logits.shape[-1])]


class Gaussian(Likelihood):
    r"""Regression: ŷ ~ N(z, σ² I), the output ``z`` the mean and σ fixed (default 1).

    ``ℓ = ||ŷ − z||² / (2σ²)`` (+ a constant), ``s = (z − ŷ) / σ² = −ε / σ`` with
    ``ε ~ N(0, I)``, and ``Λ = E[s s^T] = I / σ²``: the Fisher of a Gaussian with fixed
    variance is ``F = E_x J^T J / σ²``, the Gauss-Newton matrix of the squared error over σ²
    (so ``Tr(F) = E_x ||J||_F² / σ²``). It does not depend on the targets, only on σ, which
    scales ``Tr(F)`` and ``Tr(F_B)`` as ``1/σ²``. Note ``F.mse_loss`` (a mean over the
    ``C`` outputs, without the 1/2) is ``ℓ · 2σ² / C``.

    >>> [u.tolist() for u in Gaussian(sigma=2.0).fisher_factors(torch.zeros(1, 2))]
    [[[0.5, 0.0]], [[0.0, 0.5]]]
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise TypeError(f"sigma must be a number > 0, got {sigma!r}")
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            # a non-finite mean draws finite labels: the loss at it stays non-finite (and the
            # caller skips the result) instead of the rows being taken as without a label
            mean = _float(logits.detach())
            mean = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
            noise = _on(
                generator,
                mean,
                lambda m: draw_rows(
                    generator,
                    m.shape[0],
                    lambda n, g: torch.randn(
                        (n, *m.shape[1:]), dtype=m.dtype, device=m.device, generator=g
                    ),
                ),
            )
            return mean + self.sigma * noise

    def nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = _float(logits)
        return (z - labels.to(z.dtype)).square().sum() / (2 * self.sigma**2 * max(z.shape[0], 1))

    def score(self, logits: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(logits.dtype)
        return torch.where(y.isnan(), 0, (logits - y) / self.sigma**2)

    def row_nll(self, logits: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(logits.dtype)
        return torch.where(y.isnan(), 0, logits - y).square().sum(-1) / (2 * self.sigma**2)

    def fisher_factors(self, logits: Tensor) -> list[Tensor]:
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        return [(eye[k] / self.sigma).expand_as(logits) for k in range(logits.shape[-1])]

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma:g})"


#: The built-in likelihoods by name: a new one is a :class:`Likelihood` subclass (with a
#: ``name``) and an entry here; its name then works wherever ``likelihood=`` is taken.
LIKELIHOOD_REGISTRY: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Categorical, Bernoulli, Gaussian)
}
#: The names ``likelihood=`` takes (the keys of :data:`LIKELIHOOD_REGISTRY`).
LIKELIHOODS = tuple(LIKELIHOOD_REGISTRY)


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """A :class:`Likelihood` from its name in :data:`LIKELIHOODS` (or the instance itself).

    >>> get_likelihood("gaussian"), get_likelihood(Gaussian(sigma=0.5))
    (Gaussian(sigma=1), Gaussian(sigma=0.5))
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    cls = LIKELIHOOD_REGISTRY.get(likelihood) if isinstance(likelihood, str) else None
    if cls is None:
        raise ValueError(
            f"likelihood must be one of {tuple(LIKELIHOOD_REGISTRY)} or a Likelihood instance "
            f"(e.g. Gaussian(sigma=0.5)), got {likelihood!r}"
        )
    return cls()


def _float(t: Tensor) -> Tensor:
    """``t`` in at least float32 (half-precision outputs are upcast for the loss)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _uniform_like(generator: torch.Generator | RowSlice | None, like: Tensor) -> Tensor:
    """Uniforms on [0, 1) shaped like ``like`` (rows in its first dimension), drawn on the
    generator's device (:func:`~fisher_optim._global_rows.draw_rows`: this rank's rows of
    the global batch's draw for a :class:`~fisher_optim._global_rows.RowSlice`)."""
    return _on(
        generator,
        like,
        lambda t: draw_rows(
            generator,
            t.shape[0],
            lambda n, g: torch.rand((n, *t.shape[1:]), dtype=t.dtype, device=t.device, generator=g),
        ),
    )


def _on(
    generator: torch.Generator | RowSlice | None, like: Tensor, draw: Callable[[Tensor], Tensor]
) -> Tensor:
    """``draw(like)`` on the generator's device, returned on ``like``'s device."""
    if generator is not None and generator.device != like.device:
        return draw(like.to(generator.device)).to(like.device)
    return draw(like)

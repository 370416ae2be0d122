"""The activation pattern of a forward pass: record it once, replay it at shifted parameters.

A network built from ReLU, max-pooling, clamping, top-k routing and the like is smooth only
piecewise: its loss ``L(θ)`` is smooth inside each *linear piece* (a fixed set of active
units, pooling winners and selected experts) and its gradient jumps where a unit changes
side. The exact penalty gradient ``2 H g`` is the Hessian of the base point's piece. A
finite difference ``(∇L(θ + r v) − ∇L(θ)) / r`` whose step crosses into another piece adds
the gradient's jump divided by ``r`` instead; on a network of 10⁵–10⁶ units per batch some
unit always crosses, so the quotient is mostly that noise.

:class:`ActivationPattern` removes the crossings. It is a
:class:`~torch.overrides.TorchFunctionMode`: during the unshifted forward it records, for
every piecewise operation in call order, which piece each element is in (ReLU-family masks,
max-pool and max/min/top-k/sort indices, clamp and hardtanh regions, the outputs of
comparisons and other discrete operations); during a shifted forward it computes each such
operation *on the recorded piece*: ``relu(x)`` becomes ``x · mask``, ``max_pool2d(x)`` a gather
of ``x`` at the recorded winners, ``clamp(x, lo, hi)`` ``x`` or the bound by the recorded
region. The shifted function equals the network on the base point's piece, is smooth
there, and has the same value and gradient at the base point, so the quotient converges to
the base point's Hessian-vector product as ``r → 0``, without the ``jump / r`` term.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
>>> x = torch.randn(4, 3)
>>> pattern = ActivationPattern()
>>> with pattern.record():
...     y0 = net(x)
>>> with pattern.replay():
...     y1 = net(x)
>>> torch.equal(y0, y1), len(pattern)
(True, 1)

What it sees: calls of ``torch``, ``torch.nn.functional`` and ``Tensor`` functions from
Python, modules' forwards included (``nn.ReLU``, ``nn.MaxPool2d``, ...), also in a model
compiled with ``torch.compile`` (Dynamo traces the mode). It does not see C++/CUDA
extensions, fused kernels or direct ``torch.ops.aten`` calls; for those,
:class:`~fisher_optim.FisherPenaltySGD` compares its first finite difference with the exact
gradient (``fd_check``). Piecewise
operations it cannot replay (random ones such as ``rrelu`` and ``fractional_max_pool2d``,
``grid_sample``, ``quantile``) are counted in :attr:`ActivationPattern.unreplayed`; the
finite difference warns about them. A shifted forward that makes another sequence of
piecewise calls than the recorded one (data-dependent control flow) raises
:class:`PatternMismatch`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ActivationPattern", "PatternMismatch"]


class PatternMismatch(RuntimeError):
    """A replayed forward called other piecewise operations than the recorded one."""


Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def _arg(args: Args, kwargs: Kwargs, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name``, the ``i``-th positional one (counting the input as 0)."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


#: Position of ``inplace=`` in ``torch.nn.functional``'s signatures.
_INPLACE_POSITION = {
    "relu": 1,
    "leaky_relu": 2,
    "hardtanh": 3,
    "relu6": 1,
    "threshold": 3,
    "hardsigmoid": 1,
    "hardswish": 1,
    "elu": 2,
    "selu": 1,
}


def _inplace(name: str, args: Args, kwargs: Kwargs) -> bool:
    """Whether the call writes its result into its input (``relu_``, ``inplace=True``)."""
    if name.endswith("_"):
        return True
    i = _INPLACE_POSITION.get(name)
    return i is not None and bool(_arg(args, kwargs, i, "inplace", False))


def _apply(x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """``out`` as the operation's result: written into ``x`` for an in-place operation."""
    return x.copy_(out) if inplace else out


@dataclass(frozen=True)
class _Rule:
    """How one family records its piece (``record(func, name, args, kwargs) -> (out,
    state)``) and computes itself on a recorded piece (``replay(state, name, args, kwargs)``)."""

    record: Callable[[Callable[..., Any], str, Args, Kwargs], tuple[Any, Any]]
    replay: Callable[[Any, str, Args, Kwargs], Any]


# ------------------------------------------------------------------------------------------
# Element-wise piecewise functions: a boolean mask (or two) per element.
# ------------------------------------------------------------------------------------------


def _record_mask(test: Callable[[Tensor, str, Args, Kwargs], Any]) -> Callable[..., Any]:
    """Record ``test(x, ...)`` (a mask, or a tuple of masks) before calling the function."""

    def record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
        with torch.no_grad():
            state = test(args[0], name, args, kwargs)
        return func(*args, **kwargs), state

    return record


def _relu_replay(mask: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x = args[0]
    # a mask in x's dtype: a product with a boolean one promotes it element by element, in
    # the forward and again in the backward (on a CPU several times the cost of the ReLU)
    factor = mask.to(x.dtype)
    return x.mul_(factor) if _inplace(name, args, kwargs) else x * factor


def _leaky_replay(mask: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, slope = args[0], _arg(args, kwargs, 1, "negative_slope", 0.01)
    return _apply(x, torch.where(mask, x, x * slope), _inplace(name, args, kwargs))


def _prelu_replay(mask: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    if w.numel() > 1 and x.dim() >= 2:
        w = w.reshape([1, -1] + [1] * (x.dim() - 2))
    return torch.where(mask, x, w * x)


def _bounds(name: str, args: Args, kwargs: Kwargs) -> tuple[Any, Any]:
    """``(low, high)`` of a clamping function (None: unbounded on that side)."""
    if name in ("hardtanh", "hardtanh_"):
        return _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    if name in ("relu6", "relu6_"):
        return 0.0, 6.0
    if name.startswith("clamp_min"):
        return _arg(args, kwargs, 1, "min"), None
    if name.startswith("clamp_max"):
        return None, _arg(args, kwargs, 1, "max")
    return _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")  # clamp, clip


def _clamp_test(x: Tensor, name: str, args: Args, kwargs: Kwargs) -> tuple[Any, Any]:
    low, high = _bounds(name, args, kwargs)
    # hardtanh's derivative is 0 at a bound, clamp's is 1: the tie goes the same way here
    closed = name.startswith(("hardtanh", "relu6"))
    below = None if low is None else (x <= low if closed else x < low)
    above = None if high is None else (x >= high if closed else x > high)
    return below, above


def _clamp_replay(state: tuple[Any, Any], name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, (below, above) = args[0], state
    low, high = _bounds(name, args, kwargs)
    out = x
    if above is not None:
        out = torch.where(above, high, out)
    if below is not None:
        out = torch.where(below, low, out)
    return _apply(x, out, _inplace(name, args, kwargs))


def _threshold_replay(mask: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, value = args[0], _arg(args, kwargs, 2, "value")
    return _apply(x, torch.where(mask, x, value), _inplace(name, args, kwargs))


def _hard_test(x: Tensor, name: str, args: Args, kwargs: Kwargs) -> tuple[Tensor, Tensor]:
    return (x > -3) & (x < 3), x >= 3


def _hard_replay(state: tuple[Tensor, Tensor], name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, (inside, above) = args[0], state
    if name.startswith("hardsigmoid"):
        out = torch.where(inside, x / 6 + 0.5, above.to(x.dtype))
    else:  # hardswish
        out = torch.where(inside, x * (x + 3) / 6, torch.where(above, x, 0.0))
    return _apply(x, out, _inplace(name, args, kwargs))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def _elu_replay(mask: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x = args[0]
    if name.startswith("selu"):
        alpha, scale = _SELU_ALPHA, _SELU_SCALE
    else:
        alpha, scale = _arg(args, kwargs, 1, "alpha", 1.0), 1.0
    out = scale * torch.where(mask, x, alpha * torch.expm1(torch.where(mask, 0.0, x)))
    return _apply(x, out, _inplace(name, args, kwargs))


def _abs_replay(sign: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x = args[0]
    return x.mul_(sign) if _inplace(name, args, kwargs) else x * sign


def _shrink_test(x: Tensor, name: str, args: Args, kwargs: Kwargs) -> tuple[Tensor, Tensor]:
    lambd = _arg(args, kwargs, 1, "lambd", 0.5)
    return x > lambd, x < -lambd


def _shrink_replay(state: tuple[Tensor, Tensor], name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x, (above, below) = args[0], state
    if name == "hardshrink":
        return torch.where(above | below, x, 0.0)
    lambd = _arg(args, kwargs, 1, "lambd", 0.5)
    return torch.where(above, x - lambd, torch.where(below, x + lambd, 0.0))


# ------------------------------------------------------------------------------------------
# Selections: indices into the input.
# ------------------------------------------------------------------------------------------


def _pick_test(x: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    other = _arg(args, kwargs, 1, "other")
    return x >= other if name in ("maximum", "fmax", "max") else x <= other


def _pick_replay(take_x: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    return torch.where(take_x, args[0], _arg(args, kwargs, 1, "other"))


_PICK = _Rule(_record_mask(_pick_test), _pick_replay)


def _pool_dims(name: str) -> int:
    return int(name.split("pool")[1][0])


def _pool_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    kwargs = dict(kwargs)
    want = kwargs.pop("return_indices", False)
    adaptive = name.startswith("adaptive")
    if name.endswith("_with_indices"):
        want = True
    elif len(args) > (2 if adaptive else 6):  # return_indices given positionally
        want, args = bool(args[2 if adaptive else 6]), args[: 2 if adaptive else 6]
    base = name.removesuffix("_with_indices")
    out, idx = getattr(F, base + "_with_indices")(*args, **kwargs)
    return ((out, idx) if want else out), idx


def _gather_spatial(x: Tensor, idx: Tensor, dims: int) -> Tensor:
    """``x`` at the flat spatial ``idx`` of a pooling's winners (over the last ``dims``)."""
    return x.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape)


def _pool_replay(idx: Tensor, name: str, args: Args, kwargs: Kwargs) -> Any:
    out = _gather_spatial(args[0], idx, _pool_dims(name))
    want = kwargs.get("return_indices", False) or name.endswith("_with_indices")
    adaptive = name.startswith("adaptive")
    if len(args) > (2 if adaptive else 6):
        want = bool(args[2 if adaptive else 6])
    return (out, idx) if want else out


def _reduced_dims(x: Tensor, dim: Any) -> list[int]:
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(x.dim(), 1) for d in dims)


def _to_last(x: Tensor, dims: list[int]) -> Tensor:
    """``x`` with ``dims`` moved to the end and flattened into one."""
    if x.dim() == 0:
        return x.reshape(1)
    rest = [d for d in range(x.dim()) if d not in dims]
    return x.permute(*rest, *dims).flatten(len(rest))


def _amax_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    x = args[0]
    dims = _reduced_dims(x, _arg(args, kwargs, 1, "dim"))
    with torch.no_grad():
        flat = _to_last(x, dims)
        idx = (flat.argmax if name == "amax" else flat.argmin)(-1, keepdim=True)
    return func(*args, **kwargs), idx


def _amax_replay(idx: Tensor, name: str, args: Args, kwargs: Kwargs) -> Tensor:
    x = args[0]
    dims = _reduced_dims(x, _arg(args, kwargs, 1, "dim"))
    out = _to_last(x, dims).gather(-1, idx).squeeze(-1)
    if x.dim() == 0:
        return out.reshape(())
    if _arg(args, kwargs, 2, "keepdim", False):
        for d in dims:
            out = out.unsqueeze(d)
    return out


def _values_at(x: Tensor, idx: Tensor, dim: int, keepdim: bool) -> Tensor:
    if keepdim or idx.dim() == x.dim():
        return x.gather(dim, idx)
    return x.gather(dim, idx.unsqueeze(dim)).squeeze(dim)


def _is_reduction(args: Args, kwargs: Kwargs) -> bool:
    """``max(x)``, ``max(x, dim, ...)``; not ``max(x, other)`` (element-wise)."""
    other = _arg(args, kwargs, 1, "other")
    return not isinstance(other, Tensor)


def _max_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    if not _is_reduction(args, kwargs):
        out, state = _PICK.record(func, name, args, kwargs)
        return out, ("pick", state)
    out = func(*args, **kwargs)
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:  # full reduction: one value
        x = args[0]
        with torch.no_grad():
            flat = x.reshape(-1)
            idx = (flat.argmax() if name in ("max", "amax") else flat.argmin()).reshape(1)
        return out, ("all", idx)
    return out, ("dim", out[1])


def _max_replay(state: tuple[str, Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    kind, s = state
    x = args[0]
    if kind == "pick":
        return _PICK.replay(s, name, args, kwargs)
    if kind == "all":
        return x.reshape(-1).gather(0, s).reshape(())
    dim = _arg(args, kwargs, 1, "dim")
    values = _values_at(x, s, dim, bool(_arg(args, kwargs, 2, "keepdim", False)))
    return getattr(torch.return_types, name)((values, s))


def _indexed_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    """Functions returning ``(values, indices)``: topk, sort, kthvalue, median/mode(dim), cummax."""
    out = func(*args, **kwargs)
    return out, out[1]


_DIM_POSITION = {
    "topk": 2,
    "kthvalue": 2,
    "sort": 1,
    "median": 1,
    "nanmedian": 1,
    "mode": 1,
    "cummax": 1,
    "cummin": 1,
}
_DIM_DEFAULT = {"topk": -1, "kthvalue": -1, "sort": -1, "median": -1, "nanmedian": -1, "mode": -1}
_KEEPDIM_POSITION = {"kthvalue": 3, "median": 2, "nanmedian": 2, "mode": 2}


def _indexed_replay(idx: Tensor, name: str, args: Args, kwargs: Kwargs) -> Any:
    x = args[0]
    dim = _arg(args, kwargs, _DIM_POSITION[name], "dim", _DIM_DEFAULT.get(name))
    keep = name not in _KEEPDIM_POSITION or _arg(
        args, kwargs, _KEEPDIM_POSITION[name], "keepdim", False
    )
    values = x.gather(dim, idx) if keep else _values_at(x, idx, dim, False)
    return getattr(torch.return_types, name)((values, idx))


def _median_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    if _arg(args, kwargs, 1, "dim") is not None:
        out, idx = _indexed_record(func, name, args, kwargs)
        return out, ("dim", idx)
    with torch.no_grad():
        _, idx = getattr(torch, name)(args[0].reshape(-1), 0)
    return func(*args, **kwargs), ("all", idx.reshape(1))


def _median_replay(state: tuple[str, Tensor], name: str, args: Args, kwargs: Kwargs) -> Any:
    kind, idx = state
    if kind == "all":
        return args[0].reshape(-1).gather(0, idx).reshape(())
    return _indexed_replay(idx, name, args, kwargs)


# ------------------------------------------------------------------------------------------
# Discrete outputs (comparisons, argmax, sign, rounding): replayed as recorded.
# ------------------------------------------------------------------------------------------


def _discrete_record(func: Callable[..., Any], name: str, args: Args, kwargs: Kwargs) -> Any:
    out = func(*args, **kwargs)
    return out, out


def _discrete_replay(out: Any, name: str, args: Args, kwargs: Kwargs) -> Any:
    return out


_RELU = _Rule(_record_mask(lambda x, *_: x > 0), _relu_replay)
_CLAMP = _Rule(_record_mask(_clamp_test), _clamp_replay)
_MASK_POSITIVE = _record_mask(lambda x, *_: x > 0)

RULES: dict[str, _Rule] = {
    **dict.fromkeys(("relu", "relu_"), _RELU),
    **dict.fromkeys(("leaky_relu", "leaky_relu_"), _Rule(_MASK_POSITIVE, _leaky_replay)),
    "prelu": _Rule(_MASK_POSITIVE, _prelu_replay),
    **dict.fromkeys(
        (
            "hardtanh",
            "hardtanh_",
            "relu6",
            "relu6_",
            "clamp",
            "clamp_",
            "clip",
            "clip_",
            "clamp_min",
            "clamp_min_",
            "clamp_max",
            "clamp_max_",
        ),
        _CLAMP,
    ),
    **dict.fromkeys(
        ("threshold", "threshold_"),
        _Rule(_record_mask(lambda x, n, a, k: x > _arg(a, k, 1, "threshold")), _threshold_replay),
    ),
    **dict.fromkeys(
        ("hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_"),
        _Rule(_record_mask(_hard_test), _hard_replay),
    ),
    **dict.fromkeys(("elu", "elu_", "selu", "selu_"), _Rule(_MASK_POSITIVE, _elu_replay)),
    **dict.fromkeys(
        ("abs", "abs_", "absolute", "__abs__"),
        _Rule(_record_mask(lambda x, *_: torch.sign(x)), _abs_replay),
    ),
    **dict.fromkeys(
        ("hardshrink", "softshrink"), _Rule(_record_mask(_shrink_test), _shrink_replay)
    ),
    **dict.fromkeys(("maximum", "minimum", "fmax", "fmin"), _PICK),
    **dict.fromkeys(("max", "min"), _Rule(_max_record, _max_replay)),
    **dict.fromkeys(("amax", "amin"), _Rule(_amax_record, _amax_replay)),
    **dict.fromkeys(
        (
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "max_pool1d_with_indices",
            "max_pool2d_with_indices",
            "max_pool3d_with_indices",
            "adaptive_max_pool1d",
            "adaptive_max_pool2d",
            "adaptive_max_pool3d",
            "adaptive_max_pool1d_with_indices",
            "adaptive_max_pool2d_with_indices",
            "adaptive_max_pool3d_with_indices",
        ),
        _Rule(_pool_record, _pool_replay),
    ),
    **dict.fromkeys(
        ("topk", "sort", "kthvalue", "mode", "cummax", "cummin"),
        _Rule(_indexed_record, _indexed_replay),
    ),
    **dict.fromkeys(("median", "nanmedian"), _Rule(_median_record, _median_replay)),
    **dict.fromkeys(
        (
            "gt",
            "lt",
            "ge",
            "le",
            "eq",
            "ne",
            "greater",
            "less",
            "greater_equal",
            "less_equal",
            "not_equal",
            "__gt__",
            "__lt__",
            "__ge__",
            "__le__",
            "__eq__",
            "__ne__",
            "argmax",
            "argmin",
            "argsort",
            "sign",
            "sgn",
            "signbit",
            "heaviside",
            "floor",
            "ceil",
            "round",
            "trunc",
            "fix",
            "floor_divide",
            "bucketize",
            "searchsorted",
        ),
        _Rule(_discrete_record, _discrete_replay),
    ),
}

#: Piecewise operations whose piece is not recorded: counted, and warned about by the finite difference.
UNREPLAYED = frozenset(
    (
        "rrelu",
        "rrelu_",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
        "fractional_max_pool2d_with_indices",
        "fractional_max_pool3d_with_indices",
        "grid_sample",
        "quantile",
        "nanquantile",
        "msort",
        "embedding_bag",
    )
)

_NAMESPACES = (torch, torch.Tensor, F, torch._C._nn, torch.special, torch.linalg)


def _function_names() -> dict[Any, str]:
    """Every function object of the namespaces above that a rule (or UNREPLAYED) names."""
    found: dict[Any, str] = {}
    for name in (*RULES, *UNREPLAYED):
        # torch's own adaptive_max_pool*d return (values, indices); functional's may not
        for ns in (F,) if name.startswith("adaptive") else _NAMESPACES:
            fn = getattr(ns, name, None)
            if fn is not None:
                found.setdefault(fn, name)
    return found


_FUNCTIONS = _function_names()


@dataclass
class _Entry:
    name: str
    shape: torch.Size | None
    state: Any


class ActivationPattern(TorchFunctionMode):
    """The pieces of one forward pass's piecewise operations (see the module docstring).

    ``with pattern.record():`` runs a forward normally and records its pattern (a new
    recording replaces the last); ``with pattern.replay():`` runs a forward on the recorded
    pattern, any number of times. ``len(pattern)`` is the number of recorded operations;
    ``unreplayed`` counts, by name, the piecewise operations seen that have no rule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[_Entry] = []
        self.unreplayed: Counter[str] = Counter()
        self._replaying = False
        self._next = 0

    def __len__(self) -> int:
        return len(self.entries)

    @contextlib.contextmanager
    def record(self) -> Iterator[ActivationPattern]:
        self.entries, self.unreplayed, self._replaying = [], Counter(), False
        with self:
            yield self

    @contextlib.contextmanager
    def replay(self) -> Iterator[ActivationPattern]:
        self._replaying, self._next = True, 0
        try:
            with self:
                yield self
            if self._next != len(self.entries):
                raise PatternMismatch(
                    f"the replayed forward made {self._next} piecewise calls, the recorded "
                    f"one {len(self.entries)}"
                )
        finally:
            self._replaying = False

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Args = (), kwargs: Kwargs | None = None
    ) -> Any:
        kwargs = kwargs or {}
        try:
            name = _FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable
            name = None
        if name is None or not args or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        if name in UNREPLAYED:
            if not self._replaying:
                self.unreplayed[name] += 1
            return func(*args, **kwargs)
        rule = RULES[name]
        shape = args[0].shape
        if not self._replaying:
            out, state = rule.record(func, name, args, kwargs)
            self.entries.append(_Entry(name, shape, state))
            return out
        i = self._next
        if (
            i >= len(self.entries)
            or self.entries[i].name != name
            or (self.entries[i].shape != shape)
        ):
            got = self.entries[i].name if i < len(self.entries) else "nothing"
            raise PatternMismatch(
                f"piecewise call {i} of the replayed forward is {name}{tuple(shape)}, the "
                f"recorded one was {got}"
            )
        self._next = i + 1
        return rule.replay(self.entries[i].state, name, args, kwargs)

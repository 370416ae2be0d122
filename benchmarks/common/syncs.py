"""Count host synchronisations: the places where the host waits for a device's result.

A GPU training step that never reads a device value back lets the host queue the next
kernels while the GPU works; every ``.item()``, ``bool(tensor)``, ``float(tensor)``,
``.tolist()``, boolean-mask indexing or ``nonzero`` drains that queue. :class:`SyncCounter`
counts them on any device, so a CPU test can bound what a GPU run would pay:

* every aten operator that must read a value on the host (``_local_scalar_dense``, behind
  ``item``/``bool``/``float``/``int``; ``nonzero``, ``masked_select``, ``equal``, indexing with a
  boolean mask), seen by a ``TorchDispatchMode`` below autograd, so double backward and the
  optimizer's foreach kernels are seen too;
* copies from a non-CPU device to the CPU (``.cpu()``, ``.to("cpu")``);
* ``Tensor.tolist`` and ``Tensor.numpy``, which on a CPU tensor read memory without an
  operator (patched for the duration);
* on CUDA, also what ``torch.cuda.set_sync_debug_mode("warn")`` reports (``cuda_warnings``).

The dispatch mode sees the operators a call dispatches, not what a kernel does inside: a
sync within one operator's implementation (``torch.multinomial`` checks its probabilities on
the host, for instance) is seen only by CUDA's own count.

>>> import torch
>>> x = torch.ones(3)
>>> with SyncCounter() as counter:
...     y = (x * 2).sum()
...     _ = float(y), x[x > 0], y.tolist()
>>> counter.count, sorted(counter.ops)
(3, ['_local_scalar_dense', 'index(bool mask)', 'tolist'])
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

#: Operators that read a device value on the host.
SYNC_OPS = {
    aten._local_scalar_dense.default: "_local_scalar_dense",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.equal.default: "equal",
}
_COPIES = (aten._to_copy.default, aten.copy_.default)


def _is_bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    if func is not aten.index.Tensor or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _is_copy_to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func not in _COPIES:
        return False
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    target = kwargs.get("device")
    return (
        target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    )


class SyncCounter(TorchDispatchMode):
    """Context manager counting host synchronisations (module doc); ``count`` is the total,
    ``ops`` a ``Counter`` by kind, ``cuda_warnings`` what CUDA's sync debug mode saw."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.cuda_warnings = 0
        self._patched: dict[str, Any] = {}
        self._caught: Any = None

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.ops[SYNC_OPS[func]] += 1
        elif _is_bool_index(func, args):
            self.ops["index(bool mask)"] += 1
        elif _is_copy_to_host(func, args, kwargs):
            self.ops["copy to host"] += 1
        return func(*args, **kwargs)

    def _patch(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        self._patched[name] = original
        counter = self

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.ops[name] += 1
            # its own copy to the host (a CUDA tensor's) is the same sync: not counted again
            with _unpatched(counter), _disable_current_modes():
                return original(tensor, *args, **kwargs)

        setattr(torch.Tensor, name, counted)

    def __enter__(self) -> SyncCounter:
        for name in ("tolist", "numpy"):
            self._patch(name)
        if torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            self._debug_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched = {}
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode(self._debug_mode)
            self.cuda_warnings = sum("synchroniz" in str(w.message).lower() for w in self._records)
            self._caught.__exit__(*exc)
            self._caught = None


class _unpatched:
    """Inside a counted ``tolist``/``numpy``: the original methods, so nothing counts twice."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.saved = {n: getattr(torch.Tensor, n) for n in self.counter._patched}
        for name, original in self.counter._patched.items():
            setattr(torch.Tensor, name, original)

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)

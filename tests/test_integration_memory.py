"""No leaks over long runs: the number of live tensors does not grow, no batch is kept after a
step, and nothing of the penalty pass (its graph, its activations) outlives the step."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # touching torch.distributed.reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


class _PenaltyPassTracker:
    """Weak references to every non-leaf tensor the autograd graphs of a pass save."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.grad_fn is not None:  # an activation, not a parameter or an input
            self.refs.append(weakref.ref(t))
        return t

    def alive(self) -> int:
        return sum(1 for r in self.refs if r() is not None)


def _run(mode: str, every: int, steps: int, check_at: int = 100) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = FisherPenaltySGD(model, lr=0.01, momentum=0.9, alpha=0.1, every=every, mode=mode)
    data = [(torch.randn(4, 4), torch.randint(3, (4,))) for _ in range(8)]
    counts = {}
    tracker = _PenaltyPassTracker()
    for step in range(1, steps + 1):
        x, y = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        # two refresh steps (step_count divisible by every) are watched
        track = opt.step_count in (check_at, steps - every)
        if track:
            with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
                opt.step()
            assert tracker.refs, "the penalty pass saved no activation: nothing was checked"
            assert tracker.alive() == 0  # the penalty graphs were freed by the end of step()
        else:
            opt.step()
        assert opt._batch is None and opt._targets is None  # no batch kept after a step
        if step in (check_at, steps):
            counts[step] = _live_tensors()
    assert opt.refreshes == -(-steps // every)
    assert counts[steps] == counts[check_at], counts


@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_no_growth_300_steps(mode: str, every: int) -> None:
    _run(mode, every, steps=300)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_no_growth_2000_steps(mode: str, every: int) -> None:
    _run(mode, every, steps=2000)

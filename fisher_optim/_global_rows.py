"""Where a rank's rows sit in the global batch: draws that do not depend on the layout.

Under data parallelism (DDP, FSDP2) each rank holds a slice of the global batch. A label drawn
per rank from its own generator would depend on how the batch is split, so the same seed,
model and global batch would give another update on 1, 2 or 8 ranks. Here every rank draws
the random numbers of the *whole* global batch's rows from the same generator (same seed,
same state) and keeps the rows of its own slice, ``[start, start + count)``, the ranks'
slices laid end to end in rank order. A row's label is then a function of the seed, the
number of draws made before (one per refresh) and its index in the global batch: the same on
any number of ranks, and on one process, where the slice is the whole batch.

Cost per draw: one all-gather of one integer per rank (the ranks' row counts, read on the
host) and ``R`` times the rank's own random numbers, ``R`` the number of ranks: one uniform
per row for a categorical label (:meth:`fisher_optim.likelihoods.Categorical.sample`),
one per output for the Bernoulli and Gaussian likelihoods; never ``R`` times the logits.

>>> g = torch.Generator().manual_seed(0)
>>> whole = torch.rand(5, generator=g)
>>> part = draw_rows(RowSlice(torch.Generator().manual_seed(0), 2, 5), 3,
...                  lambda rows, gen: torch.rand(rows, generator=gen))
>>> bool(torch.equal(part, whole[2:]))
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: ``fn(rows, generator)``: ``rows`` draws stacked in the first dimension.
Draw = Callable[[int, "torch.Generator | None"], Tensor]

__all__ = ["GlobalRows", "RowSlice", "draw_rows", "rank_counts", "rank_share"]


class RowSlice:
    """A generator together with this rank's place ``[start, start + count)`` in a global
    batch of ``total`` rows (see the module): pass it where a ``generator`` is taken."""

    def __init__(self, generator: torch.Generator, start: int, total: int) -> None:
        self.generator = generator
        self.start = int(start)
        self.total = int(total)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def __repr__(self) -> str:
        return f"RowSlice(start={self.start}, total={self.total})"


class GlobalRows:
    """A generator in the same state on every rank of ``group`` (None: this process holds
    the whole batch), whose draws are placed once the rows are known: :meth:`place` turns
    it into this rank's :class:`RowSlice`."""

    def __init__(self, generator: torch.Generator, group: Any = None) -> None:
        self.generator = generator
        self.group = group

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def place(self, rows: int, device: torch.device) -> RowSlice:
        """This rank's ``rows`` laid in the global batch (one all-gather of the counts under
        a group of more than one rank)."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return RowSlice(self.generator, 0, rows)
        counts = rank_counts(rows, self.group, device)
        rank = dist.get_rank(self.group)
        return RowSlice(self.generator, sum(counts[:rank]), sum(counts))


def draw_rows(generator: torch.Generator | RowSlice | None, rows: int, fn: Draw) -> Tensor:
    """``fn(rows, generator)``, or, for a :class:`RowSlice`, the rows ``[start, start +
    rows)`` of ``fn(total, generator)``: the global batch's draw, this rank's part."""
    if isinstance(generator, RowSlice):
        if generator.start + rows > generator.total:
            raise ValueError(
                f"rows {generator.start}..{generator.start + rows} of a global batch of "
                f"{generator.total} rows"
            )
        return fn(generator.total, generator.generator)[generator.start : generator.start + rows]
    return fn(rows, generator)


def rank_counts(count: int, group: Any, device: torch.device) -> list[int]:
    """Every rank's ``count`` in ``group``, in rank order: one all-gather, read on the host."""
    world = dist.get_world_size(group)
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return [int(c) for c in torch.cat(gathered).tolist()]


def rank_share(n: int, group: Any) -> int:
    """This rank's part of ``n`` items split over the ranks of ``group`` (``n // R``, one
    more on the first ``n % R`` ranks); ``n`` itself without a group."""
    if group is None:
        return n
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return n // world + (1 if rank < n % world else 0)

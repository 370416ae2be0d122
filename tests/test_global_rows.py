"""A rank's rows of the global batch draw what one process draws for those rows, also when the
labels are drawn chunk by chunk (fisher_optim._global_rows, gradient_moment.sample_row_labels).

A rank is simulated by a :class:`GlobalRows` whose place in the global batch is given (what
the all-gather of the row counts returns under a process group); the reference is one
process labelling the whole batch, drawn by hand with the documented rule (one uniform per
row, the first class whose cumulative probability exceeds it).
"""

from __future__ import annotations

import pytest
import torch

from fisher_optim._global_rows import GlobalRows, RowSlice
from fisher_optim.curvature.gradient_moment import PER_EXAMPLE_CHUNK, sample_row_labels
from fisher_optim.likelihoods import Bernoulli, Categorical

TOTAL = 2 * PER_EXAMPLE_CHUNK + 22  # three chunks on one process


class PlacedRows(GlobalRows):
    """This rank's examples start at ``start`` of a global batch of ``total`` examples, each
    of ``per_example`` rows."""

    def __init__(self, generator: torch.Generator, start: int, total: int, per_example: int):
        super().__init__(generator)
        self.start, self.total, self.per_example = start, total, per_example

    def place(self, rows: int, device: torch.device) -> RowSlice:
        return RowSlice(
            self.generator, self.start * self.per_example, self.total * self.per_example
        )


def _whole_batch_labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Categorical labels of every row of ``logits`` ``[N, R, C]``, one uniform per row."""
    rows = logits.reshape(-1, logits.shape[-1])
    u = torch.rand(
        rows.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    cdf = torch.softmax(rows.float(), -1).double().cumsum(-1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(rows.shape[-1] - 1)
    return picked.reshape(logits.shape[:-1])


@pytest.mark.parametrize("rows_per_example", [1, 3])
@pytest.mark.parametrize("start", [0, 70, PER_EXAMPLE_CHUNK + 5])
def test_a_ranks_chunked_labels_are_its_rows_of_the_whole_batch(
    start: int, rows_per_example: int
) -> None:
    logits = torch.randn(TOTAL, rows_per_example, 4, generator=torch.Generator().manual_seed(0))
    expected = _whole_batch_labels(logits, seed=5)
    stop = TOTAL if start == 0 else min(TOTAL, start + 80)
    placed = PlacedRows(torch.Generator().manual_seed(5), start, TOTAL, rows_per_example)
    got = sample_row_labels(Categorical(), logits[start:stop], None, placed)
    assert torch.equal(got, expected[start:stop])
    # the generator ends as after one draw of the whole batch's rows: later draws agree
    after = torch.Generator().manual_seed(5)
    torch.rand(TOTAL * rows_per_example, 1, dtype=torch.float64, generator=after)
    assert torch.equal(placed.generator.get_state(), after.get_state())


def test_one_process_draws_what_a_plain_generator_draws() -> None:
    """Without a group the rows are the whole batch: the labels of a plain generator."""
    logits = torch.randn(TOTAL, 2, 3, generator=torch.Generator().manual_seed(1))
    for likelihood in (Categorical(), Bernoulli()):
        plain = sample_row_labels(likelihood, logits, None, torch.Generator().manual_seed(2))
        placed = GlobalRows(torch.Generator().manual_seed(2))
        assert torch.equal(sample_row_labels(likelihood, logits, None, placed), plain)

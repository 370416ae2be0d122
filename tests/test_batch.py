"""fisher_optim.batch: the one rule by which a batch is cut into examples."""

import pytest
import torch

from fisher_optim.batch import Batch, batch_size, slice_batch


def test_a_cut_batch_holds_the_examples_in_every_tensor_and_its_targets():
    x = torch.arange(12.0).reshape(4, 3)
    b = Batch((x, torch.tensor(2.0)), {"flag": True}, torch.arange(4))
    part = b.slice(1, 3)
    assert torch.equal(part.args[0], x[1:3]) and part.args[1].dim() == 0
    assert part.kwargs == {"flag": True} and part.targets.tolist() == [1, 2]
    for bad, name in [
        (Batch((x, torch.ones(5, 5))), "argument 1"),
        (Batch((x,), {"mask": torch.ones(3, 4)}), "mask"),
        (Batch((x,), {}, torch.arange(8)), "the targets"),
    ]:
        with pytest.raises(ValueError, match=f"{name} has shape.*functools.partial"):
            bad.slice(0, 1)
    with pytest.raises(ValueError, match="mask has shape"):
        slice_batch({"x": x, "mask": torch.ones(3, 4)}, 0, 1)
    assert batch_size({"x": x, "mask": torch.ones(4, 7), "t": torch.tensor(1.0)}) == 4


def test_a_head_of_at_least_the_batch_is_the_batch_run_whole():
    b = Batch((torch.zeros(4, 3), torch.ones(5, 5)))  # run whole: nothing to decide
    assert b.head(None) is b and b.head(4) is b and b.head(9) is b
    with pytest.raises(ValueError, match="argument 1"):
        b.head(2)

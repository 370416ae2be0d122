"""GhostBatchNorm equals BatchNorm applied chunk by chunk (outputs and running statistics)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisher_optim._modules import frozen_batchnorm_stats
from fisher_optim.ghost_batchnorm import GhostBatchNorm, convert_to_ghost_batchnorm

D = torch.float64


def _pair(bn_cls: type[nn.Module], vbs: int, **kw: object) -> tuple[GhostBatchNorm, nn.Module]:
    bn = bn_cls(3, **kw).to(D)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ghost = GhostBatchNorm(3, vbs, **kw).to(D)
    ghost.load_state_dict(bn.state_dict())
    return ghost, bn


SHAPES = {nn.BatchNorm1d: (3,), nn.BatchNorm2d: (3, 4, 4)}


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, nn.BatchNorm2d])
@pytest.mark.parametrize("n", [16, 18])  # exact multiple, and a remainder chunk of 2
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_equals_chunkwise_batchnorm(bn_cls: type[nn.Module], n: int, momentum: float) -> None:
    ghost, bn = _pair(bn_cls, 4, momentum=momentum)
    for step in range(3):
        x = torch.randn(n, *SHAPES[bn_cls], dtype=D) * 2 + step
        x.requires_grad_(True)
        y = ghost(x)
        ref = torch.cat([bn(c) for c in x.split(4)])
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        (gx,) = torch.autograd.grad((y * ref.detach()).sum(), x)
        (rx,) = torch.autograd.grad((ref * ref.detach()).sum(), x)
        torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == 3 * -(-n // 4)
    ghost.eval()
    bn.eval()
    x = torch.randn(n, *SHAPES[bn_cls], dtype=D)
    torch.testing.assert_close(ghost(x), bn(x), rtol=1e-12, atol=1e-12)


def test_small_batch_is_bitwise_batchnorm() -> None:
    ghost, bn = _pair(nn.BatchNorm2d, 8)
    x = torch.randn(8, 3, 4, 4, dtype=D)
    assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_var, bn.running_var)


def test_frozen_stats_toggle_at_runtime() -> None:
    ghost, bn = _pair(nn.BatchNorm2d, 4)
    before = copy.deepcopy(ghost.state_dict())
    x = torch.randn(12, 3, 4, 4, dtype=D)
    with frozen_batchnorm_stats(ghost):
        y = ghost(x)
    for key, value in ghost.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert ghost.track_running_stats
    bn.track_running_stats = False
    torch.testing.assert_close(y, torch.cat([bn(c) for c in x.split(4)]), rtol=1e-12, atol=1e-12)


def test_without_running_stats_uses_ghost_stats_in_eval() -> None:
    ghost, bn = _pair(nn.BatchNorm1d, 4, track_running_stats=False)
    ghost.eval()
    bn.eval()
    x = torch.randn(8, 3, dtype=D)
    torch.testing.assert_close(ghost(x), torch.cat([bn(c) for c in x.split(4)]))


def test_no_affine_and_errors() -> None:
    ghost, bn = _pair(nn.BatchNorm1d, 4, affine=False)
    x = torch.randn(9, 3, dtype=D)  # remainder chunk of one example
    with pytest.raises(ValueError, match="more than 1 value"):
        ghost(x)
    torch.testing.assert_close(ghost(x[:8]), torch.cat([bn(c) for c in x[:8].split(4)]))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm(3, 0)


def test_convert_swaps_layers_and_preserves_eval_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5, momentum=None)),
    ).to(D)
    x = torch.randn(16, 3, 4, 4, dtype=D)
    model(x)  # some running statistics
    model.eval()
    ref = model(x)
    params = list(model.parameters())
    out = convert_to_ghost_batchnorm(model, 4)
    assert out is model
    assert isinstance(model[1], GhostBatchNorm) and isinstance(model[4][1], GhostBatchNorm)
    assert model[4][1].momentum is None and not model[1].training
    assert all(p is q for p, q in zip(model.parameters(), params))  # optimizer keeps working
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    assert torch.equal(model(x), ref)
    assert set(model.state_dict()) == set(out.state_dict())
    single = convert_to_ghost_batchnorm(nn.BatchNorm1d(2), 8)
    assert isinstance(single, GhostBatchNorm)

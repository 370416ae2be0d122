"""The penalties against brute force in float64 (torch.func over a flat parameter vector)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from fisher_optim import fisher_penalty
from fisher_optim._logits import sample_labels
from fisher_optim.penalty import Batch, PenaltyObjective

from .conftest import small_cnn, tiny_mlp


def flat_loss(model, x, labels):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(theta):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), labels)

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return loss, theta


def test_fisher_penalty_is_squared_norm_of_sampled_label_gradient():
    model, x = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64)
    labels = sample_labels(model(x), generator=torch.Generator().manual_seed(3))
    loss, theta = flat_loss(model, x, labels)
    expected = grad(loss)(theta).pow(2).sum()
    value = fisher_penalty(model, x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def test_random_label_and_gradient_penalties():
    model, x, y = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64), torch.randint(4, (16,))
    loss, theta = flat_loss(model, x, y)
    gp = fisher_penalty(model, x, penalty="gradient", targets=y)
    torch.testing.assert_close(gp, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)
    uniform = sample_labels(torch.zeros(16, 4), "uniform", torch.Generator().manual_seed(5))
    loss, theta = flat_loss(model, x, uniform)
    gpr = fisher_penalty(model, x, penalty="random_label", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(gpr, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)


def test_input_gradient_penalty_is_input_gradient_norm():
    model, x, y = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64), torch.randint(4, (16,))
    gx = grad(lambda inp: F.cross_entropy(model(inp), y))(x)
    value = fisher_penalty(model, x, penalty="input_gradient", targets=y)
    torch.testing.assert_close(value, gx.pow(2).sum(), rtol=1e-12, atol=0)


def test_penalty_is_differentiable_and_leaves_batchnorm_stats():
    model = small_cnn()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fisher_penalty(model, x).backward()
    assert all(p.grad is not None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_head_cuts_every_batched_tensor():
    x, mask, y = torch.randn(10, 3), torch.ones(10, 2), torch.arange(10)
    head = Batch((x,), {"mask": mask, "scale": 2.0}, y).head(4)
    assert head.args[0].shape[0] == 4 and head.kwargs["mask"].shape[0] == 4
    assert head.kwargs["scale"] == 2.0 and head.targets.tolist() == [0, 1, 2, 3]


def test_errors():
    model, x = tiny_mlp(), torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="'fisher', 'random_label'"):
        fisher_penalty(model, x, penalty="hessian")
    with pytest.raises(ValueError, match="set_targets"):
        fisher_penalty(model, x, penalty="gradient")
    with pytest.raises(TypeError, match="floating-point"):
        PenaltyObjective(
            torch.nn.Embedding(5, 3), Batch((torch.arange(4),), {}, torch.arange(4)),
            penalty="input_gradient",
        )

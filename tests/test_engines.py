"""Penalty gradients of both modes against the explicit Hessian, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian

from fisher_optim import penalty_gradient
from fisher_optim._logits import sample_labels
from fisher_optim.engines import DEFAULT_FD_STEP, default_fd_step

from .conftest import small_cnn, tiny_mlp
from .test_penalty import flat_loss


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def cosine(a, b):
    return F.cosine_similarity(flat(a).double(), flat(b).double(), dim=0).item()


def brute_force(model, x, labels):
    """``2 H g`` with H the explicit Hessian of the frozen-label loss."""
    loss, theta = flat_loss(model, x, labels)
    return 2 * hessian(loss)(theta) @ grad(loss)(theta)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_fisher_penalty_gradient_matches_explicit_hessian(mode):
    model, x = tiny_mlp(), torch.randn(32, 5, dtype=torch.float64)
    labels = sample_labels(model(x), generator=torch.Generator().manual_seed(7))
    expected = brute_force(model, x, labels)
    got = flat(penalty_gradient(model, x, mode=mode, generator=torch.Generator().manual_seed(7)))
    rtol = 1e-10 if mode == "exact" else 1e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_gradient_penalty_matches_explicit_hessian(mode):
    model, x, y = tiny_mlp(), torch.randn(32, 5, dtype=torch.float64), torch.randint(4, (32,))
    expected = brute_force(model, x, y)
    got = flat(penalty_gradient(model, x, penalty="gradient", targets=y, mode=mode))
    assert cosine([got], [expected]) > 1 - 1e-9
    torch.testing.assert_close(got.norm(), expected.norm(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_input_gradient_penalty_matches_brute_force(mode):
    model, x, y = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64), torch.randint(4, (16,))
    _, theta = flat_loss(model, x, y)

    def input_penalty(th):
        # ||∂L/∂x||² as a function of the flat parameters, via the same functional loss
        from torch.func import functional_call

        names = [n for n, _ in model.named_parameters()]
        params, offset = {}, 0
        for n, p in zip(names, model.parameters()):
            params[n] = th[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        gx = grad(lambda inp: F.cross_entropy(functional_call(model, params, (inp,)), y))(x)
        return gx.pow(2).sum()

    expected = grad(input_penalty)(theta)
    got = flat(penalty_gradient(model, x, penalty="input_gradient", targets=y, mode=mode))
    assert cosine([got], [expected]) > 1 - 1e-8
    torch.testing.assert_close(got.norm(), expected.norm(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("dtype", "min_cosine"), [(torch.float64, 0.999), (torch.float32, 0.99)])
def test_modes_agree_on_small_cnn_at_default_step(dtype, min_cosine):
    model, x = small_cnn(dtype), torch.randn(32, 3, 8, 8, dtype=dtype)
    exact = penalty_gradient(model, x, generator=torch.Generator().manual_seed(1))
    fd = penalty_gradient(
        model, x, mode="finite_difference", generator=torch.Generator().manual_seed(1)
    )
    assert cosine(exact, fd) >= min_cosine


def test_finite_difference_restores_parameters_and_buffers_bitwise():
    model = small_cnn(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    penalty_gradient(model, torch.randn(8, 3, 8, 8), mode="finite_difference")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_finite_difference_replays_dropout_masks():
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    x = torch.randn(64, 5, dtype=torch.float64)
    torch.manual_seed(11)
    fd = penalty_gradient(model, x, mode="finite_difference", generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    exact = penalty_gradient(model, x, generator=torch.Generator().manual_seed(2))
    assert cosine(exact, fd) > 1 - 1e-8


def test_unused_parameter_gets_none_and_default_step_scales_with_weights():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = tiny_mlp(), nn.Linear(2, 2).double()

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    grads = penalty_gradient(model, torch.randn(4, 5, dtype=torch.float64))
    assert grads[-1] is None and grads[-2] is None and grads[0] is not None
    params = [torch.full((100,), 3.0, dtype=torch.float64)]
    assert default_fd_step(params) == pytest.approx(DEFAULT_FD_STEP[torch.float64] * 30.0)


def test_bad_mode():
    with pytest.raises(ValueError, match="'exact', 'finite_difference'"):
        penalty_gradient(tiny_mlp(), torch.randn(4, 5, dtype=torch.float64), mode="central")


def test_exact_mode_works_through_fused_attention():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)  # [B, heads, T, d]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, t, 8))

    model, x = Attention(), torch.randn(4, 6, 8)
    exact = penalty_gradient(model, x, generator=torch.Generator().manual_seed(0))
    fd = penalty_gradient(model, x, mode="finite_difference", generator=torch.Generator().manual_seed(0))
    assert cosine(exact, fd) > 0.99

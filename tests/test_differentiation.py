"""Penalty gradients of both modes against the explicit Hessian, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian

from fisher_optim import penalty_gradient
from fisher_optim.batch import Batch
from fisher_optim.differentiation import (
    DEFAULT_FD_STEP,
    MODES,
    check_fd_step,
    default_fd_step,
    exact_penalty_gradient,
    finite_difference_penalty_gradient,
)
from fisher_optim.likelihoods import sample_labels
from fisher_optim.penalty import PenaltyObjective

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
    fd = penalty_gradient(
        model, x, mode="finite_difference", generator=torch.Generator().manual_seed(2)
    )
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
    fd = penalty_gradient(
        model, x, mode="finite_difference", generator=torch.Generator().manual_seed(0)
    )
    assert cosine(exact, fd) > 0.99


# ------------------------------------------------------------------ likelihoods
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
@pytest.mark.parametrize("key", ["bernoulli", "gaussian", 0.5])
def test_penalty_gradient_per_likelihood_matches_explicit_hessian(mode, key):
    from .test_penalty import NLLS, drawn_labels, head, likelihood_arg

    model, x = head(1), torch.randn(32, 5, dtype=torch.float64)
    lik = likelihood_arg(key)
    labels = drawn_labels(model, x, lik, 7)
    loss, theta = flat_loss(model, x, labels, NLLS[key])
    expected = 2 * hessian(loss)(theta) @ grad(loss)(theta)
    got = flat(
        penalty_gradient(
            model, x, mode=mode, likelihood=lik, generator=torch.Generator().manual_seed(7)
        )
    )
    rtol = 1e-10 if mode == "exact" else 1e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def test_gradient_penalty_with_mse_on_one_output_matches_explicit_hessian():
    """GP with F.mse_loss on [B, 1] outputs and targets (no broadcasting to [B, B])."""
    from .test_penalty import head

    model, x, y = head(1), torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1).double()
    loss, theta = flat_loss(model, x, y, F.mse_loss)
    expected = 2 * hessian(loss)(theta) @ grad(loss)(theta)
    for mode in MODES:
        got = flat(
            penalty_gradient(model, x, penalty="gradient", targets=y, loss_fn=F.mse_loss, mode=mode)
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# ------------------------------------------------------------------ finite-difference numerics
def test_central_scheme_matches_explicit_hessian():
    model, x = tiny_mlp(), torch.randn(32, 5, dtype=torch.float64)
    labels = sample_labels(model(x), generator=torch.Generator().manual_seed(7))
    expected = brute_force(model, x, labels)
    objective = PenaltyObjective(model, Batch((x,)))
    objective.labels = labels
    got = flat(finite_difference_penalty_gradient(objective, 1e-5, scheme="central").grads)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
    with pytest.raises(ValueError, match="'forward', 'central'"):
        finite_difference_penalty_gradient(objective, scheme="backward")


@pytest.mark.parametrize(("dtype", "max_error"), [(torch.float32, 0.01), (torch.float64, 1e-6)])
def test_default_step_error_against_float64_exact(dtype, max_error):
    """The relative L2 error of the default finite difference against the float64 exact
    gradient stays within the measured band (docs/fd_step_measured.md, tiny_smooth_cnn, the
    same network: worst 0.7% in float32 (guarded central difference), 4.6e-8 in float64)."""
    model, x = small_cnn(), torch.randn(32, 3, 8, 8, dtype=torch.float64)
    labels = sample_labels(model(x), generator=torch.Generator().manual_seed(1))
    exact = PenaltyObjective(model, Batch((x,)))
    exact.labels = labels
    reference = flat(exact_penalty_gradient(exact).grads)
    low = copy.deepcopy(model).to(dtype)
    objective = PenaltyObjective(low, Batch((x.to(dtype),)))
    objective.labels = labels
    got = flat(finite_difference_penalty_gradient(objective).grads).double()
    assert (got - reference).norm() / reference.norm() < max_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_difference_refuses_half_precision_parameters(dtype):
    model, x = tiny_mlp(dtype), torch.randn(8, 5, dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="float32 or float64.*mode='exact'.*autocast"):
        penalty_gradient(model, x, mode="finite_difference")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="float32 or float64"):
        default_fd_step(list(model.parameters()))


def test_finite_difference_runs_in_the_parameters_precision_under_autocast():
    """Under torch.autocast the difference passes run in float32: bitwise the same result."""
    model, x = small_cnn(torch.float32), torch.randn(16, 3, 8, 8)
    plain = penalty_gradient(
        model, x, mode="finite_difference", generator=torch.Generator().manual_seed(0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = penalty_gradient(
            model, x, mode="finite_difference", generator=torch.Generator().manual_seed(0)
        )
    assert all(torch.equal(a, b) for a, b in zip(plain, cast))


@pytest.mark.parametrize("step", [0.0, -1e-3, float("nan"), float("inf"), float("-inf")])
def test_invalid_fd_step_is_rejected(step):
    model, x = tiny_mlp(), torch.randn(4, 5, dtype=torch.float64)
    for mode in MODES:
        with pytest.raises(ValueError, match="fd_step must be a finite number > 0"):
            penalty_gradient(model, x, mode=mode, fd_step=step)
    with pytest.raises(TypeError, match="fd_step"):
        check_fd_step("1e-3")
    with pytest.raises(TypeError, match="fd_step"):
        check_fd_step(True)
    assert check_fd_step(None) is None and check_fd_step(1) == 1.0


def test_penalty_gradient_passes_target_mask_and_penalty_scale():
    """The functional gradient of the masked, per-row-scaled penalty: brute force on the
    rows the mask keeps, times N (the number of kept rows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    got = penalty_gradient(
        model,
        x,
        penalty="random_label",
        target_mask=lambda x: keep,
        generator=torch.Generator().manual_seed(3),
    )
    labels = torch.randint(4, (int(keep.sum()),), generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x[keep]), labels), params, create_graph=True)
    want = torch.autograd.grad(sum((t * t).sum() for t in g), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="penalty_scale"):
        penalty_gradient(model, x, penalty="random_label", penalty_scale="per_row")


# ------------------------------------------------------------------------------------------
# Piecewise networks at the size people train: the difference on the base point's pattern
# ------------------------------------------------------------------------------------------


def _images(n: int, seed: int) -> torch.Tensor:
    """CIFAR-shaped images with spatial structure: 4x4 noise upsampled to 32x32, plus a
    little pixel noise (PyTorch's default init sees them much as natural images)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    fine = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    return fine + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


def _trained(model: nn.Module, steps: int) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for s in range(steps):
        x = _images(32, 100 + s)
        y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _relative_errors(model: nn.Module, x: torch.Tensor, **fd: object) -> tuple[float, float]:
    """The float32 finite difference against the float64 exact gradient on the same sampled
    labels, with the activation pattern replayed and without."""
    wide = copy.deepcopy(model).double()
    reference = PenaltyObjective(wide, Batch((x.double(),)))
    reference.labels = sample_labels(wide(x.double()), generator=torch.Generator().manual_seed(0))
    want = flat(exact_penalty_gradient(reference).grads)
    errors = []
    for replay in (True, False):
        objective = PenaltyObjective(model, Batch((x,)))
        objective.labels = reference.labels
        got = flat(finite_difference_penalty_gradient(objective, replay=replay, **fd).grads)
        errors.append(((got.double() - want).norm() / want.norm()).item())
    return errors[0], errors[1]


@pytest.mark.parametrize("steps", [0, 20], ids=["init", "trained"])
@pytest.mark.parametrize("scheme", [None, "forward"], ids=["default", "forward"])
def test_difference_on_a_cifar_relu_maxpool_network_is_within_1_percent(steps, scheme):
    """SimpleCNN (conv32-conv32-pool-conv64-conv64-pool-dense128, ReLU, max-pool; 1.25M
    parameters) on 32x32 images, batch 32, at PyTorch's default initialisation and after 20
    SGD steps. Without the replayed pattern the step crosses kinks and the difference is
    noise (> 50% off); with it, the float32 default is within 1% of the float64 exact
    gradient (measured: about 0.01% central, 0.15% forward)."""
    from benchmarks.common.models import build_model

    torch.manual_seed(0)
    model = _trained(build_model("simplecnn", 4, init="torch"), steps)
    replayed, crossed = _relative_errors(model, _images(32, 7), scheme=scheme)
    assert replayed < 0.01, replayed
    assert crossed > 0.5, crossed  # the network is large enough to cross kinks


def test_difference_on_resnet20_with_batchnorm_in_training_mode():
    """ResNet-20 (BatchNorm with batch statistics, ReLU), batch 16: the default (central)
    difference within 1% of the float64 exact gradient."""
    from benchmarks.common.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4, init="torch").train()
    replayed, _ = _relative_errors(model, _images(16, 3))
    assert replayed < 0.01, replayed


def test_forward_gap_estimates_the_forward_differences_error():
    """With the central scheme, ``forward_gap`` is the forward difference's distance from the
    central one, computed without another pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    x = torch.randn(64, 6, dtype=torch.float64)

    def objective():
        return PenaltyObjective(model, Batch((x,)), generator=torch.Generator().manual_seed(1))

    central = finite_difference_penalty_gradient(objective(), 1e-3, scheme="central")
    forward = finite_difference_penalty_gradient(objective(), 1e-3, scheme="forward")
    c, f = flat(central.grads).double(), flat(forward.grads).double()
    assert forward.forward_gap is None
    assert central.forward_gap.item() > 1e-5  # a real truncation error at this step
    torch.testing.assert_close(central.forward_gap, (f - c).norm() / c.norm(), rtol=1e-6, atol=0)


def test_check_exact_reports_the_distance_from_the_exact_gradient():
    model, x = tiny_mlp(act=nn.ReLU), torch.randn(32, 5, dtype=torch.float64)
    result = finite_difference_penalty_gradient(
        PenaltyObjective(model, Batch((x,)), generator=torch.Generator().manual_seed(0)),
        check_exact=True,
    )
    exact = exact_penalty_gradient(
        PenaltyObjective(model, Batch((x,)), generator=torch.Generator().manual_seed(0))
    )
    want = ((flat(result.grads) - flat(exact.grads)).norm() / flat(exact.grads).norm()).item()
    assert result.exact_error.item() == pytest.approx(want, rel=1e-6, abs=1e-14)
    assert result.exact_error.item() < 1e-6


def test_guarded_scheme_is_gone_with_a_pointer():
    with pytest.raises(ValueError, match="'guarded' was removed.*activation pattern"):
        penalty_gradient(
            tiny_mlp(),
            torch.randn(4, 5, dtype=torch.float64),
            mode="finite_difference",
            fd_scheme="guarded",
        )

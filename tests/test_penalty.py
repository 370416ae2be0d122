"""The penalties against brute force in float64 (torch.func over a flat parameter vector)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from fisher_optim import Gaussian, fisher_penalty
from fisher_optim.batch import Batch
from fisher_optim.likelihoods import sample_labels
from fisher_optim.penalty import PenaltyObjective

from .conftest import small_cnn, tiny_mlp


def flat_loss(model, x, labels, loss_fn=F.cross_entropy):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss(theta):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return loss_fn(functional_call(model, params, (x,)), labels)

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
    gpr = fisher_penalty(
        model, x, penalty="random_label", generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(gpr, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)


def test_input_gradient_penalty_is_input_gradient_norm():
    model, x, y = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64), torch.randint(4, (16,))
    gx = grad(lambda inp: F.cross_entropy(model(inp), y))(x)
    value = fisher_penalty(model, x, penalty="input_gradient", targets=y)
    torch.testing.assert_close(value, gx.pow(2).sum(), rtol=1e-12, atol=0)


def test_input_gradient_penalty_is_per_example_norms_over_b_squared():
    """docs/science.md: ||∇_x L||² = B⁻² Σ_i ||∇_{x_i} ℓ(x_i, y_i)||² for the batch-mean L."""
    model, x, y = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64), torch.randint(4, (16,))
    per_example = [
        grad(lambda inp, t=t: F.cross_entropy(model(inp[None]), t[None]))(xi) for xi, t in zip(x, y)
    ]
    expected = sum(g.pow(2).sum() for g in per_example) / 16**2
    value = fisher_penalty(model, x, penalty="input_gradient", targets=y)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


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
            torch.nn.Embedding(5, 3),
            Batch((torch.arange(4),), {}, torch.arange(4)),
            penalty="input_gradient",
        )


# ------------------------------------------------- likelihoods: one output, binary, regression
def bernoulli_nll(z, y):
    """Mean over rows of -Σ_c log Bernoulli(y_c | sigmoid(z_c)), written out."""
    p = torch.sigmoid(z)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum(-1).mean()


def gaussian_nll(sigma):
    """Mean over rows of ||y - z||² / (2σ²), the Gaussian NLL up to a constant."""
    return lambda z, y: (y - z).square().sum(-1).mean() / (2 * sigma**2)


NLLS = {"bernoulli": bernoulli_nll, "gaussian": gaussian_nll(1.0), 0.5: gaussian_nll(0.5)}


def head(c):
    torch.manual_seed(2)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, c)
    ).double()


def likelihood_arg(key):
    return Gaussian(sigma=key) if isinstance(key, float) else key


def drawn_labels(model, x, likelihood, seed, penalty="fisher"):
    """The labels the objective draws with this seed (inputs of the brute force)."""
    obj = PenaltyObjective(
        model,
        Batch((x,)),
        penalty=penalty,
        likelihood=likelihood,
        generator=torch.Generator().manual_seed(seed),
    )
    obj.loss()
    return obj.labels


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("key", ["bernoulli", "gaussian", 0.5])
def test_fisher_penalty_with_bernoulli_and_gaussian_likelihoods(key, c):
    model, x = head(c), torch.randn(16, 5, dtype=torch.float64)
    lik = likelihood_arg(key)
    labels = drawn_labels(model, x, lik, 3)
    assert labels.shape == (16, c)
    if key == "bernoulli":
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
    loss, theta = flat_loss(model, x, labels, NLLS[key])
    expected = grad(loss)(theta).pow(2).sum()
    value = fisher_penalty(model, x, likelihood=lik, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def jacobians(model, x):
    """J_i = ∂f(x_i)/∂θ, one [C, P] matrix per example."""
    _, theta = flat_loss(model, x, None)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(t, xi):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return functional_call(model, params, (xi[None],))[0]

    return [torch.autograd.functional.jacobian(lambda t, xi=xi: f(t, xi), theta) for xi in x]


def test_expected_bernoulli_penalty_by_enumerating_labels():
    """E_ŷ[Tr(F_B)] over all 2^B label vectors of a one-logit model, against the mean of the
    sampled penalty (within 4 standard errors)."""
    model, x = head(1), torch.randn(5, 5, dtype=torch.float64)
    p = torch.sigmoid(model(x)).detach()[:, 0]
    expected = 0.0
    for y in torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 5):
        weight = torch.where(y == 1, p, 1 - p).prod()
        loss, theta = flat_loss(model, x, y[:, None], bernoulli_nll)
        expected += weight * grad(loss)(theta).pow(2).sum()
    draws = torch.stack(
        [
            fisher_penalty(
                model, x, likelihood="bernoulli", generator=torch.Generator().manual_seed(s)
            ).detach()
            for s in range(600)
        ]
    )
    assert abs(draws.mean() - expected) < 4 * draws.std() / 600**0.5


def test_expected_gaussian_penalty_is_the_closed_form():
    """E_ŷ ||(1/B) Σ_i J_i^T (f_i - ŷ_i)/σ²||² = (1/B²) Σ_i ||J_i||_F² / σ², ŷ_i ~ N(f_i, σ²)."""
    model, x, sigma = head(2), torch.randn(6, 5, dtype=torch.float64), 0.5
    expected = sum(j.square().sum() for j in jacobians(model, x)) / (6**2 * sigma**2)
    draws = torch.stack(
        [
            fisher_penalty(
                model, x, likelihood=Gaussian(sigma), generator=torch.Generator().manual_seed(s)
            ).detach()
            for s in range(600)
        ]
    )
    assert abs(draws.mean() - expected) < 4 * draws.std() / 600**0.5


def test_one_output_with_the_categorical_likelihood_raises_and_names_the_fix():
    model, x = head(1), torch.randn(8, 5, dtype=torch.float64)
    for penalty, kw in [
        ("fisher", {}),
        ("random_label", {}),
        ("gradient", {"targets": torch.zeros(8).long()}),
    ]:
        with pytest.raises(ValueError, match="identically 0.*likelihood='bernoulli'"):
            fisher_penalty(model, x, penalty=penalty, **kw)


def test_random_label_penalty_per_likelihood():
    """GPr: Bernoulli(1/2) labels for a one-logit model; refused for the Gaussian."""
    model, x = head(1), torch.randn(16, 5, dtype=torch.float64)
    labels = drawn_labels(model, x, "bernoulli", 5, penalty="random_label")
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    loss, theta = flat_loss(model, x, labels, bernoulli_nll)
    value = fisher_penalty(
        model,
        x,
        penalty="random_label",
        likelihood="bernoulli",
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(value, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no uniform distribution.*penalty='fisher'"):
        fisher_penalty(model, x, penalty="random_label", likelihood="gaussian")


@pytest.mark.parametrize("key", ["bernoulli", "gaussian"])
def test_gradient_penalty_default_loss_is_the_likelihood_nll(key):
    model, x = head(2), torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(2, (16, 2)).double() if key == "bernoulli" else torch.randn(16, 2).double()
    loss, theta = flat_loss(model, x, y, NLLS[key])
    value = fisher_penalty(model, x, penalty="gradient", targets=y, likelihood=key)
    torch.testing.assert_close(value, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)


# ------------------------------------------------- GP / GPx: loss_fn(f(x), y) as the user calls it
class PerPosition(torch.nn.Module):
    """[B, T, 5] -> [B, T, 4] logits, one row per position."""

    def __init__(self):
        super().__init__()
        self.net = head(4)

    def forward(self, x):
        return self.net(x)


def seq_ce(out, y):
    """A user's language-model loss that flattens the positions itself."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


LOSS_CASES = {
    "mse_B1": (lambda: head(1), (16, 5), lambda: torch.randn(16, 1).double(), F.mse_loss),
    "mse_B3": (lambda: head(3), (16, 5), lambda: torch.randn(16, 3).double(), F.mse_loss),
    "l1_sum_B1": (
        lambda: head(1),
        (16, 5),
        lambda: torch.randn(16, 1).double(),
        lambda o, y: F.l1_loss(o, y, reduction="sum"),
    ),
    "ce_BTC": (PerPosition, (4, 3, 5), lambda: torch.randint(4, (4, 3)), seq_ce),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_gradient_penalties_call_loss_fn_on_the_output_and_targets_as_given(case):
    make, shape, targets, loss_fn = LOSS_CASES[case]
    model, x, y = make(), torch.randn(*shape, dtype=torch.float64), targets()
    loss, theta = flat_loss(model, x, y, loss_fn)
    gp = fisher_penalty(model, x, penalty="gradient", targets=y, loss_fn=loss_fn)
    torch.testing.assert_close(gp, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)
    gx = grad(lambda inp: loss_fn(model(inp), y))(x)
    gpx = fisher_penalty(model, x, penalty="input_gradient", targets=y, loss_fn=loss_fn)
    torch.testing.assert_close(gpx, gx.pow(2).sum(), rtol=1e-12, atol=0)


def test_loss_fn_sees_the_output_fn_output_unflattened():
    """output_fn applies first; loss_fn gets its result with its own shape (here [B])."""
    model, x, y = head(1), torch.randn(16, 5, dtype=torch.float64), torch.randn(16).double()
    seen = []

    def loss_fn(out, t):
        seen.append((out.shape, t.shape))
        return F.mse_loss(out, t)

    def squeeze(out):
        return out[:, 0]

    loss, theta = flat_loss(model, x, y, lambda o, t: F.mse_loss(o[:, 0], t))
    gp = fisher_penalty(model, x, penalty="gradient", targets=y, loss_fn=loss_fn, output_fn=squeeze)
    torch.testing.assert_close(gp, grad(loss)(theta).pow(2).sum(), rtol=1e-12, atol=0)
    assert seen == [((16,), (16,))]


# ------------------------------------------------------------------ penalties as objects
def test_registry_names_the_built_in_penalties():
    from fisher_optim.penalty import PENALTIES, PENALTY_REGISTRY, get_penalty

    assert PENALTIES == ("fisher", "random_label", "gradient", "input_gradient")
    assert [get_penalty(n).needs_targets for n in PENALTIES] == [False, False, True, True]
    assert [get_penalty(n).wrt_inputs for n in PENALTIES] == [False, False, False, True]
    assert all(get_penalty(n).name == n for n in PENALTY_REGISTRY)
    instance = get_penalty("fisher")
    assert get_penalty(instance) is instance
    with pytest.raises(ValueError, match="penalty must be one of .*'fisher'.* got 'fischer'"):
        get_penalty("fischer")


class PredictedLabelPenalty:
    """A new penalty, one class: the gradient norm at the model's own predicted labels."""

    @staticmethod
    def make():
        from fisher_optim.penalty import SampledLabelPenalty

        class Predicted(SampledLabelPenalty):
            name = "predicted_label"

            def draw(self, likelihood, logits, generator):
                return logits.detach().argmax(-1)

        return Predicted


def test_a_new_penalty_is_one_class_and_one_registry_entry(monkeypatch):
    from fisher_optim import FisherPenaltySGD
    from fisher_optim.penalty import PENALTY_REGISTRY

    cls = PredictedLabelPenalty.make()
    monkeypatch.setitem(PENALTY_REGISTRY, cls.name, cls)
    model, x = tiny_mlp(), torch.randn(16, 5, dtype=torch.float64)
    loss, theta = flat_loss(model, x, model(x).argmax(-1))
    expected = grad(loss)(theta).pow(2).sum()
    for penalty in ("predicted_label", cls()):  # by its name, or the instance
        value = fisher_penalty(model, x, penalty=penalty)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, penalty="predicted_label")
    F.cross_entropy(model(x), torch.randint(4, (16,))).backward()
    opt.step()
    torch.testing.assert_close(opt.penalty_value, float(expected), rtol=1e-6, atol=0)

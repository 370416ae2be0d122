import pytest
import torch
import torch.nn.functional as F

from fisher_optim._logits import as_logits
from fisher_optim.likelihoods import Bernoulli, Categorical, Gaussian, get_likelihood, sample_labels


def test_as_logits_flattens_sequence_and_applies_output_fn():
    out = {"logits": torch.randn(2, 3, 5)}
    assert as_logits(out, lambda o: o["logits"]).shape == (6, 5)


def test_as_logits_takes_the_logits_of_dicts_dataclasses_and_model_outputs():
    from dataclasses import dataclass

    @dataclass
    class Output:
        loss: torch.Tensor
        logits: torch.Tensor

    logits = torch.randn(2, 3, 5)
    assert torch.equal(as_logits({"loss": torch.tensor(1.0), "logits": logits}), logits.view(6, 5))
    assert torch.equal(as_logits(Output(torch.tensor(1.0), logits)), logits.view(6, 5))
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutput(loss=torch.tensor(1.0), logits=logits)
    assert torch.equal(as_logits(out), logits.view(6, 5))


def test_as_logits_errors_name_the_fix():
    with pytest.raises(TypeError, match="output_fn"):
        as_logits({"scores": torch.randn(2, 5)})
    with pytest.raises(TypeError, match="output_fn"):
        as_logits((torch.tensor(1.0), torch.randn(2, 5)))  # a tuple is ambiguous
    with pytest.raises(ValueError, match="output_fn"):
        as_logits(torch.randn(5))


def test_sample_labels_follow_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    labels = sample_labels(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    # 4 standard errors of a binomial proportion
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=4 * 0.0033)


def test_uniform_labels_and_bad_kind():
    labels = sample_labels(torch.zeros(30000, 3), "uniform", torch.Generator().manual_seed(0))
    assert (torch.bincount(labels).double() / 30000 - 1 / 3).abs().max() < 0.012
    with pytest.raises(ValueError, match="'sample', 'uniform'"):
        sample_labels(torch.zeros(2, 3), "soft")


# ------------------------------------------------------------------ likelihoods
LIKELIHOOD_CASES = [
    ("categorical", 4, lambda z, y: F.cross_entropy(z, y, reduction="none")),
    (
        "bernoulli",
        3,
        lambda z, y: (
            -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).sum(-1)
        ),
    ),
    ("gaussian", 2, lambda z, y: (y - z).square().sum(-1) / (2 * 0.7**2)),
]


def _likelihood(name):
    return Gaussian(sigma=0.7) if name == "gaussian" else get_likelihood(name)


@pytest.mark.parametrize(("name", "c", "nll"), LIKELIHOOD_CASES)
def test_nll_and_score_are_the_negative_log_likelihood_and_its_gradient(name, c, nll):
    """Against the log-density written out, per row, in float64 (autograd for the score)."""
    lik = _likelihood(name)
    z = torch.randn(6, c, dtype=torch.float64, requires_grad=True)
    y = lik.sample(z, torch.Generator().manual_seed(0))
    per_row = nll(z, y)
    torch.testing.assert_close(lik.nll(z, y), per_row.mean(), rtol=1e-12, atol=0)
    (score,) = torch.autograd.grad(per_row.sum(), z)
    torch.testing.assert_close(lik.score(z.detach(), y), score, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "c", "nll"), LIKELIHOOD_CASES)
def test_fisher_factors_are_the_expected_hessian_of_the_nll(name, c, nll):
    """Σ_k u_k u_k^T = E_ŷ[∇²_z ℓ(z, ŷ)] (the Fisher is the expected Hessian of the NLL), with
    the expectation by enumeration of the labels (categorical, bernoulli: all 2^C vectors)."""
    lik = _likelihood(name)
    z = torch.randn(c, dtype=torch.float64)
    if name == "categorical":
        probs = torch.softmax(z, -1)
        labels = [(torch.tensor(k), probs[k]) for k in range(c)]
    elif name == "bernoulli":
        p = torch.sigmoid(z)
        labels = [
            (y, torch.where(y == 1, p, 1 - p).prod())
            for y in torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * c)
        ]
    else:  # the Hessian of the Gaussian NLL does not depend on ŷ
        labels = [(torch.randn(c, dtype=torch.float64), torch.tensor(1.0))]
    expected = sum(
        w * torch.autograd.functional.hessian(lambda t, y=y: nll(t[None], y[None]).sum(), z)
        for y, w in labels
    )
    factors = lik.fisher_factors(z[None])
    got = sum(u[0][:, None] * u[0][None, :] for u in factors)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_bernoulli_and_gaussian_labels_follow_their_distribution():
    z = torch.tensor([[-1.0, 0.5]], dtype=torch.float64).repeat(20000, 1)
    y = get_likelihood("bernoulli").sample(z, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    # 4 standard errors of a binomial proportion (p ≈ 0.27, 0.62)
    assert torch.allclose(y.mean(0), torch.sigmoid(z[0]), atol=4 * 0.0035)
    y = Gaussian(sigma=0.5).sample(z, torch.Generator().manual_seed(0))
    assert torch.allclose(y.mean(0), z[0], atol=4 * 0.5 / 20000**0.5)
    assert torch.allclose(y.std(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.01)
    half = get_likelihood("bernoulli").sample_uniform(z, torch.Generator().manual_seed(0))
    assert torch.allclose(half.mean(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.015)


def test_sampling_is_seeded_by_the_generator():
    z = torch.randn(50, 3)
    for lik in (Categorical(), Bernoulli(), Gaussian()):
        a = lik.sample(z, torch.Generator().manual_seed(4))
        b = lik.sample(z, torch.Generator().manual_seed(4))
        assert torch.equal(a, b), lik


def test_categorical_with_one_output_raises_and_names_the_likelihoods():
    with pytest.raises(ValueError, match="identically 0.*likelihood='bernoulli'.*'gaussian'"):
        Categorical().sample(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="identically 0.*likelihood='bernoulli'"):
        Categorical().sample_uniform(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        sample_labels(torch.zeros(4, 1))


def test_likelihood_choice_errors():
    with pytest.raises(ValueError, match="'categorical', 'bernoulli', 'gaussian'"):
        get_likelihood("poisson")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            Gaussian(sigma=bad)
    with pytest.raises(TypeError, match="sigma"):
        Gaussian(sigma="1")
    with pytest.raises(ValueError, match="one target per output"):
        Bernoulli().as_targets(torch.zeros(3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="one class index per row"):
        Categorical().as_targets(torch.zeros(3, 2), torch.zeros(3, 4))


def test_a_new_likelihood_is_one_class_and_one_registry_entry(monkeypatch):
    import torch

    from fisher_optim import fisher_penalty
    from fisher_optim.likelihoods import LIKELIHOOD_REGISTRY, Categorical, get_likelihood

    class Softmax(Categorical):
        name = "softmax"

    monkeypatch.setitem(LIKELIHOOD_REGISTRY, "softmax", Softmax)
    assert isinstance(get_likelihood("softmax"), Softmax)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(5, 4).double(), torch.randn(8, 5, dtype=torch.float64)
    values = [
        fisher_penalty(model, x, likelihood=lik, generator=torch.Generator().manual_seed(1))
        for lik in ("softmax", "categorical")
    ]
    assert values[0].item() == values[1].item()

"""Tr(F) and Tr(F_B) against brute force in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim.curvature import fisher_trace, minibatch_fisher_trace
from fisher_optim.likelihoods import Gaussian, sample_labels

from .conftest import small_cnn, tiny_mlp
from .curvature_utils import (
    assert_unchanged,
    example_grad,
    loop_exact_fisher,
    randomize_state,
    snapshot,
)
from .test_curvature_per_example import TinyLM, lm_logits

MODELS = {
    "mlp": (lambda: tiny_mlp(), lambda n: torch.randn(n, 5).double()),
    "cnn_bn": (lambda: small_cnn(), lambda n: torch.randn(n, 3, 8, 8).double()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_matches_loop_over_examples_and_classes(name):
    model_fn, x_fn = MODELS[name]
    model, x = randomize_state(model_fn()), x_fn(7)
    model.train()
    snap = snapshot(model)
    value = fisher_trace(model, x, labels="exact", chunk_size=3)
    assert_unchanged(model, snap)
    assert value == pytest.approx(loop_exact_fisher(model, x), rel=1e-10)


def test_dataloader_and_batch_list_inputs():
    model, x = randomize_state(small_cnn()), torch.randn(10, 3, 8, 8).double()
    y = torch.randint(0, 5, (10,))
    whole = fisher_trace(model, x, labels="exact")
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert fisher_trace(model, loader, labels="exact") == pytest.approx(whole, rel=1e-12)
    assert fisher_trace(model, [x[:3], x[3:]], labels="exact") == pytest.approx(whole, rel=1e-12)
    assert fisher_trace(model, (x, y), labels="exact") == pytest.approx(whole, rel=1e-12)


def test_sequence_logits_with_output_fn():
    """[B, T, V] logits: one label per position, an example's loss the mean over T; the
    brute force sums over all V^T label tuples."""
    model, ids = TinyLM(vocab=3).double(), torch.randint(0, 3, (4, 3))
    exact = fisher_trace(model, ids, labels="exact", output_fn=lm_logits)
    assert exact == pytest.approx(loop_exact_fisher(model, ids, lm_logits), rel=1e-10)


def _sampled_mean_within_4_se(model, x, output_fn=None, repeats=300):
    exact = fisher_trace(model, x, labels="exact", output_fn=output_fn)
    g = torch.Generator().manual_seed(123)
    values = torch.tensor(
        [fisher_trace(model, x, output_fn=output_fn, generator=g) for _ in range(repeats)]
    )
    se = values.std() / repeats**0.5
    assert values.std() > 0
    assert abs(values.mean() - exact) < 4 * se, (float(values.mean()), exact, float(se))


@pytest.mark.parametrize("name", list(MODELS))
def test_sampled_labels_average_to_exact(name):
    model_fn, x_fn = MODELS[name]
    _sampled_mean_within_4_se(randomize_state(model_fn()), x_fn(6))


def test_sampled_labels_average_to_exact_for_sequences():
    _sampled_mean_within_4_se(TinyLM().double(), torch.randint(0, 4, (5, 4)), lm_logits)


def test_sampled_equals_loop_with_the_same_labels():
    """With a seeded generator the labels are those of sample_labels on the chunk logits."""
    model, x = randomize_state(small_cnn()), torch.randn(6, 3, 8, 8).double()
    value = fisher_trace(model, x, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        labels = sample_labels(ref(x), generator=torch.Generator().manual_seed(5))
    expected = sum(
        float(
            example_grad(ref, F.cross_entropy(ref(x[i : i + 1]), labels[i : i + 1])).square().sum()
        )
        for i in range(len(x))
    ) / len(x)
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_minibatch_fisher_trace_matches_brute_force(mode):
    model, x = randomize_state(small_cnn()), torch.randn(8, 3, 8, 8).double()
    model.train(mode == "train")
    snap = snapshot(model)
    value = minibatch_fisher_trace(model, x, generator=torch.Generator().manual_seed(3))
    assert_unchanged(model, snap)  # running statistics untouched even in training mode
    ref = copy.deepcopy(model)
    logits = ref(x)
    labels = sample_labels(logits, generator=torch.Generator().manual_seed(3))
    expected = float(example_grad(ref, F.cross_entropy(logits, labels)).square().sum())
    assert value == pytest.approx(expected, rel=1e-10)


def test_minibatch_fisher_trace_sequences():
    model, ids = TinyLM().double(), torch.randint(0, 4, (3, 5))
    value = minibatch_fisher_trace(
        model, ids, output_fn=lm_logits, generator=torch.Generator().manual_seed(0)
    )
    logits = lm_logits(model(ids)).reshape(-1, 4)
    labels = sample_labels(logits, generator=torch.Generator().manual_seed(0))
    expected = float(example_grad(model, F.cross_entropy(logits, labels)).square().sum())
    assert value == pytest.approx(expected, rel=1e-10)


def test_bad_arguments():
    model, x = tiny_mlp(), torch.randn(4, 5).double()
    with pytest.raises(ValueError, match=r"labels must be one of \('sample', 'exact'\)"):
        fisher_trace(model, x, labels="empirical")
    with pytest.raises(ValueError, match="chunk_size"):
        fisher_trace(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="no examples"):
        fisher_trace(model, [])
    with pytest.raises(TypeError):
        fisher_trace(model, 3.0)


# ------------------------------------------------- likelihoods: one logit, multi-label, regression
def _head(c):
    torch.manual_seed(4)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, c)
    ).double()


def _loop_exact_bernoulli(model, x):
    """(1/N) Σ_i Σ_{y ∈ {0,1}^C} p(y|x_i) ||∇_θ -log p(y|x_i)||², all label vectors."""
    total = 0.0
    for xi in x:
        z = model(xi[None])[0]
        p = torch.sigmoid(z).detach()
        for y in torch.cartesian_prod(
            *[torch.tensor([0.0, 1.0], dtype=torch.float64)] * z.numel()
        ).reshape(-1, z.numel()):
            weight = float(torch.where(y == 1, p, 1 - p).prod())
            s = torch.sigmoid(model(xi[None])[0])
            nll = -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).sum()
            total += weight * float(example_grad(model, nll).square().sum())
    return total / len(x)


def _loop_exact_gaussian(model, x, sigma):
    """(1/N) Σ_i ||J_i||_F² / σ², J_i = ∂f(x_i)/∂θ: E||J^T (f - ŷ)/σ²||² for ŷ ~ N(f, σ²)."""
    total = 0.0
    for xi in x:
        z = model(xi[None])[0]
        for k in range(z.numel()):
            total += float(example_grad(model, model(xi[None])[0, k]).square().sum())
    return total / len(x) / sigma**2


@pytest.mark.parametrize("c", [1, 2])
def test_exact_fisher_trace_of_bernoulli_and_gaussian_likelihoods(c):
    model, x = _head(c), torch.randn(6, 5).double()
    bern = fisher_trace(model, x, labels="exact", likelihood="bernoulli", chunk_size=4)
    assert bern == pytest.approx(_loop_exact_bernoulli(model, x), rel=1e-10)
    gauss = fisher_trace(model, x, labels="exact", likelihood=Gaussian(sigma=0.5))
    assert gauss == pytest.approx(_loop_exact_gaussian(model, x, 0.5), rel=1e-10)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_sampled_fisher_trace_and_minibatch_trace_per_likelihood(likelihood):
    """Sampled Tr(F) is unbiased, and E[Tr(F_B)] = Tr(F)/N (the score has zero mean): both
    within 4 standard errors of the brute force."""
    model, x = _head(1), torch.randn(8, 5).double()
    exact = (
        _loop_exact_bernoulli(model, x)
        if likelihood == "bernoulli"
        else _loop_exact_gaussian(model, x, 1.0)
    )
    g = torch.Generator().manual_seed(0)
    sampled = torch.tensor(
        [fisher_trace(model, x, likelihood=likelihood, generator=g) for _ in range(300)]
    )
    assert abs(sampled.mean() - exact) < 4 * sampled.std() / 300**0.5
    batch = torch.tensor(
        [minibatch_fisher_trace(model, x, likelihood=likelihood, generator=g) for _ in range(300)]
    )
    assert abs(batch.mean() - exact / 8) < 4 * batch.std() / 300**0.5


def test_one_output_with_the_categorical_likelihood_raises():
    model, x = _head(1), torch.randn(4, 5).double()
    for labels in ("sample", "exact"):
        with pytest.raises(ValueError, match="identically 0.*likelihood='bernoulli'"):
            fisher_trace(model, x, labels=labels)
    with pytest.raises(ValueError, match="identically 0.*likelihood='gaussian'"):
        minibatch_fisher_trace(model, x)


def test_target_mask_excludes_rows_of_any_model():
    """``target_mask`` (called like the model): rows without a target take no part; an
    example's loss is the mean over its rows with one. Brute force: every label tuple of
    the kept rows, one example at a time."""
    model, ids = TinyLM(vocab=3).double(), torch.randint(1, 3, (4, 3))
    ids[0, 1] = ids[2, 0] = 0
    ids[3] = 0  # no target at all: takes no part, not even in the count of examples

    def target_mask(t):
        return t != 0

    exact = fisher_trace(model, ids, labels="exact", output_fn=lm_logits, target_mask=target_mask)
    ref = copy.deepcopy(model).eval()
    total = 0.0
    for i in range(len(ids)):
        keep = (ids[i] != 0).nonzero().reshape(-1)
        if len(keep) == 0:
            continue
        with torch.no_grad():
            probs = torch.softmax(lm_logits(ref(ids[i : i + 1]))[0, keep], -1)
        for labels in torch.cartesian_prod(*[torch.arange(3)] * len(keep)).reshape(-1, len(keep)):
            weight = float(probs[torch.arange(len(keep)), labels].prod())
            loss = F.cross_entropy(lm_logits(ref(ids[i : i + 1]))[0, keep], labels)
            total += weight * float(example_grad(ref, loss).square().sum())
    assert exact == pytest.approx(total / (len(ids) - 1), rel=1e-10)

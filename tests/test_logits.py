import pytest
import torch

from fisher_optim._logits import as_logits, sample_labels


def test_as_logits_flattens_sequence_and_applies_output_fn():
    out = {"logits": torch.randn(2, 3, 5)}
    assert as_logits(out, lambda o: o["logits"]).shape == (6, 5)


def test_as_logits_errors_name_the_fix():
    with pytest.raises(TypeError, match="output_fn"):
        as_logits({"logits": torch.randn(2, 5)})
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

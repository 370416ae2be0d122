"""Which rows have a target (fisher_optim.targets), and the penalty over those rows only.

Hugging Face models are tested in tests/test_integration_hf.py; here: the explicit
``target_mask`` on a model of our own, its errors, and ``penalty_scale="per_row"``, each against
a float64 brute force written from the math (per-row gradients in a loop, labels enumerated).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import Batch, FisherPenaltySGD, fisher_penalty
from fisher_optim.penalty import PenaltyObjective
from fisher_optim.targets import causal_target_rows, target_rows

VOCAB = 11


class TinyCausalLM(nn.Module):
    """Embedding, a causal running mean over positions, tanh, a linear head: ``[B, T, V]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(h))


def _causal_mask(input_ids, attention_mask=None):
    return causal_target_rows(input_ids.shape, attention_mask=attention_mask)


def _padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def brute_penalty(logits_fn, params, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||(1/N) Σ_{rows n} ∇ CE(f_n, ŷ_n)||²``, one row at a time, float64."""
    flat = logits_fn()
    flat = flat.reshape(-1, flat.shape[-1])
    index = rows.reshape(-1).nonzero().flatten()
    assert len(index) == len(labels)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for k, i in enumerate(index.tolist()):
        loss = F.cross_entropy(flat[i : i + 1], labels[k : k + 1])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        total += torch.cat([g.flatten() for g in grads])
    total /= len(index)
    return total.dot(total)


def _expected_causal_rows(mask: torch.Tensor) -> torch.Tensor:
    """Row (b, t) has a target iff token t and token t + 1 are real (written out by hand)."""
    b, t = mask.shape
    rows = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        for j in range(t - 1):
            rows[i, j] = bool(mask[i, j]) and bool(mask[i, j + 1])
    return rows


def test_causal_target_rows_follow_the_shift():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert torch.equal(causal_target_rows((2, 4), attention_mask=mask), _expected_causal_rows(mask))
    labels = torch.tensor([[5, -100, 3, 2], [-100, -100, -100, 1]])
    expected = torch.tensor([[False, True, True, False], [False, False, True, False]])
    assert torch.equal(causal_target_rows((2, 4), labels=labels), expected)
    shift = torch.tensor([[1, -100, 2, -100]])
    assert torch.equal(causal_target_rows((1, 4), shift_labels=shift), shift != -100)
    assert torch.equal(causal_target_rows((1, 3)), torch.tensor([[True, True, False]]))


def test_other_models_have_every_row_unless_target_mask_says():
    model = TinyCausalLM()
    ids, mask = _padded_batch(0)
    assert target_rows(model, (ids,), {"attention_mask": mask}, (3, 5, VOCAB)) is None
    rows = target_rows(model, (ids,), {"attention_mask": mask}, (3, 5, VOCAB), _causal_mask)
    assert torch.equal(rows, _expected_causal_rows(mask))
    flat = target_rows(model, (ids,), {}, (3, 5, VOCAB), lambda ids: torch.ones(15, dtype=bool))
    assert flat.shape == (3, 5)


def test_target_mask_errors_name_the_fix():
    model = TinyCausalLM()
    ids, _ = _padded_batch(0)
    with pytest.raises(TypeError, match=r"\.bool\(\)"):
        target_rows(model, (ids,), {}, (3, 5, VOCAB), lambda ids: torch.ones(3, 5))
    with pytest.raises(ValueError, match="one entry per row"):
        target_rows(model, (ids,), {}, (3, 5, VOCAB), lambda ids: torch.ones(3, 4, dtype=bool))
    with pytest.raises(TypeError, match="target_mask"):
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, target_mask=torch.ones(3, 5, dtype=bool))


@pytest.mark.parametrize("pad_id", [0, 7])
def test_penalty_with_target_mask_is_brute_force_over_real_rows(pad_id: int):
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids, mask = _padded_batch(pad_id)
    batch = Batch((ids,), {"attention_mask": mask})
    objective = PenaltyObjective(
        model, batch, target_mask=_causal_mask, generator=torch.Generator().manual_seed(5)
    )
    params = list(model.parameters())
    grads = torch.autograd.grad(objective.loss(), params)
    value = sum(g.pow(2).sum() for g in grads)
    rows = _expected_causal_rows(mask)
    assert len(objective.labels) == int(rows.sum())
    expected = brute_penalty(lambda: model(ids), params, rows, objective.labels)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    # the same value from the public function, whatever the pad tokens' ids (same generator)
    public = fisher_penalty(
        model, batch, target_mask=_causal_mask, generator=torch.Generator().manual_seed(5)
    )
    other_ids, _ = _padded_batch(3 if pad_id == 0 else 0)
    other = fisher_penalty(
        model,
        Batch((other_ids,), {"attention_mask": mask}),
        target_mask=_causal_mask,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(public, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(other, expected, rtol=1e-10, atol=0)


def test_no_row_with_a_target_gives_a_zero_penalty_not_nan():
    model = TinyCausalLM().double()
    ids, _ = _padded_batch(0)
    value = fisher_penalty(model, ids, target_mask=lambda ids: torch.zeros_like(ids, dtype=bool))
    assert float(value.detach()) == 0.0


def test_per_row_scale_is_n_times_the_batch_penalty():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids, mask = _padded_batch(0)
    batch = Batch((ids,), {"attention_mask": mask})
    rows = _expected_causal_rows(mask)
    per_row = PenaltyObjective(
        model,
        batch,
        target_mask=_causal_mask,
        penalty_scale="per_row",
        generator=torch.Generator().manual_seed(5),
    )
    params = list(model.parameters())
    value = sum(g.pow(2).sum() for g in torch.autograd.grad(per_row.loss(), params))
    expected = int(rows.sum()) * brute_penalty(lambda: model(ids), params, rows, per_row.labels)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="penalty='fisher'"):
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, penalty="random_label", penalty_scale="per_row")
    with pytest.raises(ValueError, match="'batch', 'per_row'"):
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, penalty_scale="tokens")


def test_per_row_scale_is_unbiased_for_the_mean_row_trace():
    """The derivation of ``penalty_scale="per_row"``, by enumerating every label pair:
    ``E_ŷ[N · Tr(F_B)] = (1/N) Σ_n Tr(F_n)`` for N = 2 rows of a 3-class linear model."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    params = list(model.parameters())
    probs = torch.softmax(model(x), -1).detach()

    def row_grad(n: int, label: int) -> torch.Tensor:
        loss = F.cross_entropy(model(x[n : n + 1]), torch.tensor([label]))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    grads = [[row_grad(n, c) for c in range(3)] for n in range(2)]
    mean_trace = (
        sum(probs[n, c] * grads[n][c].dot(grads[n][c]) for n in range(2) for c in range(3)) / 2
    )
    expectation = 0.0
    for c0, c1 in itertools.product(range(3), repeat=2):
        g = (grads[0][c0] + grads[1][c1]) / 2
        expectation += probs[0, c0] * probs[1, c1] * 2 * g.dot(g)
    torch.testing.assert_close(expectation, mean_trace, rtol=1e-12, atol=0)


def test_fisher_noise_diagonal_with_target_mask_ignores_padding():
    from fisher_optim import FisherNoiseSGD

    estimates = []
    for pad_id in (0, 7):
        torch.manual_seed(0)
        model = TinyCausalLM().double()
        ids, mask = _padded_batch(pad_id)
        opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, seed=0, target_mask=_causal_mask)
        opt.zero_grad()
        F.cross_entropy(
            model(ids, attention_mask=mask).reshape(-1, VOCAB), ids.reshape(-1)
        ).backward()
        opt.step()
        estimates.append(opt.fisher_trace)
    assert estimates[0] == pytest.approx(estimates[1], rel=1e-10)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_optimizer_takes_target_mask_and_penalty_scale(mode: str):
    """FisherPenaltySGD's first refresh: the brute force over the real rows (times N with
    ``"per_row"``); its step does not depend on the pad tokens' ids."""
    results = {}
    for scale in ("batch", "per_row"):
        for pad_id in (0, 7):
            torch.manual_seed(0)
            model = TinyCausalLM().double()
            ids, mask = _padded_batch(pad_id)
            rows = _expected_causal_rows(mask)
            objective = PenaltyObjective(  # the optimizer's first label draw (same seed)
                model,
                Batch((ids,), {"attention_mask": mask}),
                target_mask=_causal_mask,
                generator=torch.Generator().manual_seed(9),
            )
            objective.loss()
            factor = int(rows.sum()) if scale == "per_row" else 1
            expected = factor * brute_penalty(
                lambda m=model, i=ids: m(i), list(model.parameters()), rows, objective.labels
            )
            opt = FisherPenaltySGD(
                model,
                lr=0.1,
                alpha=0.1,
                every=1,
                mode=mode,
                seed=9,
                target_mask=_causal_mask,
                penalty_scale=scale,
            )
            next_tokens = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).masked_fill(~rows, -100)
            opt.zero_grad()  # the training loss: next tokens, real positions only
            F.cross_entropy(
                model(ids, attention_mask=mask).reshape(-1, VOCAB), next_tokens.reshape(-1)
            ).backward()
            opt.step()
            assert opt.penalty_value == pytest.approx(float(expected), rel=1e-6)  # fp32 value
            results[scale, pad_id] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for scale in ("batch", "per_row"):
        torch.testing.assert_close(results[scale, 0], results[scale, 7], rtol=1e-12, atol=1e-15)

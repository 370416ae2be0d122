"""FisherNoiseSGD's ``diag F = (1/M) Σ_i g_i ⊙ g_i`` through the per-layer rules
(:meth:`fisher_optim.curvature.layers.LayerRule.sq_grads`), against a per-example autograd
loop in float64: every covered family (no per-example fallback taken), sequences, grouped
convolutions, embeddings; tied weights and a custom layer fall back; rows without a target
(-100 targets, ``target_mask`` with sampled labels) are left out alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim import likelihoods
from fisher_optim.curvature import gradient_moment
from fisher_optim.fisher_noise_sgd import FisherNoiseSGD

D = torch.float64


class Pool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


class Scale(nn.Module):
    """A layer no rule covers: its own parameter, used by hand."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class TiedLM(nn.Module):
    """An embedding whose weight is also the head (``F.linear(h, emb.weight)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(ids))), self.emb.weight)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2, stride=2),
        nn.GroupNorm(2, 6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


MODELS = {  # name: (model, input shape or vocabulary, parameters no rule covers)
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)), (3,), 0),
    "seq_linear": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), Pool(), nn.Linear(6, 4)),
        (5, 3),
        0,
    ),
    "cnn_bn_grouped": (_cnn, (3, 6, 6), 0),
    "conv1d_rmsnorm": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.RMSNorm(20), nn.Linear(20, 3)
        ),
        (2, 5),
        0,
    ),
    "wide_grouped_conv": (
        lambda: nn.Sequential(nn.Conv2d(32, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)),
        (32, 4, 4),
        0,
    ),
    "embedding_lm": (
        lambda: nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 7)),
        7,
        0,
    ),
    "tied": (TiedLM, 7, 1),  # emb.weight (mid, fed by the embedding not taken, is covered)
    "custom_layer": (
        lambda: nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3)),
        (3,),
        1,  # Scale.s; the Linear layers are covered
    ),
}


def _data(spec, n: int, seq: int = 4) -> Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(spec, int):
        return torch.randint(spec, (n, seq), generator=g)
    return torch.randn(n, *spec, generator=g, dtype=D)


def _brute_diag(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """``(1/M) Σ_i g_i²``, ``g_i`` of the mean CE over example i's rows with a target."""
    model = model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])
        logits, yi = logits.reshape(-1, logits.shape[-1]), y[i].reshape(-1)
        keep = yi != -100
        if not bool(keep.any()):
            continue
        loss = F.cross_entropy(logits[keep], yi[keep])
        for s, d in zip(sums, torch.autograd.grad(loss, params, allow_unused=True)):
            if d is not None:
                s += d.square()
    return [s / x.shape[0] for s in sums]


def _estimate(model, x, y, monkeypatch, uncovered, **kw) -> list[Tensor]:
    calls = []
    real = gradient_moment.example_grads

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gradient_moment, "example_grads", counting)
    opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, fisher="empirical", seed=0, **kw)
    model.train()
    model(x)
    opt.set_targets(y)
    opt._refresh(opt.current_batch())
    first = [c for c in opt._cache if c is not None]
    opt._refresh(opt.current_batch())  # the layout is checked: no value checks this time
    for a, b in zip(first, [c for c in opt._cache if c is not None], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert set(calls) <= {uncovered} and bool(calls) == bool(uncovered), calls
    return first


@pytest.mark.parametrize("name", sorted(MODELS))
def test_diag_fisher_matches_a_per_example_loop(name, monkeypatch):
    make, spec, uncovered = MODELS[name]
    torch.manual_seed(0)
    model = make().to(D)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # the capturing forward keeps these (momentum 0)
            m.momentum = 0.0
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    n = 6
    x = _data(spec, n)
    rows = model.eval()(x).shape[1:-1]
    y = torch.randint(model(x).shape[-1], (n, *rows), generator=torch.Generator().manual_seed(2))
    if rows:  # sequences: rows without a target, and an example without any
        y[0, 1], y[3] = -100, -100
    want = _brute_diag(model, x, y)
    got = _estimate(model, x, y, monkeypatch, uncovered)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_more_examples_than_a_chunk(monkeypatch):
    """The labels are drawn, and the fallback runs, chunk by chunk of PER_EXAMPLE_CHUNK."""
    monkeypatch.setattr(gradient_moment, "PER_EXAMPLE_CHUNK", 4)
    make, spec, _ = MODELS["custom_layer"]
    torch.manual_seed(0)
    model = make().to(D)
    x = _data(spec, 10)
    y = torch.randint(3, (10,), generator=torch.Generator().manual_seed(2))
    want = _brute_diag(model, x, y)
    got = _estimate(model, x, y, monkeypatch, uncovered=1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_target_mask_rows_get_no_sampled_label(monkeypatch):
    """fisher='true': masked rows get -100, so the estimate is the loop's with the labels
    drawn (recorded here) and the masked rows left out."""
    drawn = []
    real = likelihoods.sample_labels

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn.append(out)
        return out

    monkeypatch.setattr(likelihoods, "sample_labels", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x = _data((4, 2), 5)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2], mask[4] = False, False
    opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, seed=0, target_mask=lambda inp: mask)
    model(x)
    opt._refresh(opt.current_batch())
    labels = torch.cat(drawn).reshape(5, 4).masked_fill(~mask, -100)
    want = _brute_diag(model, x, labels)
    for a, b in zip([c for c in opt._cache if c is not None], want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["embedding_lm", "seq_linear", "tied"])
def test_later_estimates_read_one_number_back(name):
    """Once a layout is checked, an estimate reads back only its trace: no value checks, no
    read-back of the buffers (the embedding's rows are summed by a sort, not
    ``torch.unique``, which would also read back on CUDA)."""
    from benchmarks.common.syncs import SyncCounter

    make, spec, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().to(D)
    x = _data(spec, 6)
    opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, seed=0)
    model(x)
    counts = []
    for _ in range(3):
        with SyncCounter() as counter:
            opt._refresh(opt.current_batch())
        counts.append(counter.count)
    assert counts[1:] == [1, 1], counts

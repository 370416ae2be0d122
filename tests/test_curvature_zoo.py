"""A zoo of layouts for the per-example machinery, against float64 brute force.

Issue 14, items 7-9 and "what it must show": per-example gradient norms and Tr(F) (exact
and with sampled labels) on transformer layers with the sequence first and the batch first,
at ``T == B`` and ``T != B``; a weight tied by ``F.linear(h, emb.weight)`` and a weight used
again outside its module; modules registered twice; Conv1d/Conv2d/Embedding/LayerNorm/
GroupNorm/BatchNorm (eval); a convolution over frames folded into the batch. Brute force:
one ``torch.autograd.grad`` per example on a copy of the model (enumerating every label
tuple for the exact Tr(F)). Afterwards the model holds the same ``Parameter`` objects,
bitwise the same buffers, ``.grad`` and train/eval flags.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim.curvature import fisher_trace, per_example_grad_norms
from fisher_optim.curvature import per_example as pe
from fisher_optim.likelihoods import sample_labels

from .curvature_utils import (
    assert_unchanged,
    example_grad,
    loop_exact_fisher,
    loop_sq_norms,
    randomize_state,
    snapshot,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning",
    "ignore:enable_nested_tensor:UserWarning",
)

VOCAB, D, CLASSES = 7, 8, 2


class Transformer(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, C]`` through ``nn.TransformerEncoderLayer``,
    run with the sequence first (``[T, B, D]``, ``batch_first=False``: its Linear and
    LayerNorm layers see the examples in dimension 1; the Embedding is fed ``ids.T``) or
    with the batch first."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 12, dropout=0.0, batch_first=batch_first)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        if self.batch_first:
            return self.head(self.norm(self.layer(self.emb(ids))))
        h = self.layer(self.emb(ids.T))  # [T, B, D]
        return self.head(self.norm(h)).transpose(0, 1)


class Tied(nn.Module):
    """The output layer tied to the embedding by ``F.linear(h, emb.weight)``, and a
    Linear's weight used a second time by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.mix(h) + 0.5 * F.linear(h, self.mix.weight))
        return F.linear(h, self.emb.weight)  # [B, T, VOCAB]


class Stack(nn.Module):
    """One block registered twice in a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(5, 5)
        self.blocks = nn.ModuleList([block] * 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def shared_sequential() -> nn.Module:
    shared = nn.Linear(5, 5)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(5, 3))


class Layers(nn.Module):
    """Conv2d, BatchNorm2d (eval), GroupNorm, Conv1d, LayerNorm, Linear; and a Conv1d over
    frames folded into the batch (``[B·H, C, W]``: its dimension 0 is not the examples)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.frames = nn.Conv1d(4, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 3, 2)
        self.ln = nn.LayerNorm(3)
        self.head = nn.Linear(3 * 4, CLASSES + 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gn(torch.tanh(self.bn(self.c2(x)))))  # [B, 4, 5, 5]
        b, c, height, width = h.shape
        folded = h.permute(0, 2, 1, 3).reshape(b * height, c, width)
        h = torch.tanh(self.frames(folded)).reshape(b, height, c, width).mean(1)  # [B, 4, 5]
        h = self.ln(self.c1(h).transpose(1, 2))  # [B, 4, 3]
        return self.head(torch.tanh(h).flatten(1))


def _ids(n: int, t: int) -> Tensor:
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(n * 10 + t))


# name: (model, inputs, classes)
ZOO = {
    "seq_first_T=B": (lambda: Transformer(False), lambda: _ids(4, 4), CLASSES),
    "seq_first_T<B": (lambda: Transformer(False), lambda: _ids(4, 3), CLASSES),
    "seq_first_T>B": (lambda: Transformer(False), lambda: _ids(3, 4), CLASSES),
    "batch_first_T=B": (lambda: Transformer(True), lambda: _ids(4, 4), CLASSES),
    "batch_first_T<B": (lambda: Transformer(True), lambda: _ids(4, 3), CLASSES),
    "tied": (Tied, lambda: _ids(4, 3), VOCAB),
    "module_list_twice": (Stack, lambda: torch.randn(5, 5), 3),
    "sequential_shared": (shared_sequential, lambda: torch.randn(5, 5), 3),
    "layers": (Layers, lambda: torch.randn(5, 2, 5, 5), CLASSES + 1),
}


def _make(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    model_fn, x_fn, classes = ZOO[name]
    torch.manual_seed(0)
    model = randomize_state(model_fn().double())
    x = x_fn()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        rows = model.eval()(x).shape[:-1]
    model.train()
    y = torch.randint(classes, rows, generator=torch.Generator().manual_seed(3))
    return model, x, y


def _check_left_as_found(model: nn.Module, params: list[nn.Parameter], snap: dict) -> None:
    assert_unchanged(model, snap)
    now = list(model.parameters())
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params, strict=True))
    assert all(type(p) is nn.Parameter for p in now)


@pytest.mark.parametrize("name", list(ZOO))
def test_per_example_norms(name: str) -> None:
    model, x, y = _make(name)
    params, snap = list(model.parameters()), snapshot(model)
    norms = per_example_grad_norms(model, x, y)
    _check_left_as_found(model, params, snap)
    expected = loop_sq_norms(model, x, y)
    torch.testing.assert_close(norms.square(), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(ZOO))
def test_exact_fisher_trace(name: str) -> None:
    model, x, _ = _make(name)
    if name == "tied":  # VOCAB ** T label tuples: fewer positions
        x = x[:, :2]
    params, snap = list(model.parameters()), snapshot(model)
    value = fisher_trace(model, x, labels="exact", chunk_size=3)
    _check_left_as_found(model, params, snap)
    assert value == pytest.approx(loop_exact_fisher(model, x), rel=1e-10)


@pytest.mark.parametrize("name", list(ZOO))
def test_sampled_fisher_trace_with_fixed_generator(name: str) -> None:
    """With a seeded generator the labels are those of ``sample_labels`` on the batch's
    logits (one chunk); the brute force takes them one example at a time."""
    model, x, _ = _make(name)
    params, snap = list(model.parameters()), snapshot(model)
    value = fisher_trace(model, x, generator=torch.Generator().manual_seed(5))
    _check_left_as_found(model, params, snap)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = ref(x)
        labels = sample_labels(
            logits.reshape(-1, logits.shape[-1]), generator=torch.Generator().manual_seed(5)
        ).reshape(logits.shape[:-1])
    total = 0.0
    for i in range(len(x)):
        out = ref(x[i : i + 1])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels[i].reshape(-1))
        total += float(example_grad(ref, loss).square().sum())
    assert value == pytest.approx(total / len(x), rel=1e-10)


def test_sequence_first_layers_take_the_rules_with_the_examples_in_dimension_1(monkeypatch):
    """At ``T == B`` the sequence-first Linear/LayerNorm layers are not mistaken for
    batch-first ones: their rules run with the examples moved to dimension 0 (the batch
    dimension found by the one-example probe), and only the attention's own parameters
    (used outside their modules' forwards) go per example."""
    seen: dict[str, int] = {}
    original = pe.ghost_backward

    def spy(model, inputs, cotangents, on_layer, **kw):
        def record(rule, m, a, g):
            seen[type(m).__name__] = seen.get(type(m).__name__, 0) + 1
            assert a.shape[0] == g.shape[0] == 4
            on_layer(rule, m, a, g)

        return original(model, inputs, cotangents, record, **kw)

    monkeypatch.setattr(pe, "ghost_backward", spy)
    fallback: list[set[str]] = []
    original_fallback = pe.cotangent_grads

    def spy_fallback(model, inputs, g3, params, *args):
        names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
        fallback.append(names)
        return original_fallback(model, inputs, g3, params, *args)

    monkeypatch.setattr(pe, "cotangent_grads", spy_fallback)
    model, x, y = _make("seq_first_T=B")
    norms = per_example_grad_norms(model, x, y)
    torch.testing.assert_close(norms.square(), loop_sq_norms(model, x, y), rtol=1e-10, atol=0)
    assert seen == {"Embedding": 1, "Linear": 3, "LayerNorm": 3}
    assert fallback == [
        {
            "layer.self_attn.in_proj_weight",
            "layer.self_attn.in_proj_bias",
            "layer.self_attn.out_proj.weight",
            "layer.self_attn.out_proj.bias",
        }
    ]


def test_tied_weight_goes_per_example(monkeypatch):
    """A weight also used outside its own module is detected and taken per example."""
    fallback: list[set[str]] = []
    original = pe.cotangent_grads

    def spy(model, inputs, g3, params, *args):
        fallback.append({n for n, p in model.named_parameters() if any(p is q for q in params)})
        return original(model, inputs, g3, params, *args)

    monkeypatch.setattr(pe, "cotangent_grads", spy)
    model, x, y = _make("tied")
    per_example_grad_norms(model, x, y)
    assert fallback == [{"emb.weight", "mix.weight", "mix.bias"}]


@pytest.mark.parametrize("name", ["module_list_twice", "sequential_shared"])
def test_shared_module_still_trains_and_copies_after_a_measurement(name: str) -> None:
    """Item 9: after the measurement SGD moves the shared block and deepcopy works."""
    model, x, y = _make(name)
    fisher_trace(model, x, labels="exact")
    per_example_grad_norms(model, x, y)
    copy.deepcopy(model)
    block = model.blocks[0] if name == "module_list_twice" else model[0]
    before = block.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.equal(block.weight.detach(), before)


class Counter(nn.Module):
    """A module whose forward bumps a buffer: the measurement's forwards must not show."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x)


def test_buffers_changed_by_the_forward_are_restored() -> None:
    model = Counter().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    snap = snapshot(model)
    fisher_trace(model, x, labels="exact")
    per_example_grad_norms(model, x, torch.tensor([0, 1, 2, 0]))
    assert_unchanged(model, snap)
    assert int(model.calls) == 0


def test_a_diverged_model_gives_nan_norms_not_an_error() -> None:
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    norms = per_example_grad_norms(
        model, torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    )
    assert torch.isnan(norms).all()

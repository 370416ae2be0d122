"""Ghost-norm per-example gradient norms against a per-example loop, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim.curvature import (
    group_gradient_stats,
    layers,
    per_example_grad_norms,
    per_example_sq_norms,
    target_cotangents,
)
from fisher_optim.curvature import per_example as pe
from fisher_optim.likelihoods import Gaussian

from .conftest import small_cnn, tiny_mlp
from .curvature_utils import (
    assert_unchanged,
    example_grad,
    loop_exact_fisher,
    loop_likelihood_grads,
    loop_sq_norms,
    randomize_state,
    snapshot,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class Scale(nn.Module):
    """A layer without a ghost-norm rule: handled by the vmap fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.s.view(1, -1, *([1] * (x.dim() - 2)))


class Zoo1d(nn.Module):
    """Conv1d (groups, stride, reflect/'same' padding), GroupNorm, LayerNorm, sequence
    Linear, BatchNorm1d, a layer called twice, a frozen weight, a fallback layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="reflect", groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv1d(6, 4, 2, padding="same", bias=False)
        self.ln = nn.LayerNorm(4)
        self.seq = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.scale = Scale(5)
        self.twice = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(5 * 7, 3)

    def forward(self, x):
        h = torch.tanh(self.gn(self.c1(x)))  # [B, 6, 7]
        h = torch.tanh(self.ln(self.c2(h).transpose(1, 2)))  # [B, 7, 4]
        h = self.scale(self.bn(self.seq(h).transpose(1, 2)))  # [B, 5, 7]
        h = self.frozen(torch.tanh(self.twice(torch.tanh(self.twice(h.transpose(1, 2))))))
        return self.head(h.flatten(1))


class Zoo2d(nn.Module):
    """Conv2d with groups, stride, dilation, circular padding; even 'same' kernel;
    in-place ReLU right after a conv; tied weights (one Parameter, two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2, padding_mode="circular")
        self.c2 = nn.Conv2d(4, 6, 2, padding="same", groups=2)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.tied_a, self.tied_b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.tied_b.weight = self.tied_a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu_(self.c1(x))
        h = torch.tanh(self.c3(torch.tanh(self.c2(h)))).mean((2, 3))
        return self.head(torch.tanh(self.tied_b(torch.tanh(self.tied_a(h)))))


class Wide(nn.Module):
    """Convolutions with >= 16 input channels per group, where per-example gradients are
    formed by the backend's grouped-convolution kernel (1-d and 2-d, groups, dilation)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 6, 3, padding=2, stride=2, dilation=2, groups=2)
        self.c3 = nn.Conv1d(16, 4, 3, padding=1, stride=2, bias=False)
        self.head = nn.Linear(4 * 13, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.cat([torch.tanh(self.c2(h)).flatten(2), h[:, :10, :5, :5].flatten(2)], 1)
        return self.head(torch.tanh(self.c3(h[:, :16])).flatten(1))


class TinyLM(nn.Module):
    """Token ids [B, T] -> {"logits": [B, T, V]}: Embedding, causal Conv1d, LayerNorm."""

    def __init__(self, vocab: int = 4, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Conv1d(d, d, 2, padding=1)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.mix(self.emb(ids).transpose(1, 2))[..., : ids.shape[1]].transpose(1, 2)
        return {"logits": self.out(torch.tanh(self.ln(h)))}


def lm_logits(out):
    return out["logits"]


CASES = {
    "mlp": (lambda: tiny_mlp(), lambda n: torch.randn(n, 5).double(), 4, None),
    "cnn_bn": (lambda: small_cnn(), lambda n: torch.randn(n, 3, 8, 8).double(), 5, None),
    "zoo1d": (lambda: Zoo1d().double(), lambda n: torch.randn(n, 4, 12).double(), 3, None),
    "zoo2d": (lambda: Zoo2d().double(), lambda n: torch.randn(n, 2, 9, 9).double(), 3, None),
    "wide": (lambda: Wide().double(), lambda n: torch.randn(n, 2, 9, 9).double(), 3, None),
    "lm": (lambda: TinyLM().double(), lambda n: torch.randint(0, 4, (n, 5)), 4, lm_logits),
}


def make_case(name: str, n: int = 7):
    model_fn, x_fn, classes, output_fn = CASES[name]
    model = randomize_state(model_fn())
    x = x_fn(n)
    shape = (n, 5) if name == "lm" else (n,)
    return model, x, torch.randint(0, classes, shape), output_fn


@pytest.mark.parametrize("name", list(CASES))
def test_norms_match_loop_and_leave_model_untouched(name):
    model, x, y, output_fn = make_case(name)
    if name == "lm":
        y[0, :2] = -100  # ignored positions
    model.train()
    snap = snapshot(model)
    norms = per_example_grad_norms(model, x, y, output_fn=output_fn, chunk_size=3)
    assert_unchanged(model, snap)
    expected = loop_sq_norms(model, x, y, output_fn).sqrt()
    assert norms.dtype == torch.float64 and norms.shape == (len(x),)
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=1e-12)


SIGMA = 0.6


def likelihood_case(name: str, likelihood: str, n: int = 7):
    """A case of :data:`CASES` with targets for ``likelihood``: class indices, or one value
    per output (0/1 for Bernoulli, real for Gaussian) with some rows without a target."""
    model, x, y, output_fn = make_case(name, n)
    if likelihood == "categorical":
        if name == "lm":
            y[0, :2] = -100
        return model, x, y, output_fn
    with torch.no_grad():
        out = model.eval()(x)
    shape = (out if output_fn is None else output_fn(out)).shape
    g = torch.Generator().manual_seed(5)
    if likelihood == "bernoulli":
        y = torch.randint(0, 2, shape, generator=g).double()
    else:
        y = torch.randn(shape, generator=g, dtype=torch.float64)
    y[1] = float("nan")  # an example without any target
    if name == "lm":
        y[0, :2] = float("nan")  # positions without a target
    return model, x, y, output_fn


def _lik(likelihood: str):
    return Gaussian(sigma=SIGMA) if likelihood == "gaussian" else likelihood


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("name", ["cnn_bn", "zoo1d", "lm"])
def test_norms_with_each_likelihood_match_a_loop(name, likelihood):
    model, x, y, output_fn = likelihood_case(name, likelihood)
    model.train()
    snap = snapshot(model)
    norms = per_example_grad_norms(
        model, x, y, output_fn=output_fn, chunk_size=3, likelihood=_lik(likelihood)
    )
    assert_unchanged(model, snap)
    g = loop_likelihood_grads(model, x, y, likelihood, output_fn, SIGMA)
    torch.testing.assert_close(norms, g.norm(dim=1), rtol=1e-10, atol=1e-12)
    if likelihood != "categorical":
        assert float(norms[1]) == 0.0  # no target, no gradient


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_group_gradient_stats_with_each_likelihood(likelihood):
    model, x, y, _ = likelihood_case("cnn_bn", likelihood, n=9)
    groups = torch.tensor([0, 1, 0, 0, 1, 2, 2, 0, 1])
    stats = group_gradient_stats(model, x, y, groups, chunk_size=4, likelihood=_lik(likelihood))
    g = loop_likelihood_grads(model, x, y, likelihood, None, SIGMA)
    for k in (0, 1, 2):
        mean = g[groups == k].mean(0)
        assert stats["grad_norm"][k] == pytest.approx(float(mean.norm()), rel=1e-10)


def test_targets_that_do_not_fit_the_likelihood_raise():
    model, x, y, _ = make_case("mlp")
    with pytest.raises(ValueError, match="integer class indices"):
        per_example_grad_norms(model, x, y.double())
    with pytest.raises(ValueError, match="one per output"):
        per_example_grad_norms(model, x, y.double(), likelihood="gaussian")


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "wide", "lm"])
def test_supported_layers_need_no_vmap_fallback(name, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fallback used")

    monkeypatch.setattr(pe, "cotangent_grads", fail)
    model, x, y, output_fn = make_case(name)
    norms = per_example_grad_norms(model, x, y, output_fn=output_fn)
    torch.testing.assert_close(norms.square(), loop_sq_norms(model, x, y, output_fn))


@pytest.mark.parametrize("name", ["wide", "zoo2d"])
def test_small_memory_blocks(name, monkeypatch):
    monkeypatch.setattr(layers, "MAX_BLOCK_ELEMENTS", 1)  # one example per block
    model, x, y, _ = make_case(name)
    norms = per_example_grad_norms(model, x, y)
    torch.testing.assert_close(norms.square(), loop_sq_norms(model, x, y))


def test_grouped_conv_path_is_taken(monkeypatch):
    calls = []
    original = layers.ConvGeometry.grouped_grads
    monkeypatch.setattr(
        layers.ConvGeometry,
        "grouped_grads",
        lambda self, a, g: calls.append(a.shape) or original(self, a, g),
    )
    model, x, y, _ = make_case("wide")
    per_example_grad_norms(model, x, y)
    assert len(calls) == 2  # c2 and c3 (c1 has 2 input channels: unfold)


def test_vmap_fallback_for_unsupported_layers_is_used(monkeypatch):
    calls = []
    original = pe.cotangent_grads

    def spy(model, inputs, g3, params, *args):
        calls.append({id(p) for p in params})
        return original(model, inputs, g3, params, *args)

    monkeypatch.setattr(pe, "cotangent_grads", spy)
    model, x, y, _ = make_case("zoo1d")
    per_example_grad_norms(model, x, y)
    assert calls == [{id(model.scale.s), id(model.twice.weight), id(model.twice.bias)}]


@pytest.mark.parametrize(
    ("length", "k", "o"), [(1, 3, 4), (2, 30, 30), (50, 3, 2)], ids=["T1", "gram", "matmul"]
)
@pytest.mark.parametrize("block", [1 << 25, 1])
def test_matmul_sq_norms_branches(length, k, o, block, monkeypatch):
    monkeypatch.setattr(layers, "MAX_BLOCK_ELEMENTS", block)
    a = torch.randn(5, length, k, dtype=torch.float64)
    g = torch.randn(5, length, o, dtype=torch.float64)
    expected = torch.einsum("blo,blk->bok", g, a).square().sum((1, 2))
    torch.testing.assert_close(layers.matmul_sq_norms(a, g), expected)


def test_mapping_inputs():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_mlp()

        def forward(self, pixels, shift):
            return self.net(pixels + shift)

    model = Keyword()
    x = {"pixels": torch.randn(6, 5, dtype=torch.float64), "shift": torch.randn(6, 5).double()}
    y = torch.randint(0, 4, (6,))
    norms = per_example_grad_norms(model, x, y, chunk_size=4)
    torch.testing.assert_close(norms.square(), loop_sq_norms(model, x, y))


def test_engine_sums_several_cotangents():
    model, x, y, _ = make_case("cnn_bn")
    model.eval()
    y2 = (y + 1) % 5

    def both(logits):
        return [*target_cotangents(y)(logits), *target_cotangents(y2)(logits)]

    sq = per_example_sq_norms(model, x, both)
    torch.testing.assert_close(sq, loop_sq_norms(model, x, y) + loop_sq_norms(model, x, y2))


def test_frozen_model_gives_zeros():
    model = tiny_mlp().requires_grad_(False)
    norms = per_example_grad_norms(model, torch.randn(3, 5).double(), torch.tensor([0, 1, 2]))
    assert torch.equal(norms, torch.zeros(3, dtype=torch.float64))


def test_errors():
    model, x, y, _ = make_case("cnn_bn")
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        per_example_sq_norms(model, x, target_cotangents(y))
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_grad_norms(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        per_example_grad_norms(model, x, y[:-1])
    with pytest.raises(ValueError, match="integer"):
        per_example_grad_norms(model, x, y.double())
    no_stats = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="batch statistics"):
        per_example_grad_norms(no_stats, torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        group_gradient_stats(model, x, y, torch.ones(len(x)))


def brute_group_means(model, x, y, groups):
    means = {}
    model = model.eval()
    for k in groups.unique().tolist():
        idx = (groups == k).nonzero().flatten()
        grads = [
            example_grad(model, F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])) for i in idx
        ]
        means[k] = torch.stack(grads).mean(0)
    return means


@pytest.mark.parametrize("kind", ["bool", "ids"])
def test_group_gradient_stats(kind):
    model, x, y, _ = make_case("cnn_bn", n=9)
    groups = torch.tensor([0, 1, 0, 0, 1, 2, 2, 0, 1])
    groups = groups > 0 if kind == "bool" else groups
    model.train()
    snap = snapshot(model)
    stats = group_gradient_stats(model, x, y, groups, chunk_size=4)
    assert_unchanged(model, snap)
    means = brute_group_means(copy.deepcopy(model), x, y, groups)
    ids = list(means)
    assert stats["group_ids"] == ids
    assert stats["count"] == {k: int((groups == k).sum()) for k in ids}
    for k in ids:
        assert stats["grad_norm"][k] == pytest.approx(float(means[k].norm()), rel=1e-10)
    for a, ka in enumerate(ids):
        for b, kb in enumerate(ids):
            cos = float(F.cosine_similarity(means[ka], means[kb], dim=0))
            assert float(stats["cosine_matrix"][a, b]) == pytest.approx(cos, rel=1e-9)
    assert ("cosine" in stats) == (len(ids) == 2)
    if len(ids) == 2:
        assert stats["cosine"] == pytest.approx(float(stats["cosine_matrix"][0, 1]))


def test_a_layer_fed_by_a_batch_sized_constant_is_not_mistaken_for_a_batch_layer():
    """Position ids ``arange(T)`` with ``T == B`` have the batch's shape but no examples."""
    import torch.nn.functional as F
    from torch import nn

    class TinyLM(nn.Module):
        def __init__(self, length: int) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(11, 8), nn.Embedding(length, 8)
            self.mix, self.head = nn.Linear(8, 8), nn.Linear(8, 11)
            self.table = nn.Parameter(torch.randn(length, 8))

        def forward(self, t):
            positions = self.pos(torch.arange(t.shape[1])) + self.mix(self.table)
            return self.head(torch.tanh(self.tok(t) + positions))

    torch.manual_seed(0)
    n = 8
    model = TinyLM(n).double()
    tokens, targets = torch.randint(11, (n, n)), torch.randint(11, (n, n))
    fast = per_example_grad_norms(model, tokens, targets)
    loop = []
    for i in range(n):
        loss = F.cross_entropy(model(tokens[i : i + 1]).reshape(-1, 11), targets[i])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        loop.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    torch.testing.assert_close(fast, torch.stack(loop), rtol=1e-10, atol=1e-12)


def test_one_output_model_with_targets_raises_instead_of_zero_norms():
    """Cross-entropy over one output is identically 0: every per-example gradient of it would
    be 0, silently. The norms with targets, the group statistics and FisherNoiseSGD's
    empirical Fisher refuse it."""
    from fisher_optim import FisherNoiseSGD
    from fisher_optim.curvature import group_gradient_stats, per_example_grad_norms

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="one output"):
        per_example_grad_norms(model, x, targets=y)
    with pytest.raises(ValueError, match="one output"):
        group_gradient_stats(model, x, y, torch.tensor([True, False] * 3))
    opt = FisherNoiseSGD(model, small_batch_size=2, fisher="empirical", lr=0.1)
    opt.zero_grad()
    model(x).sum().backward()
    opt.set_targets(y)
    with pytest.raises(ValueError, match="one output"):
        opt.step()


class _Tabled(nn.Module):
    """``x [B, T, D]`` scaled by a table ``[T, 1]`` shared by all examples: a weight, a
    buffer, or (``where="input"``) an input of the call."""

    def __init__(self, length: int, where: str) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        table = torch.linspace(0.5, 2.0, length).reshape(length, 1)
        if where == "weight":
            self.table = nn.Parameter(table)
        elif where == "buffer":
            self.register_buffer("table", table)
        else:
            self.table = None

    def forward(self, x, table=None):
        table = self.table if table is None else table
        return self.head(torch.tanh(self.lin(x * table)).mean(1))


def _brute_example_grads(model, x, y, **kw):
    """Float64 per-example gradients ``[B, d]``, each from the whole batch's forward."""
    out = model(x, **kw)
    return torch.stack(
        [
            example_grad_kept(model, F.cross_entropy(out[i : i + 1], y[i : i + 1]))
            for i in range(len(y))
        ]
    )


def example_grad_kept(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("where", ["weight", "buffer"])
def test_a_batch_sized_table_in_the_model_is_exact(where):
    """A ``[T, 1]`` table with ``T == B`` held by the model is never cut per example."""
    from fisher_optim.curvature import fisher_trace, gradient_covariance_trace

    torch.manual_seed(0)
    n = 6
    model = _Tabled(n, where).double()
    x, y = torch.randn(n, n, 4, dtype=torch.float64), torch.randint(3, (n,))
    g = _brute_example_grads(model, x, y)
    torch.testing.assert_close(per_example_grad_norms(model, x, y), g.norm(dim=1))
    centred = g - g.mean(0)
    assert gradient_covariance_trace(model, (x, y)) == pytest.approx(
        float(centred.square().sum(1).mean()), rel=1e-10
    )
    assert fisher_trace(model, x, labels="exact") == pytest.approx(
        loop_exact_fisher(model, x), rel=1e-10
    )


def test_a_batch_sized_shared_input_raises_unless_passed_through_the_model():
    """A ``[T, 1]`` table with ``T == B`` passed in the batch cannot be told from one that
    holds examples: it must be passed through the model (a wrapper holding it), or the
    measurements raise (on main they cut it per example and were 2-50% off)."""
    from fisher_optim import Batch
    from fisher_optim.curvature import fisher_trace, gradient_covariance_trace

    torch.manual_seed(0)
    n = 6
    model = _Tabled(n, "input").double()
    table = torch.linspace(0.5, 2.0, n, dtype=torch.float64).reshape(n, 1)
    x, y = torch.randn(n, n, 4, dtype=torch.float64), torch.randint(3, (n,))
    batch = Batch((x,), {"table": table})
    for measure in (
        lambda: per_example_grad_norms(model, batch, y),
        lambda: fisher_trace(model, batch),
        lambda: gradient_covariance_trace(model, (batch, y)),
        lambda: group_gradient_stats(model, batch, y, torch.arange(n) % 2),
    ):
        with pytest.raises(ValueError, match="first example alone"):
            measure()

    class Marked(nn.Module):  # the table passed through the model
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.register_buffer("table", table)

        def forward(self, x):
            return self.inner(x, self.table)

    marked = Marked()
    g = _brute_example_grads(model, x, y, table=table)
    torch.testing.assert_close(per_example_grad_norms(marked, x, y), g.norm(dim=1))
    centred = g - g.mean(0)
    assert gradient_covariance_trace(marked, (x, y)) == pytest.approx(
        float(centred.square().sum(1).mean()), rel=1e-10
    )


class _Mixing(nn.Module):
    """Examples that interact in one direction only, so the first example alone is
    unchanged: a running mean over the batch, or attention across the batch dimension with
    a causal mask (the batch-first / sequence-first mix-up). ``reverse`` mixes the other
    way (then the last example is the untouched one)."""

    def __init__(self, how: str, reverse: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.how, self.reverse = nn.Linear(4, 8), nn.Linear(8, 3), how, reverse

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reverse:
            h = h.flip(0)
        if self.how == "running_mean":
            h = h.cumsum(0) / torch.arange(1, h.shape[0] + 1, dtype=h.dtype)[:, None]
        else:  # causal attention over the batch: example i sees examples 0..i
            h = F.scaled_dot_product_attention(h[None], h[None], h[None], is_causal=True)[0]
        if self.reverse:
            h = h.flip(0)
        return self.b(h)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("how", ["running_mean", "causal_attention"])
def test_examples_that_mix_raise_in_every_per_example_path(how, reverse):
    from fisher_optim import FisherNoiseSGD
    from fisher_optim.curvature import fisher_trace, gradient_covariance_trace

    torch.manual_seed(0)
    model = _Mixing(how, reverse).double()
    n = 6
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(3, (n,))
    which = "last example" if not reverse else "first example"
    for measure in (
        lambda: per_example_grad_norms(model, x, y),
        lambda: fisher_trace(model, x),
        lambda: gradient_covariance_trace(model, (x, y)),
        lambda: group_gradient_stats(model, x, y, torch.arange(n) % 2),
    ):
        with pytest.raises(ValueError, match=f"{which}.*alone.*running mean or attention"):
            measure()
    opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=f"{which}.*alone"):
        opt.step()

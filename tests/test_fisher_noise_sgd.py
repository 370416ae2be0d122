"""FisherNoiseSGD: the injected noise has the Fisher-shaped covariance of Wen et al. (2020).

A tiny float64 MLP (38 parameters) and a fixed batch of 8, so that the per-example gradients,
the empirical Fisher ``(1/M) Σ g_i g_i^T`` and the true Fisher ``(1/M) Σ_i Σ_c p_ic g_ic g_ic^T``
are formed by brute force; the noise is drawn many times and its moments compared with
``scale² · (diag F | F | Tr F / d)``, ``scale² = (M_L − M_S)/(M_L M_S)``, within statistical
error.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim.fisher_noise_sgd import FisherNoiseSGD
from fisher_optim.ghost_batchnorm import GhostBatchNorm

D = torch.float64
N, M_S, LR = 8, 2, 0.1
SCALE2 = (N - M_S) / (N * M_S)
DRAWS = 20_000


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=g, dtype=D), torch.randint(3, (N,), generator=g)


def _setup(covariance: str, fisher: str, **kw: object) -> tuple[nn.Module, FisherNoiseSGD]:
    model = _mlp()
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance=covariance, fisher=fisher, seed=3, **kw
    )
    x, y = _batch()
    model(x)  # the batch is captured
    opt.set_targets(y)
    return model, opt


def _flat(tensors: list[Tensor | None], draws: int) -> Tensor:
    return torch.cat([t.reshape(draws, -1) for t in tensors if t is not None], dim=1)


def _per_example_grads(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """``[N, d]``: ∇_θ CE(f(x_i), labels_i), one backward per example."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, labels):
        loss = F.cross_entropy(model(xi[None]), yi[None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _fisher(model: nn.Module, kind: str) -> Tensor:
    """The batch's empirical (true targets) or true (Σ_c p_c g_c g_c^T) Fisher, ``[d, d]``."""
    x, y = _batch()
    if kind == "empirical":
        g = _per_example_grads(model, x, y)
        return g.T @ g / N
    probs = torch.softmax(model(x), -1).detach()
    fisher = 0
    for c in range(probs.shape[1]):
        g = _per_example_grads(model, x, torch.full((N,), c))
        fisher = fisher + (g * probs[:, c : c + 1]).T @ g / N
    return fisher


def _check_moments(draws: Tensor, cov: Tensor, rel_frobenius: float | None = None) -> None:
    """Zero mean, and the sample covariance of ``draws`` ``[K, d]`` against ``cov``."""
    k = draws.shape[0]
    std = cov.diagonal().sqrt()
    assert (draws.mean(0).abs() <= 5 * std / math.sqrt(k) + 1e-15).all()
    var = draws.pow(2).mean(0)
    assert ((var - cov.diagonal()).abs() <= 5 * math.sqrt(2 / k) * cov.diagonal() + 1e-15).all()
    if rel_frobenius is not None:
        sample = draws.T @ draws / k
        assert float((sample - cov).norm() / cov.norm()) < rel_frobenius


# ----------------------------------------------------------------- covariance of the noise
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_full_covariance_is_scaled_fisher(fisher: str) -> None:
    _model, opt = _setup("full", fisher)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * _fisher(_mlp(), fisher), rel_frobenius=0.05)


def test_diagonal_empirical_variance_is_scaled_diag_fisher() -> None:
    _model, opt = _setup("diagonal", "empirical")
    opt._refresh(opt.current_batch())
    exact = _fisher(_mlp(), "empirical")
    estimate = torch.cat([c.reshape(-1) for c in opt._cache])
    torch.testing.assert_close(estimate, exact.diagonal(), rtol=1e-10, atol=1e-14)
    assert opt.fisher_trace == pytest.approx(float(exact.trace()), rel=1e-10)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * torch.diag(exact.diagonal()), rel_frobenius=0.05)


def test_diagonal_true_fisher_estimate_is_unbiased() -> None:
    """Each refresh samples labels from the model: the mean estimate is diag of Σ_c p_c g_c²."""
    _model, opt = _setup("diagonal", "true")
    refreshes = 300
    estimates = []
    for _ in range(refreshes):
        opt._refresh(opt.current_batch())
        estimates.append(torch.cat([c.reshape(-1) for c in opt._cache]))
    est = torch.stack(estimates)
    exact = _fisher(_mlp(), "true").diagonal()
    err = (est.mean(0) - exact).abs()
    assert (err <= 5 * est.std(0) / math.sqrt(refreshes) + 1e-12).all()
    assert opt.refreshes == refreshes


def test_trace_noise_is_isotropic() -> None:
    _model, opt = _setup("trace", "empirical")
    opt._refresh(opt.current_batch())
    exact = _fisher(_mlp(), "empirical")
    d = exact.shape[0]
    assert opt.fisher_trace == pytest.approx(float(exact.trace()), rel=1e-10)
    noise = _flat(opt._sample_noise(opt.current_batch(), draws=DRAWS), DRAWS)
    _check_moments(noise, SCALE2 * float(exact.trace()) / d * torch.eye(d, dtype=D), 0.05)


# ----------------------------------------------------------------- through real steps
def _step_noise(model: nn.Module, opt: FisherNoiseSGD, theta0: list[Tensor]) -> Tensor:
    """One real step from θ0 on the fixed batch; returns n = (θ0 − θ)/lr − ∇L."""
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta0):
            p.copy_(t)
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.set_targets(y)
    opt.step()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return (torch.cat([t.reshape(-1) for t in theta0]) - theta) / LR - grad


@pytest.mark.parametrize("covariance", ["full", "diagonal", "trace"])
def test_real_steps_add_the_sampled_noise(covariance: str) -> None:
    """The step changes θ by −lr (∇L + n), n as ``_sample_noise`` draws it; and over 400 steps
    n has zero mean and the expected variance (coarse: fewer draws)."""
    model, opt = _setup(covariance, "true", every=1 if covariance == "full" else 10**6)
    theta0 = [p.detach().clone() for p in model.parameters()]
    first = _step_noise(model, opt, theta0)
    # the same draw, replayed from a copy of the optimizer's random state
    _replay_model, replay = _setup(covariance, "true", every=1 if covariance == "full" else 10**6)
    if covariance != "full":
        replay._refresh(replay.current_batch())
    expected = _flat(replay._sample_noise(replay.current_batch()), 1)[0]
    torch.testing.assert_close(first, expected, rtol=1e-8, atol=1e-10)
    assert opt.noise_norm == pytest.approx(float(expected.norm()), rel=1e-10)

    draws = torch.stack([first] + [_step_noise(model, opt, theta0) for _ in range(399)])
    exact = _fisher(_mlp(), "true")
    if covariance == "diagonal":
        # one estimate (every=10**6), so the variance is that estimate's, not the exact one
        cov = torch.diag(torch.cat([c.reshape(-1) for c in opt._cache])) * SCALE2
    elif covariance == "trace":
        cov = torch.eye(exact.shape[0], dtype=D) * opt.fisher_trace / exact.shape[0] * SCALE2
    else:
        cov = SCALE2 * exact
    _check_moments(draws, cov)
    assert opt.step_count == 400


# ----------------------------------------------------------------- sequences
def test_sequence_model_examples_are_sequences() -> None:
    """Logits [B, T, V]: M_L = B, ℓ_i the mean CE over the T positions of sequence i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 4)).to(D)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=2, fisher="empirical", seed=0)
    tokens, targets = torch.randint(6, (5, 4)), torch.randint(4, (5, 4))
    model(tokens)
    opt.set_targets(targets)
    opt._refresh(opt.current_batch())
    assert opt._scales(opt.current_batch()) == [math.sqrt(3 / 10)]
    params = list(model.parameters())
    sq = 0
    for t, y in zip(tokens, targets):
        grads = torch.autograd.grad(F.cross_entropy(model(t), y), params)
        sq = sq + torch.cat([g.reshape(-1) ** 2 for g in grads])
    torch.testing.assert_close(torch.cat([c.reshape(-1) for c in opt._cache]), sq / 5)


# ----------------------------------------------------------------- errors
def test_validation_errors() -> None:
    model = _mlp()
    for kw in (
        {"small_batch_size": 0},
        {"small_batch_size": 2.5},
        {"small_batch_size": 2, "covariance": "block"},
        {"small_batch_size": 2, "fisher": "x"},
        {"small_batch_size": 2, "every": 0},
        {"small_batch_size": 2, "estimate_batch_size": 0},
        {"small_batch_size": 2, "covariance": "full", "every": 2},
    ):
        with pytest.raises(ValueError):
            FisherNoiseSGD(model, lr=LR, **kw)


@pytest.mark.parametrize("small", [N, N + 1])
def test_small_batch_not_smaller_than_large_batch_raises(small: int) -> None:
    model = _mlp()
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=small)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="must be smaller than the training batch M_L=8"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_empirical_needs_targets() -> None:
    model = _mlp()
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, fisher="empirical")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="set_targets"):
        opt.step()


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_non_finite_estimate_is_skipped(covariance: str, fisher: str) -> None:
    model, opt = _setup(covariance, fisher, output_fn=lambda out: out * float("nan"))
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.set_targets(y)
    expected = [p.detach() - LR * p.grad for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_refreshes == 1 and opt.refreshes == 1
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-15)  # no noise added


# ----------------------------------------------------------------- plumbing
def _train(model: nn.Module, opt: FisherNoiseSGD, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(N, 3, generator=g, dtype=D), torch.randint(3, (N,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.set_targets(y)
        opt.step()


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_seed_reproducibility(covariance: str) -> None:
    runs = []
    for seed in (5, 5, 6):
        model = _mlp()
        _train(
            model,
            FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, covariance=covariance, seed=seed),
            range(3),
        )
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("covariance", ["diagonal", "trace", "full"])
def test_state_dict_round_trip_gives_identical_next_steps(covariance: str) -> None:
    every = 1 if covariance == "full" else 3
    model = _mlp()
    kw = {
        "lr": LR,
        "momentum": 0.9,
        "small_batch_size": M_S,
        "covariance": covariance,
        "every": every,
    }
    opt = FisherNoiseSGD(model, seed=7, **kw)
    _train(model, opt, range(2))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, range(2, 5))  # steps 2, 3 (refresh), 4 reuse and refresh the cache

    restored = _mlp()
    restored.load_state_dict(saved_model)
    opt2 = FisherNoiseSGD(restored, seed=99, **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.seed == 7 and opt2.step_count == 2
    _train(restored, opt2, range(2, 5))
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    assert (opt2.refreshes, opt2.fisher_trace, opt2.noise_norm) == (
        opt.refreshes,
        opt.fisher_trace,
        opt.noise_norm,
    )


def test_lr_scheduler_and_param_groups_reach_the_base() -> None:
    model = _mlp()
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, range(1))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["small_batch_size"] == M_S


def test_wraps_an_optimizer_instance() -> None:
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    opt = FisherNoiseSGD(model, base, small_batch_size=M_S, covariance="trace", seed=0)
    assert base.param_groups[0]["small_batch_size"] == M_S
    _train(model, opt, range(2))
    assert opt.refreshes == 2 and opt.noise_norm > 0
    with pytest.raises(TypeError):
        FisherNoiseSGD(model, base, small_batch_size=M_S, lr=0.5)


def test_per_group_small_batch_size() -> None:
    model = _mlp()
    opt = FisherNoiseSGD(
        model,
        small_batch_size=M_S,
        lr=LR,
        covariance="full",
        fisher="empirical",
        seed=0,
        params=[
            {"params": model[0].parameters(), "small_batch_size": 4},
            {"params": model[2].parameters()},
        ],
    )
    x, y = _batch()
    model(x)
    opt.set_targets(y)
    assert opt._scales(opt.current_batch()) == [math.sqrt(4 / 32), math.sqrt(SCALE2)]


@pytest.mark.parametrize("covariance", ["diagonal", "trace", "full"])
@pytest.mark.parametrize("ghost", [False, True])
def test_batchnorm_running_stats_and_global_rng_untouched(covariance: str, ghost: bool) -> None:
    torch.manual_seed(0)
    norm = GhostBatchNorm(4, 4) if ghost else nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 3))
    model = model.to(D)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, covariance=covariance, seed=0)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(m.training for m in model.modules())
    assert opt.noise_norm > 0 and opt.fisher_trace > 0


def test_estimate_batch_size_uses_first_examples() -> None:
    _model, opt = _setup("diagonal", "empirical", estimate_batch_size=3)
    opt._refresh(opt.current_batch())
    x, y = _batch()
    g = _per_example_grads(_mlp(), x[:3], y[:3])
    torch.testing.assert_close(torch.cat([c.reshape(-1) for c in opt._cache]), g.pow(2).mean(0))
    assert opt._scales(opt.current_batch()) == [math.sqrt(SCALE2)]  # M_L is still the batch


# ----------------------------------------------------------------- ignore_index (-100)
def _masked_per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``[N, d]``: ∇_θ of the mean CE over example i's rows with a target (0 if none)."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        logits = model(xi[None]).reshape(-1, 3)
        keep = yi.reshape(-1) != -100
        if not bool(keep.any()):
            rows.append(torch.zeros(sum(p.numel() for p in params), dtype=D))
            continue
        loss = F.cross_entropy(logits[keep], yi.reshape(-1)[keep], reduction="sum") / keep.sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _ignore_setup(covariance: str) -> tuple[nn.Module, FisherNoiseSGD, Tensor]:
    """A sequence model ([N, T, 3] logits) whose targets hold -100: at some positions, and at
    every position of example 2. Returns the brute-force empirical Fisher ``(1/N) G^T G``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, 4, 2, generator=g, dtype=D), torch.randint(3, (N, 4), generator=g)
    y[0, 1], y[1, 0], y[1, 3], y[2] = -100, -100, -100, -100
    grads = _masked_per_example_grads(copy.deepcopy(model), x, y)
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance=covariance, fisher="empirical", seed=3
    )
    model(x)
    opt.set_targets(y)
    return model, opt, grads.T @ grads / N


@pytest.mark.parametrize("covariance", ["diagonal", "trace", "full"])
def test_ignore_index_targets_are_excluded_by_every_covariance(covariance: str) -> None:
    """Item 10 of issue 14: ``"full"`` crashed on -100 (``one_hot``); every mode now uses the
    same g_i (rows with -100 excluded, an example without targets contributing 0)."""
    _model, opt, fisher = _ignore_setup(covariance)
    batch = opt.current_batch()
    if covariance == "full":
        noise = _flat(opt._sample_noise(batch, draws=DRAWS), DRAWS)
        _check_moments(noise, SCALE2 * fisher, rel_frobenius=0.05)
        return
    opt._refresh(batch)
    assert opt.fisher_trace == pytest.approx(float(fisher.trace()), rel=1e-10)
    if covariance == "diagonal":
        estimate = torch.cat([c.reshape(-1) for c in opt._cache])
        torch.testing.assert_close(estimate, fisher.diagonal(), rtol=1e-10, atol=1e-14)


def test_ignore_index_real_steps_run_in_every_mode() -> None:
    for covariance in ("diagonal", "trace", "full"):
        model, opt, _ = _ignore_setup(covariance)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert opt.noise_norm is not None and math.isfinite(opt.noise_norm)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ----------------------------------------------------------------- shared modules
@pytest.mark.parametrize("layout", ["sequential", "module_list"])
@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_module_registered_twice_is_left_intact(layout: str, covariance: str) -> None:
    """Item 9 of issue 14: the vmap pass left functorch wrappers in place of a shared block's
    Parameters (SGD stopped moving it, deepcopy failed, step 2 raised)."""

    class Stack(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([block] * 2)
            self.head = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            for b in self.blocks:
                x = torch.tanh(b(x))
            return self.head(x)

    torch.manual_seed(0)
    block = nn.Linear(3, 3)
    model = (
        nn.Sequential(block, nn.Tanh(), block, nn.Tanh(), nn.Linear(3, 3))
        if layout == "sequential"
        else Stack(block)
    ).to(D)
    params = list(model.parameters())
    x, y = _batch()
    fisher_diag = (_per_example_grads(copy.deepcopy(model), x, y) ** 2).mean(0)
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance=covariance, fisher="empirical", seed=0
    )
    w0 = block.weight.detach().clone()
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.set_targets(y)
        if step == 0 and covariance == "diagonal":
            opt._refresh(opt.current_batch())
            estimate = torch.cat([c.reshape(-1) for c in opt._cache])
            torch.testing.assert_close(estimate, fisher_diag, rtol=1e-10, atol=1e-14)
        opt.step()
    now = list(model.parameters())
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params))
    assert all(type(p) is nn.Parameter for p in now)
    assert not torch.equal(block.weight.detach(), w0)
    copy.deepcopy(model)


def test_model_that_vmap_cannot_run_takes_one_example_at_a_time() -> None:
    """Data-dependent control flow (as in Hugging Face mask code) fails inside vmap; the
    estimate then loops over the examples, and is still exact."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            if bool(torch.isnan(x).any()):  # data-dependent, as HF's "is the mask all ones"
                x = torch.nan_to_num(x)
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Branchy().to(D)
    x, y = _batch()
    grads = _per_example_grads(copy.deepcopy(model), x, y)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, fisher="empirical", seed=0)
    model(x)
    opt.set_targets(y)
    opt._refresh(opt.current_batch())
    estimate = torch.cat([c.reshape(-1) for c in opt._cache])
    torch.testing.assert_close(estimate, (grads**2).mean(0), rtol=1e-10, atol=1e-14)


def test_shared_input_with_the_batch_size_as_first_dimension_is_an_error() -> None:
    """A ``[M, M]`` matrix shared by all examples looks like a per-example input; cutting it
    per example would silently change the model: refused with a clear error."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor, mix: Tensor) -> Tensor:
            return self.lin(x) + mix.sum(0)[:3]  # mix is [M, M] and shared

    torch.manual_seed(0)
    model = Mixed().to(D)
    x, y = _batch()
    mix = torch.randn(N, N, dtype=D)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, fisher="empirical", seed=0)
    model(x, mix)
    opt.set_targets(y)
    with pytest.raises(ValueError, match="first example alone"):
        opt._refresh(opt.current_batch())


def test_estimate_leaves_buffers_changed_by_the_forward_as_they_were() -> None:
    """A module that counts its calls in a buffer: only the training forwards count."""

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return self.lin(x)

    model = Counter().to(D)
    opt = FisherNoiseSGD(model, lr=LR, small_batch_size=M_S, fisher="true", seed=0)
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert int(model.calls) == 2 and opt.refreshes == 2


class _Mixed(nn.Module):
    """``lin(x) + mix.sum(0)[:3]`` with ``mix [M, M]`` shared by all examples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor, mix: Tensor) -> Tensor:
        return self.lin(x) + mix.sum(0)[:3]


def test_shared_input_cut_by_estimate_batch_size_is_an_error() -> None:
    """The same with ``estimate_batch_size``: the cut is checked against the training batch."""

    torch.manual_seed(0)
    model = _Mixed().to(D)
    x, y = _batch()
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, fisher="empirical", seed=0, estimate_batch_size=4
    )
    model(x, torch.randn(N, N, dtype=D))
    opt.set_targets(y)
    with pytest.raises(ValueError, match="first example alone"):
        opt._refresh(opt.current_batch())


def test_shared_input_cut_by_estimate_batch_size_is_an_error_with_the_full_covariance() -> None:
    """``covariance="full"`` runs the batch whole, but ``estimate_batch_size`` cuts it: a
    ``[M, M]`` matrix shared by all examples was cut to ``[4, M]`` silently (issue 27)."""

    torch.manual_seed(0)
    model = _Mixed().to(D)
    x, y = _batch()
    opt = FisherNoiseSGD(
        model, lr=LR, small_batch_size=M_S, covariance="full", seed=0, estimate_batch_size=4
    )
    opt.zero_grad()
    F.cross_entropy(model(x, torch.randn(N, N, dtype=D)), y).backward()
    with pytest.raises(ValueError, match="first example alone.*functools.partial"):
        opt.step()

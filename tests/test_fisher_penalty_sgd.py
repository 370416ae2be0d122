"""FisherPenaltySGD: drop-in behaviour, caching, state, BatchNorm, NaN handling, errors."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisher_optim.fisher_penalty_sgd as fps
from fisher_optim import FiniteDifferenceWarning, FisherPenaltySGD, penalty_gradient
from fisher_optim.differentiation import PenaltyGradient

from .conftest import small_cnn, tiny_mlp


def batches(n, dtype=torch.float64, shape=(5,), classes=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, *shape, generator=g, dtype=dtype),
            torch.randint(classes, (size,), generator=g),
        )
        for _ in range(n)
    ]


def train(model, opt, data, targets_to_opt=False):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if targets_to_opt:
            opt.set_targets(y)
        opt.step()


BASES = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.Adamax, {"lr": 1e-2}),
    (torch.optim.NAdam, {"lr": 1e-2}),
    (torch.optim.RAdam, {"lr": 1e-2}),
    (torch.optim.RMSprop, {"lr": 1e-3}),  # has its own "alpha" (smoothing constant)
    (torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "momentum": 0.5}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
    (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.ASGD, {"lr": 1e-2}),  # has its own "alpha" (decay power)
    (torch.optim.Rprop, {"lr": 1e-2}),
]
if hasattr(torch.optim, "Adafactor"):
    BASES.append((torch.optim.Adafactor, {"lr": 1e-2}))


@pytest.mark.parametrize(("base", "kwargs"), BASES)
def test_alpha_zero_is_the_base_optimizer_bitwise(base, kwargs):
    data = batches(6, torch.float32, shape=(3, 8, 8), classes=5)
    model = small_cnn(torch.float32)
    reference = copy.deepcopy(model)
    if "alpha" in kwargs:  # the base's own "alpha": build the base, then wrap the instance
        opt = FisherPenaltySGD(model, base(model.parameters(), **kwargs), alpha=0.0, every=1)
    else:
        opt = FisherPenaltySGD(model, base, alpha=0.0, every=1, **kwargs)
    train(model, opt, data)
    train(reference, base(reference.parameters(), **kwargs), data)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_penalty_is_computed_every_k_steps_and_the_cache_added_in_between(monkeypatch):
    calls = []
    real = fps.compute_penalty_gradient
    monkeypatch.setattr(
        fps, "compute_penalty_gradient", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.05, alpha=0.5, every=3)
    added = []

    def record(optimizer, args, kwargs):  # base step pre-hook: p.grad now includes alpha*cache
        added.append([p.grad.clone() for p in model.parameters()])

    opt.base_optimizer.register_step_pre_hook(record)
    plain = []
    for x, y in batches(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    assert len(calls) == 3 == opt.refreshes  # ceil(7 / 3)
    diffs = [[a - b for a, b in zip(w, wo)] for w, wo in zip(added, plain)]
    for step, d in enumerate(diffs):
        source = diffs[step - step % 3]
        for a, b in zip(d, source):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    assert not torch.allclose(diffs[0][0], diffs[3][0])


def test_added_term_is_alpha_times_penalty_gradient_of_the_batch():
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = FisherPenaltySGD(model, lr=0.0, alpha=0.3, every=1, seed=123, penalty_batch_size=10)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    reference = penalty_gradient(model, x[:10], generator=torch.Generator().manual_seed(123))
    opt.step()
    for p, g0, r in zip(model.parameters(), plain, reference):
        torch.testing.assert_close(p.grad, g0 + 0.3 * r, rtol=1e-12, atol=1e-14)
    assert opt.penalty_value > 0


def test_wraps_instance_and_class_and_lr_scheduler_reaches_base():
    model = tiny_mlp()
    base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = FisherPenaltySGD(model, base, alpha=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, batches(2))
    sched.step()
    assert base.param_groups[0]["lr"] == 0.5
    opt2 = FisherPenaltySGD(model, torch.optim.Adam, alpha=0.1, lr=3e-4, betas=(0.8, 0.9))
    assert isinstance(opt2.base_optimizer, torch.optim.Adam)
    assert (
        opt2.param_groups[0]["betas"] == (0.8, 0.9)
        and opt2.param_groups[0]["penalty_weight"] == 0.1
    )


def test_param_groups_and_frozen_parameters():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    groups = [
        {"params": [model[0].weight], "penalty_weight": 0.0},
        {"params": list(model[2].parameters()), "lr": 0.01},
    ]
    opt = FisherPenaltySGD(model, alpha=0.2, lr=0.1, params=groups)
    train(model, opt, batches(2))
    assert [g["penalty_weight"] for g in opt.param_groups] == [0.0, 0.2]
    assert model[0].bias.grad is None


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_state_dict_round_trip_continues_identically(mode):
    data = batches(8, torch.float32, shape=(3, 8, 8), classes=5)
    model = small_cnn(torch.float32)
    kwargs = {"lr": 0.05, "momentum": 0.9, "alpha": 0.5, "every": 3, "mode": mode}
    opt = FisherPenaltySGD(model, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    for i, (x, y) in enumerate(data):
        if i == 4:  # mid-cycle: the cache from step 3 is in use
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
        train(model, opt, [(x, y)])
        sched.step()
    model2 = small_cnn(torch.float32)
    opt2 = FisherPenaltySGD(model2, **kwargs)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for x, y in data[4:]:
        train(model2, opt2, [(x, y)])
        sched2.step()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert (opt2.refreshes, opt2.step_count) == (opt.refreshes, opt.step_count)


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_penalty_passes_leave_batchnorm_buffers(mode):
    model = small_cnn(torch.float32)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=1.0, every=1, mode=mode)
    x, y = batches(1, torch.float32, shape=(3, 8, 8), classes=5)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    opt.step()
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert opt._batch is None


def test_non_finite_penalty_is_dropped_counted_and_warned(monkeypatch):
    model = tiny_mlp()
    reference = copy.deepcopy(model)

    def nan_gradient(objective, *args, **kwargs):
        grads = [torch.full_like(p, float("nan")) for p in objective.params]
        return PenaltyGradient(grads, torch.tensor(float("nan")))

    monkeypatch.setattr(fps, "compute_penalty_gradient", nan_gradient)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=1.0, every=1)
    data = batches(2)
    with pytest.warns(RuntimeWarning, match="not finite"):
        train(model, opt, data)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), data)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    assert (opt.refreshes, opt.skipped_refreshes, opt.penalty_value) == (2, 2, None)


def test_closure_is_supported():
    data = batches(3)
    model = tiny_mlp()
    twin = copy.deepcopy(model)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, every=1, seed=1)
    opt_twin = FisherPenaltySGD(twin, lr=0.1, alpha=0.5, every=1, seed=1)
    for x, y in data:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        assert opt.step(closure).ndim == 0
    train(twin, opt_twin, data)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_gradient_penalties_take_targets_from_set_targets():
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, penalty="gradient", every=1)
    train(model, opt, batches(2), targets_to_opt=True)
    assert opt.refreshes == 2
    with pytest.raises(ValueError, match="set_targets"):
        train(model, opt, batches(1))


def test_sequence_logits_get_a_label_per_position():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, tokens):
            return {"logits": self.head(torch.tanh(self.emb(tokens)))}

    model = TinyLM()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, output_fn=lambda o: o["logits"])
    tokens = torch.randint(11, (4, 6))
    opt.zero_grad()
    out = model(tokens)["logits"]
    F.cross_entropy(out.reshape(-1, 11), tokens.reshape(-1)).backward()
    opt.step()
    assert opt.refreshes == 1 and opt.penalty_value > 0


def test_step_without_a_forward_explains_itself():
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": 0.1, "every": 0}, ValueError, "every"),
        ({"alpha": 0.1, "mode": "fast"}, ValueError, "'exact', 'finite_difference'"),
        ({"alpha": 0.1, "penalty": "hessian"}, ValueError, "'fisher', 'random_label'"),
        ({"alpha": 0.1, "penalty_batch_size": 0}, ValueError, "penalty_batch_size"),
        ({"alpha": 0.1, "fd_step": 0.0}, ValueError, "fd_step"),
        ({"alpha": 0.1, "fd_step": float("nan")}, ValueError, "fd_step"),
        ({"alpha": 0.1, "fd_step": float("inf")}, ValueError, "fd_step"),
        ({"alpha": 0.1, "base_optimizer": "sgd"}, TypeError, "torch.optim.Optimizer"),
    ],
)
def test_bad_input_is_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FisherPenaltySGD(tiny_mlp(), lr=0.1, **kwargs)


def test_model_and_parameter_errors():
    model = tiny_mlp()
    with pytest.raises(TypeError, match="nn.Module"):
        FisherPenaltySGD(model.parameters(), lr=0.1, alpha=0.1)
    stranger = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of model"):
        FisherPenaltySGD(model, torch.optim.SGD(stranger.parameters(), lr=0.1), alpha=0.1)
    with pytest.raises(TypeError, match="remove \\['lr'\\]"):
        FisherPenaltySGD(model, torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.1, lr=0.2)


def test_nan_forward_in_penalty_pass_is_skipped_not_a_crash():
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=1.0, every=1)
    x, y = batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))  # the penalty pass now sees NaN logits
    before = [p.clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_refreshes == 1
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.1 * g, equal_nan=True)


def test_deepcopy_of_the_model_neither_copies_nor_feeds_the_optimizer():
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, momentum=0.9, alpha=0.1, every=1)
    train(model, opt, batches(1))
    ema = copy.deepcopy(model)
    hook = next(iter(ema._forward_pre_hooks.values()))
    assert hook.wrapper() is opt  # the same optimizer, not a copy of it and its state
    x, y = batches(1, seed=1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ema(torch.randn(3, 5, dtype=torch.float64))  # not captured: the batch stays x
    assert opt.current_batch().args[0] is x
    opt.step()


# ----------------------------------------------------------------- the penalty weight's key
@pytest.mark.parametrize("base", [torch.optim.RMSprop, torch.optim.ASGD])
def test_penalty_weight_does_not_touch_a_base_hyperparameter_named_alpha(base):
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, base, alpha=0.3, lr=1e-3, every=1)
    own_alpha = base(tiny_mlp().parameters(), lr=1e-3).defaults["alpha"]
    assert opt.param_groups[0]["alpha"] == own_alpha
    assert opt.param_groups[0][fps.WEIGHT_KEY] == 0.3
    opt.param_groups[0][fps.WEIGHT_KEY] = 0.0  # scheduling the weight leaves the base alone
    train(model, opt, batches(2))
    assert opt.param_groups[0]["alpha"] == own_alpha and opt.refreshes == 0


def test_a_base_optimizer_that_uses_the_weight_key_raises():
    class Clashing(torch.optim.SGD):
        def __init__(self, params, lr=0.1, penalty_weight=1.0):
            torch.optim.Optimizer.__init__(
                self,
                params,
                {
                    "lr": lr,
                    "penalty_weight": penalty_weight,
                    "momentum": 0,
                    "dampening": 0,
                    "weight_decay": 0,
                    "nesterov": False,
                    "maximize": False,
                    "foreach": None,
                    "differentiable": False,
                    "fused": None,
                },
            )

    with pytest.raises(ValueError, match="penalty_weight"):
        FisherPenaltySGD(tiny_mlp(), Clashing, alpha=0.1)


def test_a_group_alpha_for_a_base_without_one_points_to_the_weight_key():
    model = tiny_mlp()
    groups = [{"params": list(model.parameters()), "alpha": 0.0}]
    with pytest.raises(ValueError, match="param_groups\\[0\\].*penalty_weight"):
        FisherPenaltySGD(model, alpha=0.1, lr=0.1, params=groups)


@pytest.mark.parametrize(
    ("alpha", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-1.0, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (None, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
)
def test_invalid_alpha_is_rejected_at_construction(alpha, error):
    with pytest.raises(error, match="alpha"):
        FisherPenaltySGD(tiny_mlp(), alpha=alpha, lr=0.1)


@pytest.mark.parametrize(
    ("weight", "error"),
    [
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("0.1", TypeError),
    ],
)
def test_invalid_group_weight_set_at_run_time_raises_naming_the_group(weight, error):
    model = tiny_mlp()
    groups = [{"params": [model[0].weight]}, {"params": [model[0].bias, *model[2].parameters()]}]
    opt = FisherPenaltySGD(model, alpha=0.1, lr=0.1, params=groups)
    train(model, opt, batches(1))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1][fps.WEIGHT_KEY] = weight
    with pytest.raises(error, match=r"param_groups\[1\]\['penalty_weight'\]"):
        train(model, opt, batches(1, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------- a stale cache is never applied
def _gp_penalty_gradient(model, x, y):
    """Brute force in float64: ∇_θ ||∇_θ CE(f(x), y)||² by two plain autograd calls."""
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    return torch.autograd.grad(sum((t * t).sum() for t in g), params)


def test_a_weight_raised_after_a_zero_weight_refresh_recomputes_on_the_current_batch():
    model = tiny_mlp()
    lr, alpha, every = 0.1, 0.5, 5
    opt = FisherPenaltySGD(model, alpha=alpha, lr=lr, every=every, penalty="gradient")
    data = batches(9)
    for step, (x, y) in enumerate(data):
        if step == 5:  # a refresh is due with every weight 0: the step-0 cache goes stale
            opt.param_groups[0][fps.WEIGHT_KEY] = 0.0
        if step == 7:
            opt.param_groups[0][fps.WEIGHT_KEY] = alpha
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        loss_grads = [p.grad.clone() for p in model.parameters()]
        opt.set_targets(y)
        opt.step()
        if step == 7:
            expected = _gp_penalty_gradient(copy.deepcopy(model_at(before, model)), x, y)
            for b, p, g, e in zip(before, model.parameters(), loss_grads, expected):
                applied = (b - p.detach()) / lr
                torch.testing.assert_close(applied, g + alpha * e, rtol=1e-9, atol=1e-12)
    assert opt.refreshes == 2  # steps 0 and 7; none at 5


def model_at(values, model):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(clone.parameters(), values):
            p.copy_(v)
    return clone


# ----------------------------------------------------------------- torch's random stream
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_dropout_penalty_leaves_the_global_random_stream_as_the_baseline_draws_it(mode):
    def run(make_opt):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 4))
        opt = make_opt(model)
        order = []
        for _ in range(4):
            x = torch.randn(8, 5)
            y = torch.randint(4, (8,))
            order.append(torch.randperm(8))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return order, torch.get_rng_state()

    base_order, base_state = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    fp_order, fp_state = run(lambda m: FisherPenaltySGD(m, alpha=0.1, lr=0.1, every=1, mode=mode))
    assert all(torch.equal(a, b) for a, b in zip(base_order, fp_order))
    assert torch.equal(base_state, fp_state)


# ------------------------------------------------- likelihood= (issue 14, item 3)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_one_output_model_with_a_chosen_likelihood_applies_its_penalty(likelihood):
    """One step equals SGD on grad L + α ∇Tr(F_B) of the functional penalty with the same
    likelihood and seed (itself checked against brute force in test_differentiation/test_penalty)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.5, every=1, seed=3, likelihood=likelihood)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    pg = penalty_gradient(ref, x, likelihood=likelihood, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(F.mse_loss(ref(x), y), list(ref.parameters()))
    for p, q, g, h in zip(model.parameters(), ref.parameters(), grads, pg):
        torch.testing.assert_close(p, q - 0.1 * (g + 0.5 * h), rtol=1e-12, atol=1e-14)


def test_likelihood_is_validated_and_one_output_categorical_raises():
    model = nn.Sequential(nn.Linear(5, 1)).double()
    with pytest.raises(ValueError, match="likelihood must be one of"):
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, likelihood="poisson")
    with pytest.raises(ValueError, match="no uniform distribution"):
        FisherPenaltySGD(model, lr=0.1, alpha=0.1, penalty="random_label", likelihood="gaussian")
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="identically 0.*likelihood='bernoulli'"):
        opt.step()


def _flat_loss(model, loss_fn, inputs, y):
    """The flat parameters ``θ`` and ``θ ↦ loss_fn(model(*inputs; θ), y)``."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(t):
        chunks = t.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, params, inputs), y)

    return theta, loss


def test_gradient_penalty_with_mse_on_one_output_applies_the_brute_force_gradient():
    """GP with loss_fn=F.mse_loss, [B, 1] outputs and targets (issue 14, item 4): the step
    adds α · 2 H g of mse(f(x), y) itself (explicit Hessian), not of a broadcast [B, B] loss."""
    from torch.func import grad, hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    theta, loss = _flat_loss(model, F.mse_loss, (x,), y)
    g = grad(loss)(theta)
    expected = theta - 0.1 * (g + 0.5 * 2 * hessian(loss)(theta) @ g)
    opt = FisherPenaltySGD(
        model, lr=0.1, alpha=0.5, every=1, penalty="gradient", loss_fn=F.mse_loss
    )
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.set_targets(y)
    opt.step()
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_finite_difference_refuses_half_precision_parameters_at_construction():
    with pytest.raises(TypeError, match="float32 or float64"):
        FisherPenaltySGD(tiny_mlp(torch.float16), alpha=0.1, lr=0.1, mode="finite_difference")


# ------------------------------------------- shared inputs and penalty_batch_size (issue 27)
class _Shared(nn.Module):
    """``x [B, T, 4]`` with an input shared by all examples: a table ``[T, 1]`` that scales
    the positions, or an additive attention mask ``[T, T]`` (causal)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, shared):
        h = self.lin(x)
        if shared.shape[-1] == 1:
            h = h * shared
        else:
            h = torch.softmax(h @ h.transpose(1, 2) / 5**0.5 + shared, dim=-1) @ h
        return self.head(torch.tanh(h).mean(1))


class _Holding(nn.Module):
    """The fix the error names: the shared tensor passed through the model (a buffer)."""

    def __init__(self, inner: nn.Module, shared: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("shared", shared)

    def forward(self, x):
        return self.inner(x, self.shared)


def _shared_case(kind: str, length: int, n: int = 6):
    torch.manual_seed(0)
    model = _Shared().double()
    x, y = torch.randn(n, length, 4, dtype=torch.float64), torch.randint(3, (n,))
    if kind == "table":
        shared = torch.linspace(0.5, 2.0, length, dtype=torch.float64).reshape(length, 1)
    else:
        shared = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    return model, x, y, shared


def _brute_gp_gradient(model, x, y, shared):
    """``∇ ||∇_θ CE(f(x), y)||² = 2 H g``: an explicit float64 Hessian, ``shared`` intact."""
    from torch.func import grad, hessian

    theta, loss = _flat_loss(model, F.cross_entropy, (x, shared), y)
    return 2 * hessian(loss)(theta) @ grad(loss)(theta)


def _penalty_step(model, opt, args, y):
    """One step at lr 0: the penalty gradient it added to ``p.grad``, flat."""
    opt.zero_grad()
    F.cross_entropy(model(*args), y).backward()
    plain = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.set_targets(y)
    opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()]) - plain


@pytest.mark.parametrize("kind", ["table", "mask"])
@pytest.mark.parametrize("m", [1, 3])
def test_a_batch_sized_shared_input_is_never_cut_by_penalty_batch_size(kind, m):
    """A ``[T, 1]`` table or ``[T, T]`` mask with ``T == B`` in the model's call: the penalty
    on the first ``m`` examples either raises naming the fix or is exactly the brute-force
    ``2 H g`` of those examples with the shared tensor whole (on main it was cut to ``m``
    rows: a wrong penalty gradient, silently for ``m = 1``)."""
    n = 6
    model, x, y, shared = _shared_case(kind, n, n)
    expected = _brute_gp_gradient(model, x[:m], y[:m], shared)
    for penalty in ("gradient", "fisher"):
        opt = FisherPenaltySGD(
            model, lr=0.0, alpha=1.0, every=1, penalty=penalty, penalty_batch_size=m, seed=0
        )
        try:
            added = _penalty_step(model, opt, (x, shared), y)
        except ValueError as error:
            assert "first example alone" in str(error)
            assert "functools.partial" in str(error)
            continue
        assert penalty == "gradient", "the Fisher penalty on a cut shared input must raise"
        torch.testing.assert_close(added, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["table", "mask"])
def test_a_shared_input_passed_through_the_model_gives_the_brute_force_penalty(kind):
    """The fix the error names: the same model holding the shared tensor is exact."""
    n, m = 6, 3
    inner, x, y, shared = _shared_case(kind, n, n)
    model = _Holding(inner, shared)
    opt = FisherPenaltySGD(
        model, lr=0.0, alpha=1.0, every=1, penalty="gradient", penalty_batch_size=m
    )
    added = _penalty_step(model, opt, (x,), y)
    expected = _brute_gp_gradient(inner, x[:m], y[:m], shared)
    torch.testing.assert_close(added, expected, rtol=1e-10, atol=1e-12)


def test_a_tensor_of_another_first_dimension_is_refused_when_the_batch_is_cut():
    """One entry rule (:mod:`fisher_optim.batch`): a batch that is cut holds the examples in
    the first dimension of every tensor input. A ``[T, T]`` mask with ``T != B`` is refused
    under ``penalty_batch_size`` (it could as well be a sequence-first input), and used as
    called when the penalty takes the whole batch."""
    n, length = 6, 5
    model, x, y, shared = _shared_case("mask", length, n)
    opt = FisherPenaltySGD(
        model, lr=0.0, alpha=1.0, every=1, penalty="gradient", penalty_batch_size=3
    )
    with pytest.raises(ValueError, match=r"argument 1 has shape \(5, 5\).*functools.partial"):
        _penalty_step(model, opt, (x, shared), y)
    opt = FisherPenaltySGD(model, lr=0.0, alpha=1.0, every=1, penalty="gradient")
    added = _penalty_step(model, opt, (x, shared), y)
    torch.testing.assert_close(
        added, _brute_gp_gradient(model, x, y, shared), rtol=1e-10, atol=1e-12
    )


# ------------------------------------------------------------------------------------------
# The finite difference's run-time checks
# ------------------------------------------------------------------------------------------


def test_auto_scheme_takes_the_forward_difference_while_the_central_one_trusts_it(monkeypatch):
    schemes, gaps = [], iter([0.001] + [None] * 9 + [0.02, 0.001] + [None] * 9)

    def fake(objective, mode, fd_step, fd_scheme, check_exact=False):
        schemes.append(fd_scheme)
        gap = next(gaps)
        grads = [torch.zeros_like(p) for p in objective.params]
        return PenaltyGradient(grads, torch.tensor(1.0), None if gap is None else torch.tensor(gap))

    monkeypatch.setattr(fps, "compute_penalty_gradient", fake)
    model = tiny_mlp(torch.float32)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, mode="finite_difference")
    train(model, opt, batches(21, dtype=torch.float32))
    # a central refresh within AUTO_TOLERANCE buys 9 forward ones; a wide gap keeps central
    assert schemes == ["central"] + ["forward"] * 9 + ["central", "central"] + ["forward"] * 9


class _OpaqueReLU(torch.autograd.Function):
    """A ReLU the activation pattern cannot see, as an extension kernel's would be."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        with torch._C.DisableTorchFunction():  # what a C++/CUDA kernel does: no Python calls
            return x * (x > 0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class _Wide(nn.Module):
    def __init__(self, opaque: bool) -> None:
        super().__init__()
        self.a, self.b, self.opaque = nn.Linear(32, 1024), nn.Linear(1024, 10), opaque

    def forward(self, x):
        h = self.a(x)
        return self.b(_OpaqueReLU.apply(h) if self.opaque else F.relu(h))


@pytest.mark.parametrize("opaque", [False, True])
def test_first_refresh_is_checked_against_the_exact_gradient(opaque):
    torch.manual_seed(0)
    model = _Wide(opaque)
    # a large step: the opaque ReLU's units surely cross their kink
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, mode="finite_difference", fd_step=1e-2)
    x, y = torch.randn(64, 32), torch.randint(10, (64,))
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    found = [w for w in caught if issubclass(w.category, FiniteDifferenceWarning)]
    assert bool(found) == opaque, [str(w.message) for w in found]
    if opaque:
        assert "from the exact one" in str(found[0].message)


def test_an_unreplayable_piecewise_operation_is_warned_about_once():
    model = nn.Sequential(nn.Linear(5, 16), nn.RReLU(), nn.Linear(16, 4)).double().eval()
    with pytest.warns(FiniteDifferenceWarning, match=r"cannot be replayed: rrelu \(1x\)"):
        penalty_gradient(model, torch.randn(8, 5, dtype=torch.float64), mode="finite_difference")


def test_a_forward_that_changes_its_piecewise_calls_falls_back_with_a_warning():
    class Alternating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(5, 8), nn.Linear(8, 4), 0

        def forward(self, x):
            self.calls += 1
            h = self.a(x)
            return self.b(F.relu(h) if self.calls % 2 else torch.tanh(h))

    model = Alternating().double()
    with pytest.warns(FiniteDifferenceWarning, match="did not repeat"):
        grads = penalty_gradient(
            model, torch.randn(8, 5, dtype=torch.float64), mode="finite_difference"
        )
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_penalty_value_of_a_float64_model_is_not_rounded_to_float32(monkeypatch):
    value = torch.tensor(1.0 + 2.0**-40, dtype=torch.float64)  # not a float32 number

    def fake(objective, *args, **kwargs):
        return PenaltyGradient([torch.zeros_like(p) for p in objective.params], value)

    monkeypatch.setattr(fps, "compute_penalty_gradient", fake)
    model = tiny_mlp()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1)
    train(model, opt, batches(1))
    assert opt.penalty_value == value.item() != float(value.float())

"""FisherTrainerCallback: Tr(F) and FisherPenaltySGD's counters reach the Trainer's logs
(``log_history`` and the reporting callbacks) at the right optimizer steps, Tr(F) equals a
float64 brute force over the probe set (examples × classes enumerated), a planted explosion
warns, and a tiny GPT-2 with a dict probe works."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherExplosionWarning, FisherPenaltySGD

from .curvature_utils import loop_exact_fisher

transformers = pytest.importorskip("transformers")

from fisher_optim.integrations.transformers import FisherTrainerCallback  # noqa: E402

EVERY, STEPS, LOGGING = 2, 6, 3


class DictClassifier(nn.Module):
    """A float64 tanh MLP that returns ``{"loss", "logits"}`` as the Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def logits_of(out):
    return out["logits"]


class Planter(transformers.TrainerCallback):
    """Plants an explosion after optimizer step ``at``: sharpens the output layer."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                model.net[2].weight.mul_(30.0)


class Recorder(transformers.TrainerCallback):
    """After every optimizer step: a copy of the model and the optimizer's counters; every
    log row as a reporting integration receives it."""

    def __init__(self) -> None:
        self.models, self.counters, self.reported = {}, {}, []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = optimizer.optimizer  # the Trainer's AcceleratedOptimizer wraps ours
        self.models[state.global_step] = copy.deepcopy(model)
        self.counters[state.global_step] = (opt.penalty_value, opt.refreshes, opt.skipped_refreshes)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.reported.append(dict(logs))


def _train(
    tmp_path, callback, recorder, model=None, dataset=None, opt=None, planter=None, accumulate=1
):
    torch.manual_seed(0)
    if model is None:
        model = DictClassifier()
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(96, 5, generator=g, dtype=torch.float64)
        ys = torch.randint(4, (96,), generator=g)
        dataset = [{"x": x, "labels": y} for x, y in zip(xs, ys)]
        opt = FisherPenaltySGD(model, lr=0.2, momentum=0.9, alpha=0.1, every=3, output_fn=logits_of)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=LOGGING,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        gradient_accumulation_steps=accumulate,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, optimizers=(opt, None), callbacks=[recorder]
    )
    callback.attach(trainer)  # ahead of the Recorder, which stands for report_to integrations
    if planter is not None:
        trainer.callback_handler.callbacks.insert(0, planter)  # before the measurement
    trainer.train()
    return trainer


def _probe() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logs_trace_and_counters_into_the_trainer_logs(tmp_path, accumulate: int) -> None:
    probe = _probe()
    callback = FisherTrainerCallback(probe, every=EVERY, output_fn=logits_of, labels="exact")
    recorder = Recorder()
    trainer = _train(tmp_path, callback, recorder, accumulate=accumulate)
    history = [r for r in trainer.state.log_history if "loss" in r]
    # logging_steps=3 logs at 3 and 6; the measurements at 2, 4, 6 ask for their own rows
    # (steps are optimizer steps: with accumulation each takes two batches)
    assert [r["step"] for r in history] == [2, 3, 4, 6]
    traced = [r["step"] for r in history if "fisher/trace" in r]
    assert traced == [EVERY, 2 * EVERY, 3 * EVERY]
    for row in history:
        step = row["step"]
        value, refreshes, skipped = recorder.counters[step]
        assert row["fisher/penalty_value"] == value
        assert row["fisher/refreshes"] == refreshes == -(-step // 3)
        assert row["fisher/skipped_refreshes"] == skipped == 0
        if step in traced:
            expected = loop_exact_fisher(recorder.models[step], probe, output_fn=logits_of)
            assert row["fisher/trace"] == pytest.approx(expected, rel=1e-10)
            assert row["fisher/exploding"] == 0.0
    # a reporting callback placed after it received the same rows, Fisher metrics included
    reported = [r for r in recorder.reported if "loss" in r]
    assert [{k: v for k, v in r.items() if k.startswith("fisher/")} for r in reported] == [
        {k: v for k, v in r.items() if k.startswith("fisher/")} for r in history
    ]
    assert [r["step"] for r in callback.monitor.history] == traced
    # the loss a measurement records is the last logged one: none yet at step 2, step 3's at 4
    assert [r["loss"] for r in callback.monitor.history] == [
        None,
        history[1]["loss"],
        history[2]["loss"],
    ]


def test_planted_explosion_warns_and_is_logged(tmp_path) -> None:
    probe = _probe()
    callback = FisherTrainerCallback(
        probe, every=EVERY, output_fn=logits_of, labels="exact", growth_factor=5.0
    )
    recorder = Recorder()
    with pytest.warns(FisherExplosionWarning, match="step 4"):
        trainer = _train(tmp_path, callback, recorder, planter=Planter(at=4))
    rows = {r["step"]: r for r in trainer.state.log_history if "fisher/trace" in r}
    assert {s: r["fisher/exploding"] for s, r in rows.items()} == {2: 0.0, 4: 1.0, 6: 1.0}
    assert rows[4]["fisher/trace"] > 5.0 * rows[2]["fisher/trace"]
    expected = loop_exact_fisher(recorder.models[4], probe, output_fn=logits_of)
    assert rows[4]["fisher/trace"] == pytest.approx(expected, rel=1e-10)


def test_tiny_gpt2_with_a_dict_probe(tmp_path) -> None:
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(32, (24, 8), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    opt = FisherPenaltySGD(
        model,
        lr=0.05,
        alpha=0.1,
        every=2,
        mode="finite_difference",
        output_fn=lambda out: out.logits,
    )
    callback = FisherTrainerCallback(
        {"input_ids": ids[:4]}, every=EVERY, output_fn=lambda out: out.logits
    )
    trainer = _train(tmp_path, callback, Recorder(), model=model, dataset=dataset, opt=opt)
    traces = [r["fisher/trace"] for r in trainer.state.log_history if "fisher/trace" in r]
    assert len(traces) == 3 and all(t > 0 for t in traces)


def test_warns_when_added_behind_the_reporting_callbacks(tmp_path) -> None:
    callback = FisherTrainerCallback(_probe(), every=1, output_fn=logits_of)
    model = DictClassifier()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    callback.on_step_end(args, state, control)  # measures: every=1
    assert control.should_log
    args.report_to = ["tensorboard"]
    with pytest.warns(UserWarning, match="attach"):
        callback.on_log(args, state, control, logs={"loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_log(args, state, control, logs={"loss": 1.0})  # only once


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="every"):
        FisherTrainerCallback(_probe(), every=0)
    with pytest.raises(ValueError, match="threshold"):
        FisherTrainerCallback(_probe(), threshold=-1.0)


# ----------------------------------------------------------------------------- the optimizer
def test_optim_names_are_a_closed_enum(tmp_path) -> None:
    """What does not work without patching transformers: a new ``optim=`` name."""
    with pytest.raises(ValueError):
        transformers.TrainingArguments(output_dir=str(tmp_path), optim="fishersgd")


def test_factory_builds_the_trainers_optimizer(tmp_path) -> None:
    from fisher_optim.integrations.transformers import FisherPenaltyFactory

    torch.manual_seed(0)
    model = DictClassifier()
    model.norm = nn.LayerNorm(4).double()  # a norm layer (unused): spared by weight decay
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(48, 5, generator=g, dtype=torch.float64)
    ys = torch.randint(4, (48,), generator=g)
    dataset = [{"x": x, "labels": y} for x, y in zip(xs, ys)]
    kwargs = dict(
        base_optimizer=torch.optim.SGD,
        lr=0.2,
        momentum=0.9,
        weight_decay=0.01,
        alpha=0.1,
        every=2,
        output_fn=logits_of,
        seed=3,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        learning_rate=123.0,  # not used
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizer_cls_and_kwargs=(FisherPenaltyFactory, kwargs),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer  # the Trainer's AcceleratedOptimizer wraps ours
    assert isinstance(opt, FisherPenaltySGD) and opt.model is model
    assert opt.refreshes == 2
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"net.0.weight", "net.2.weight"}  # no bias, no norm weight

    assert all(g["lr"] == 0.2 for g in opt.param_groups)  # ours, not learning_rate=123
    for p, q in zip(model.net.parameters(), reference.net.parameters()):
        assert torch.isfinite(p).all() and not torch.equal(p, q)


def test_factory_needs_lr_and_alpha() -> None:
    from fisher_optim.integrations.transformers import FisherPenaltyFactory

    with pytest.raises(ValueError, match="lr="):
        FisherPenaltyFactory()(DictClassifier(), alpha=0.1)
    with pytest.raises(ValueError, match="alpha="):
        FisherPenaltyFactory()(DictClassifier(), lr=0.1)

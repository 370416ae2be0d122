"""Hugging Face ``transformers`` models, in a plain loop and in ``transformers.Trainer``.

Tiny ``GPT2LMHeadModel`` / ``BertForSequenceClassification`` / ``BertForMaskedLM`` built from
configs (random weights, no download). Checked: the zero-change swap (no ``output_fn``);
positions without a target (padding, ``-100`` labels, the causal shift) excluded from the
penalty, against a float64 brute force over the real tokens only, and the penalty unchanged by
the pad tokens' ids; ``max_grad_norm`` bounding the whole applied gradient (plain loop,
``GradScaler``, ``Trainer``); gradient accumulation and ``resume_from_checkpoint`` (bitwise) in
``Trainer``; exact and finite-difference modes.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from fisher_optim import Batch, FisherPenaltySGD
from fisher_optim.penalty import PenaltyObjective

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB, SEQ, BATCH = 50, 8, 4
MODES = ["exact", "finite_difference"]


def gpt2(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(dtype)


def bert(head: str = "seq", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    cls = (
        transformers.BertForSequenceClassification
        if head == "seq"
        else transformers.BertForMaskedLM
    )
    return cls(config).to(dtype)


def padded(pad_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (pad token ``pad_id``) and their attention mask (25% padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def causal_inputs(pad_id: int, kind: str, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """GPT-2 inputs and the rows with a target, written out from the causal shift: row (b, t)
    predicts token t + 1, so it has a target iff t + 1 is a real token (and, without labels,
    t is one too)."""
    ids, mask = padded(pad_id, seed)
    rows = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for b in range(BATCH):
        for t in range(SEQ - 1):
            rows[b, t] = bool(mask[b, t + 1]) and (kind == "labels" or bool(mask[b, t]))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "labels":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs, rows


def brute_penalty(model, inputs: dict, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||(1/N) Σ_{rows n with a target} ∇ CE(f_n, ŷ_n)||²`` one row at a time, float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(**inputs).logits
    flat = logits.reshape(-1, logits.shape[-1])
    index = rows.reshape(-1).nonzero().flatten().tolist()
    assert len(index) == len(labels)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for k, i in enumerate(index):
        loss = F.cross_entropy(flat[i : i + 1], labels[k : k + 1])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        total += torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]
        )
    total /= len(index)
    return total.dot(total)


def library_penalty(model, inputs: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's penalty on ``inputs`` and the labels it drew (generator seeded ``seed``)."""
    objective = PenaltyObjective(
        model, Batch((), dict(inputs)), generator=torch.Generator().manual_seed(seed)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective.loss(), params, allow_unused=True)
    return sum(g.pow(2).sum() for g in grads if g is not None), objective.labels


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------ zero-change swap
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_zero_change_swap_in_a_plain_loop(arch: str, mode: str):
    model = gpt2() if arch == "gpt2" else bert()
    before = flat_params(model)
    opt = FisherPenaltySGD(model, torch.optim.AdamW, lr=1e-3, alpha=0.1, every=2, mode=mode)
    for step in range(3):
        ids, mask = padded(0, seed=step)
        labels = ids.masked_fill(mask == 0, -100) if arch == "gpt2" else ids[:, 0] % 3
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    assert opt.refreshes == 2 and opt.skipped_refreshes == 0
    assert opt.penalty_value is not None and opt.penalty_value > 0
    assert not torch.equal(flat_params(model), before)


# ------------------------------------------------------------------ rows with a target
@pytest.mark.parametrize("kind", ["labels", "attention_mask"])
def test_causal_lm_penalty_is_brute_force_over_real_tokens(kind: str):
    model = gpt2(torch.float64)
    values = []
    for pad_id in (0, 17):
        inputs, rows = causal_inputs(pad_id, kind)
        value, labels = library_penalty(model, inputs, seed=1)
        assert len(labels) == int(rows.sum()) == 16  # of 32 positions
        torch.testing.assert_close(
            value, brute_penalty(model, inputs, rows, labels), rtol=1e-10, atol=0
        )
        values.append(value)
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)  # pad ids do not matter


def test_causal_lm_without_mask_drops_only_the_last_position():
    model = gpt2(torch.float64)
    ids, _ = padded(0)
    rows = torch.ones(BATCH, SEQ, dtype=torch.bool)
    rows[:, -1] = False
    value, labels = library_penalty(model, {"input_ids": ids}, seed=2)
    torch.testing.assert_close(
        value, brute_penalty(model, {"input_ids": ids}, rows, labels), rtol=1e-10, atol=0
    )


def test_masked_lm_penalises_the_labelled_positions_only():
    model = bert("mlm", torch.float64)
    ids, mask = padded(0)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[3, 5] = ids[3, 5]
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    value, drawn = library_penalty(model, inputs, seed=3)
    torch.testing.assert_close(
        value, brute_penalty(model, inputs, labels != -100, drawn), rtol=1e-10, atol=0
    )


def test_sequence_classifier_penalty_is_unchanged_by_pad_ids():
    model = bert("seq", torch.float64)
    values = []
    for pad_id in (0, 9):
        ids, mask = padded(pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        value, labels = library_penalty(model, inputs, seed=4)
        rows = torch.ones(BATCH, dtype=torch.bool)  # one row per sequence
        torch.testing.assert_close(
            value, brute_penalty(model, inputs, rows, labels), rtol=1e-10, atol=0
        )
        values.append(value)
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_penalises_real_tokens_only(mode: str):
    """One step of FisherPenaltySGD: its penalty is the brute force over the real tokens, and
    the step is the same whatever the pad tokens' ids."""
    results = []
    for pad_id in (0, 17):
        model = gpt2(torch.float64)
        inputs, rows = causal_inputs(pad_id, "labels")
        _, labels = library_penalty(model, inputs, seed=11)  # the optimizer's first draw
        expected = brute_penalty(model, inputs, rows, labels)
        opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, mode=mode, seed=11)
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
        assert opt.penalty_value == pytest.approx(float(expected), rel=1e-6)  # stored in fp32
        results.append(flat_params(model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-15)


def test_penalty_batch_size_keeps_the_rows_of_the_first_sequences():
    model = gpt2(torch.float64)
    inputs, rows = causal_inputs(0, "labels")
    head = {k: v[:2] for k, v in inputs.items()}
    _, labels = library_penalty(model, head, seed=12)
    expected = brute_penalty(model, head, rows[:2], labels)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1, seed=12, penalty_batch_size=2)
    opt.zero_grad()
    model(**inputs).loss.backward()
    opt.step()
    assert opt.penalty_value == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------ clipping
def applied_gradient(model, opt, inputs: dict, lr: float, scaler=None) -> torch.Tensor:
    """One step of plain SGD: the gradient it applied, ``(θ_before − θ_after) / lr``."""
    before = flat_params(model)
    opt.zero_grad()
    if scaler is None:
        model(**inputs).loss.backward()
        opt.step()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return (before - flat_params(model)) / lr


@pytest.mark.parametrize("mode", MODES)
def test_max_grad_norm_clips_the_whole_applied_gradient(mode: str):
    inputs, _ = causal_inputs(0, "labels")
    lr, clip = 1.0, 0.01
    model = gpt2()
    opt = FisherPenaltySGD(model, lr=lr, alpha=0.1, every=1, mode=mode, seed=0)
    full = applied_gradient(model, opt, inputs, lr)  # loss gradient + 0.1 ∇P, not clipped
    assert full.norm() > 10 * clip

    model = gpt2()
    opt = FisherPenaltySGD(model, lr=lr, alpha=0.1, every=1, mode=mode, seed=0, max_grad_norm=clip)
    clipped = applied_gradient(model, opt, inputs, lr)
    assert clipped.norm() <= clip * (1 + 1e-5)
    torch.testing.assert_close(clipped, full * (clip / full.norm()), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(opt.grad_norm, full.norm(), rtol=1e-4, atol=0)

    # clipping in the loop, before step(), sees only the loss gradient: the step is not bounded
    model = gpt2()
    opt = FisherPenaltySGD(model, lr=lr, alpha=0.1, every=1, mode=mode, seed=0)
    opt.zero_grad()
    model(**inputs).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    before = flat_params(model)
    opt.step()
    assert ((before - flat_params(model)) / lr).norm() > 10 * clip


def test_max_grad_norm_with_grad_scaler():
    inputs, _ = causal_inputs(0, "labels")
    model = gpt2()
    opt = FisherPenaltySGD(model, lr=1.0, alpha=0.1, every=1, max_grad_norm=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        assert applied_gradient(model, opt, inputs, 1.0, scaler).norm() <= 0.01 * (1 + 1e-5)
    assert opt.step_count == 2 and opt.skipped_refreshes == 0


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_alpha_zero_with_max_grad_norm_is_the_base_optimizer_plus_clipping_bitwise(base):
    kwargs = {"lr": 0.1, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01}
    runs = []
    for ours in (True, False):
        model = gpt2()
        opt = (
            FisherPenaltySGD(model, base, alpha=0.0, max_grad_norm=0.05, **kwargs)
            if ours
            else base(model.parameters(), **kwargs)
        )
        for step in range(3):
            inputs, _ = causal_inputs(0, "labels", seed=step)
            opt.zero_grad()
            model(**inputs).loss.backward()
            if not ours:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        runs.append(flat_params(model))
    assert torch.equal(runs[0], runs[1])


def test_max_grad_norm_must_be_positive():
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises((ValueError, TypeError), match="max_grad_norm"):
            FisherPenaltySGD(gpt2(), lr=0.1, alpha=0.1, max_grad_norm=bad)


# ------------------------------------------------------------------ transformers.Trainer
class TokenData(torch.utils.data.Dataset):
    """Right-padded sequences with ``labels`` (-100 on padding), as a tokenizer would give."""

    def __init__(self, n: int) -> None:
        self.items = []
        for i in range(n):
            ids, mask = padded(0, seed=100 + i // BATCH)
            row = i % BATCH
            self.items.append(
                {
                    "input_ids": ids[row],
                    "attention_mask": mask[row],
                    "labels": ids[row].masked_fill(mask[row] == 0, -100),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class AppliedNorms(transformers.TrainerCallback):
    """The norm of the gradient each optimizer step applied (plain SGD, constant lr)."""

    def __init__(self, model, lr: float) -> None:
        self.model, self.lr, self.norms = model, lr, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = flat_params(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(float(((self.before - flat_params(self.model)) / self.lr).norm()))


def trainer_args(out_dir, **kw) -> transformers.TrainingArguments:
    defaults = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**defaults, **kw})


@pytest.mark.parametrize("mode", MODES)
def test_trainer_zero_change_swap_with_accumulation_and_clipping(tmp_path, mode: str):
    model = gpt2()
    before = flat_params(model)
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=2, mode=mode, max_grad_norm=0.05)
    norms = AppliedNorms(model, 0.1)
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, max_grad_norm=0),
        train_dataset=TokenData(3 * 2 * BATCH),
        optimizers=(opt, None),
        callbacks=[norms],
    )
    trainer.train()
    assert opt.step_count == 3 and opt.refreshes == 2 and opt.skipped_refreshes == 0
    assert len(norms.norms) == 3 and max(norms.norms) <= 0.05 * (1 + 1e-5)
    assert opt.penalty_value is not None and opt._batch is None
    assert not torch.equal(flat_params(model), before)


def test_trainer_alpha_zero_with_max_grad_norm_equals_trainer_clipping_bitwise(tmp_path):
    runs = []
    for ours in (True, False):
        model = gpt2()
        opt = (
            FisherPenaltySGD(model, lr=0.1, momentum=0.9, alpha=0.0, max_grad_norm=0.05)
            if ours
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        )
        args = trainer_args(tmp_path / str(ours), max_steps=3, max_grad_norm=0 if ours else 0.05)
        transformers.Trainer(
            model=model, args=args, train_dataset=TokenData(3 * BATCH), optimizers=(opt, None)
        ).train()
        runs.append(flat_params(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("mode", MODES)
def test_trainer_resume_from_checkpoint_is_bitwise(tmp_path, mode: str):
    def run(out_dir, resume=None):
        model = gpt2()
        opt = FisherPenaltySGD(
            model, lr=0.1, momentum=0.9, alpha=0.1, every=2, mode=mode, max_grad_norm=1.0
        )
        args = trainer_args(out_dir, max_steps=5, save_strategy="steps", save_steps=3)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=TokenData(6 * BATCH), optimizers=(opt, None)
        )
        trainer.train(resume_from_checkpoint=resume)
        return flat_params(model), opt

    straight, opt_a = run(tmp_path / "a")
    resumed, opt_b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert opt_a.step_count == opt_b.step_count == 5
    assert opt_a.refreshes == opt_b.refreshes == 3  # steps 0, 2 (restored) and 4
    assert torch.equal(straight, resumed)


def test_copy_of_model_does_not_confuse_the_optimizer():
    """An EMA-style deep copy of an HF model forwarding in train mode is ignored."""
    model = gpt2()
    opt = FisherPenaltySGD(model, lr=0.1, alpha=0.1, every=1)
    shadow = copy.deepcopy(model)
    inputs, _ = causal_inputs(0, "labels")
    opt.zero_grad()
    model(**inputs).loss.backward()
    shadow(input_ids=inputs["input_ids"][:1])
    opt.step()
    assert opt.refreshes == 1


# ------------------------------------------------------------------ FisherNoiseSGD
@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_fisher_noise_ignores_positions_without_a_target(covariance: str):
    """The noise's Fisher estimate is the same whatever the pad tokens' ids: padded positions
    and the last one get no sampled label."""
    from fisher_optim import FisherNoiseSGD

    results = []
    for pad_id in (0, 17):
        model = gpt2(torch.float64)
        inputs, _ = causal_inputs(pad_id, "attention_mask")
        opt = FisherNoiseSGD(model, lr=0.1, small_batch_size=2, covariance=covariance, seed=0)
        opt.zero_grad()
        model(
            **inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        ).loss.backward()
        opt.step()
        results.append((opt.fisher_trace, flat_params(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-13)


def test_causal_lm_detection():
    from fisher_optim.targets import is_causal_lm

    tiny = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        num_key_value_heads=2,
    )
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny))
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
        )
    )
    assert is_causal_lm(gpt2()) and is_causal_lm(llama)
    assert not is_causal_lm(bert("seq")) and not is_causal_lm(bert("mlm"))
    assert not is_causal_lm(t5)  # encoder-decoder: logits line up with the labels

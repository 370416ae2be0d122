"""Curvature measurements on Hugging Face models with padded batch dicts (issue 15, item 5).

Tiny ``GPT2LMHeadModel`` and ``BertForSequenceClassification`` from configs (random weights,
float64), SDPA and eager attention, right-padded batches with an ``attention_mask`` and
``labels`` (-100 at padding). Every function takes the batch dict (and a ``Batch``, and a
DataLoader of dicts) and equals a brute force written from the math over the *real tokens
only*: each example run alone, unpadded; a causal LM's row ``t`` predicts token ``t + 1``
(its last real position has no target); an example's loss is the mean over its rows with a
target; the Hessian's loss is the mean over all target rows of the batch, as the model's
own loss.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from fisher_optim import Batch, FisherMonitor
from fisher_optim.curvature import (
    fisher_trace,
    group_gradient_stats,
    hessian_trace,
    minibatch_fisher_trace,
    per_example_grad_norms,
    random_probe,
    top_hessian_eigenvalue,
)
from fisher_optim.likelihoods import sample_labels

from .curvature_utils import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning",
    "ignore:top_hessian_eigenvalue did not converge:RuntimeWarning",
)

VOCAB, SEQ, BATCH, CLASSES = 5, 4, 3, 3
ATTENTION = ["sdpa", "eager"]


def gpt2(attn: str) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    model = transformers.GPT2LMHeadModel(config).double()
    assert model.config._attn_implementation == attn
    return model.train()  # dropout on: the measurements must switch to eval mode


def bert(attn: str) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=CLASSES,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config).double().train()


LENGTHS = [4, 2, 3]  # real tokens per example (right padding)


def batch(kind: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    if kind == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 2] = -100  # a prompt token: row 1 of example 0 has no target
    else:
        labels = torch.randint(CLASSES, (BATCH,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make(kind: str, attn: str) -> tuple[nn.Module, dict[str, Tensor]]:
    return (gpt2(attn) if kind == "gpt2" else bert(attn)), batch(kind)


# ----------------------------------------------------------------------- brute force
def real_logits(model: nn.Module, data: dict[str, Tensor], i: int) -> Tensor:
    """Logit rows of example ``i`` run alone on its real tokens: ``[L, V]`` or ``[1, C]``."""
    length = LENGTHS[i]
    out = model(input_ids=data["input_ids"][i : i + 1, :length]).logits
    return out.reshape(-1, out.shape[-1])


def real_targets(kind: str, data: dict[str, Tensor], i: int) -> Tensor:
    """The target of each row of :func:`real_logits`, -100 where a row has none."""
    if kind == "bert":
        return data["labels"][i : i + 1]
    labels = data["labels"][i, : LENGTHS[i]]
    return torch.cat([labels[1:], torch.tensor([-100])])  # row t predicts token t + 1


def grad_sq(model: nn.Module, loss: Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(sum(g.square().sum() for g in grads if g is not None))


def example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum") / keep.sum()


def brute_norms(kind: str, model: nn.Module, data: dict[str, Tensor]) -> Tensor:
    ref = copy.deepcopy(model).eval()
    return torch.tensor(
        [
            grad_sq(ref, example_loss(real_logits(ref, data, i), real_targets(kind, data, i)))
            for i in range(BATCH)
        ],
        dtype=torch.float64,
    ).sqrt()


def brute_exact_fisher(kind: str, model: nn.Module, data: dict[str, Tensor]) -> float:
    """``(1/N) Σ_i Σ_{label tuples ŷ} p(ŷ) ||∇ mean_rows CE(f_i, ŷ)||²`` over every tuple of
    labels of the rows with a target (no independence shortcut)."""
    ref = copy.deepcopy(model).eval()
    total = 0.0
    for i in range(BATCH):
        rows = (real_targets(kind, data, i) != -100).nonzero().reshape(-1)
        with torch.no_grad():
            probs = torch.softmax(real_logits(ref, data, i)[rows], -1)
        c = probs.shape[-1]
        for labels in torch.cartesian_prod(*[torch.arange(c)] * len(rows)).reshape(-1, len(rows)):
            weight = float(probs[torch.arange(len(rows)), labels].prod())
            loss = F.cross_entropy(real_logits(ref, data, i)[rows], labels)
            total += weight * grad_sq(ref, loss)
    return total / BATCH


def brute_loss(kind: str, model: nn.Module, data: dict[str, Tensor]) -> Tensor:
    """The model's own loss on the batch: mean CE over all rows with a target."""
    logits = torch.cat([real_logits(model, data, i) for i in range(BATCH)])
    targets = torch.cat([real_targets(kind, data, i) for i in range(BATCH)])
    return F.cross_entropy(logits, targets)


def brute_hessian(kind: str, model: nn.Module, data: dict[str, Tensor]) -> Tensor:
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):  # twice differentiable
        grad = torch.autograd.grad(brute_loss(kind, ref, data), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grad])
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    rows = torch.autograd.grad(flat, params, eye, is_grads_batched=True, allow_unused=True)
    return torch.cat(
        [
            (r if r is not None else torch.zeros(len(eye), *p.shape, dtype=p.dtype)).flatten(1)
            for r, p in zip(rows, params, strict=True)
        ],
        dim=1,
    )


# ----------------------------------------------------------------------- tests
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_per_example_grad_norms_over_real_tokens(kind: str, attn: str) -> None:
    model, data = make(kind, attn)
    snap = snapshot(model)
    norms = per_example_grad_norms(model, data)  # the targets: the dict's labels
    assert_unchanged(model, snap)
    torch.testing.assert_close(norms, brute_norms(kind, model, data), rtol=1e-10, atol=1e-14)
    explicit = per_example_grad_norms(
        model, Batch((), {k: data[k] for k in data}, None), data["labels"]
    )
    torch.testing.assert_close(explicit, norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_exact_fisher_trace_over_real_tokens(kind: str, attn: str) -> None:
    model, data = make(kind, attn)
    snap = snapshot(model)
    value = fisher_trace(model, data, labels="exact")
    assert_unchanged(model, snap)
    expected = brute_exact_fisher(kind, model, data)
    assert value == pytest.approx(expected, rel=1e-10)
    # a Batch, a list of dicts (a DataLoader's batches) and the monitor give the same
    inputs = {k: v for k, v in data.items() if k != "labels"}
    if kind == "bert":  # sequence classification: every example has its one row
        assert fisher_trace(model, inputs, labels="exact") == pytest.approx(expected, rel=1e-10)
    as_batch = Batch((), dict(data))
    assert fisher_trace(model, as_batch, labels="exact") == pytest.approx(expected, rel=1e-10)
    halves = [{k: v[:2] for k, v in data.items()}, {k: v[2:] for k, v in data.items()}]
    assert fisher_trace(model, halves, labels="exact") == pytest.approx(expected, rel=1e-10)
    monitor = FisherMonitor(model, data, labels="exact")
    assert monitor.measure()["trace"] == pytest.approx(expected, rel=1e-10)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_sampled_fisher_trace_over_real_tokens(kind: str, attn: str) -> None:
    """With a seeded generator the labels are ``sample_labels`` of the padded batch's logit
    rows; the brute force uses those of the real rows with a target."""
    model, data = make(kind, attn)
    value = fisher_trace(model, data, generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = ref(**data).logits
        drawn = sample_labels(
            logits.reshape(-1, logits.shape[-1]), generator=torch.Generator().manual_seed(4)
        )
    drawn = drawn.reshape(logits.shape[:-1])
    total = 0.0
    for i in range(BATCH):
        targets = real_targets(kind, data, i)
        labels = drawn[i, : LENGTHS[i]] if kind == "gpt2" else drawn[i : i + 1]
        labels = torch.where(targets != -100, labels, -100)
        total += grad_sq(ref, example_loss(real_logits(ref, data, i), labels))
    assert value == pytest.approx(total / BATCH, rel=1e-10)
    monitor = FisherMonitor(model, data, generator=torch.Generator().manual_seed(4))
    assert monitor.measure()["trace"] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_minibatch_fisher_trace_over_real_tokens(kind: str) -> None:
    """Tr(F_B): the squared norm of the mean gradient over the batch's rows with a target."""
    model, data = make(kind, "sdpa")
    model.eval()  # Tr(F_B) runs in the model's mode: no dropout here
    value = minibatch_fisher_trace(model, data, generator=torch.Generator().manual_seed(6))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        logits = ref(**data).logits
        drawn = sample_labels(
            logits.reshape(-1, logits.shape[-1]), generator=torch.Generator().manual_seed(6)
        )
    drawn = drawn.reshape(logits.shape[:-1])
    rows, labels = [], []
    for i in range(BATCH):
        targets = real_targets(kind, data, i)
        mine = drawn[i, : LENGTHS[i]] if kind == "gpt2" else drawn[i : i + 1]
        rows.append(real_logits(ref, data, i))
        labels.append(torch.where(targets != -100, mine, -100))
    loss = F.cross_entropy(torch.cat(rows), torch.cat(labels))
    assert value == pytest.approx(grad_sq(ref, loss), rel=1e-10)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hessian_functions_over_real_tokens(kind: str, attn: str) -> None:
    """SDPA included (its fused kernel has no double backward: the math kernel is used);
    the dict's labels are the targets; ``(Batch, y)``, ``Batch`` and a list of dicts work."""
    model, data = make(kind, attn)
    snap = snapshot(model)
    h = brute_hessian(kind, model, data)
    d = h.shape[0]
    g = torch.Generator().manual_seed(7)  # the probes Hutchinson draws, in its order
    probes = [random_probe(d, generator=g, dtype=torch.float64) for _ in range(2)]
    expected = float(sum(z @ h @ z for z in probes)) / 2
    inputs = {k: v for k, v in data.items() if k != "labels"}
    loader = DataLoader(
        [{k: v[i] for k, v in data.items()} for i in range(BATCH)], batch_size=BATCH
    )  # a DataLoader of HF dicts (with "labels")
    for given in (
        data,
        loader,
        (Batch((), inputs), data["labels"]),
        Batch((), inputs, data["labels"]),
    ):
        est = hessian_trace(model, given, num_probes=2, generator=torch.Generator().manual_seed(7))
        assert est.estimate == pytest.approx(expected, rel=1e-9)
    top = top_hessian_eigenvalue(model, data, iters=d, tol=1e-12)
    assert top.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)
    assert_unchanged(model, snap)
    assert math.isfinite(top.residual)


def test_batch_tensor_without_the_examples_in_dimension_0_is_an_error() -> None:
    model, data = make("bert", "eager")
    bad = dict(data, token_type_ids=torch.zeros(1, SEQ, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids"):
        fisher_trace(model, bad)


def test_group_gradient_stats_over_real_tokens() -> None:
    """The groups' mean gradients use the same per-example losses (real tokens, shift)."""
    model, data = make("gpt2", "sdpa")
    groups = torch.tensor([True, False, True])
    stats = group_gradient_stats(model, data, data["labels"], groups)
    ref = copy.deepcopy(model).eval()
    params = list(ref.parameters())
    for k in (False, True):
        members = [i for i in range(BATCH) if bool(groups[i]) == k]
        loss = sum(
            example_loss(real_logits(ref, data, i), real_targets("gpt2", data, i)) for i in members
        ) / len(members)
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        assert stats["grad_norm"][k] == pytest.approx(norm, rel=1e-10)

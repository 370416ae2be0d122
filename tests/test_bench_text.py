"""benchmarks/common/text.py: the stdlib corpus (deterministic, split by file) and the byte LM
(causal, its loss equal to a float64 per-position brute force)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.common.text import (
    VOCAB_SIZE,
    ByteTransformerLM,
    build_language_model,
    load_stdlib_corpus,
    split_files,
    stdlib_files,
    token_cross_entropy,
)


def test_corpus_is_deterministic_and_split_by_file(tmp_path) -> None:
    for name, text in [
        ("b.py", "bb"),
        ("a.py", "aaa"),
        ("c.py", "c"),
        ("d.py", "dddd"),
        ("notes.txt", "x"),
    ]:
        (tmp_path / name).write_text(text)
    assert [f.name for f in stdlib_files(tmp_path)] == ["a.py", "b.py", "c.py", "d.py"]
    corpus = load_stdlib_corpus(val_every=2, root=tmp_path)
    assert corpus.train_files == ["a.py", "c.py"] and corpus.val_files == ["b.py", "d.py"]
    assert bytes(corpus.train.tolist()) == b"aaac" and bytes(corpus.val.tolist()) == b"bbdddd"
    assert bytes(load_stdlib_corpus(2, max_bytes=2, root=tmp_path).val.tolist()) == b"bb"
    info = corpus.describe()
    assert info["train_bytes"] == 4 and info["val_file_names"] == ["b.py", "d.py"]
    assert info["sha256"] == load_stdlib_corpus(val_every=2, root=tmp_path).describe()["sha256"]


def test_real_stdlib_windows() -> None:
    corpus = load_stdlib_corpus(val_every=10, max_bytes=50_000)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert len(corpus.val_files) == len(stdlib_files()) // 10
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batch = corpus.train_batch(4, 16, g1)
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    assert torch.equal(batch, corpus.train_batch(4, 16, g2))  # the generator is the data order
    val = corpus.val_windows(5, 16)
    assert torch.equal(val[0], corpus.val[:17].long())
    assert torch.equal(val[-1], corpus.val[-17:].long())
    assert corpus.probe_windows(3, 16).shape == (3, 17)


def test_split_and_model_arguments() -> None:
    with pytest.raises(ValueError, match="val_every"):
        split_files([], 1)
    with pytest.raises(ValueError, match="no validation"):
        split_files(stdlib_files()[:3], 10)
    with pytest.raises(ValueError, match="multiple of heads"):
        ByteTransformerLM(dim=10, heads=4)
    with pytest.raises(ValueError, match="context"):
        ByteTransformerLM(context=8, dim=8, heads=2)(torch.zeros(1, 9, dtype=torch.long))


def test_model_is_causal_and_loss_matches_per_position_brute_force() -> None:
    torch.manual_seed(0)
    model = ByteTransformerLM(context=8, dim=16, layers=2, heads=2).double()
    ids = torch.randint(VOCAB_SIZE, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB_SIZE
    logits = model(ids).detach()
    assert torch.equal(logits[:, :5], model(changed)[:, :5])  # no position sees the future
    assert not torch.allclose(logits[:, 5:], model(changed)[:, 5:])
    targets = torch.randint(VOCAB_SIZE, (2, 8))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    brute = 0.0
    for b in range(2):
        for t in range(8):
            row = logits[b, t]
            brute += -(row[targets[b, t]] - math.log(float(row.exp().sum())))
    assert float(loss) == pytest.approx(float(brute) / 16, rel=1e-12)


def test_token_cross_entropy_is_the_mean_over_every_position() -> None:
    """Against float64 ``-log softmax`` at each position's target; ``[B, C]`` logits too."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(7, (3, 5), generator=g)
    terms = [-torch.log_softmax(logits[b, t], 0)[targets[b, t]] for b in range(3) for t in range(5)]
    assert math.isclose(float(token_cross_entropy(logits, targets)), float(sum(terms) / 15))
    total = float(token_cross_entropy(logits, targets, reduction="sum"))
    assert math.isclose(total, float(sum(terms)))
    flat = token_cross_entropy(logits[:, 0], targets[:, 0])
    assert math.isclose(float(flat), float(sum(terms[::5]) / 3))


def test_language_models_by_name() -> None:
    torch.manual_seed(0)
    lm = build_language_model("byte_transformer")
    assert isinstance(lm, ByteTransformerLM) and lm.context == 64 and len(lm.blocks) == 2
    with pytest.raises(ValueError, match="byte_transformer, tiny_gpt2"):
        build_language_model("gpt3")
    pytest.importorskip("transformers")
    gpt2 = build_language_model("tiny_gpt2")
    assert gpt2(torch.randint(50, (2, 8))).logits.shape == (2, 8, 50)


def test_seeded_batches_are_fixed_windows_and_their_next_bytes() -> None:
    corpus = load_stdlib_corpus(val_every=10, max_bytes=50_000)
    batches = corpus.seeded_batches(3, 4, 16)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 16)] * 3
    g = torch.Generator().manual_seed(0)
    for x, y in batches:
        window = corpus.train_batch(4, 16, g)
        assert torch.equal(x, window[:, :-1]) and torch.equal(y, window[:, 1:])
    assert all(
        torch.equal(a, b) for (a, _), (b, _) in zip(batches, corpus.seeded_batches(3, 4, 16))
    )

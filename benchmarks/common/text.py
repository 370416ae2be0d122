"""Real text available offline, and a small byte-level causal transformer to model it.

The corpus is the Python standard library's own top-level modules (``*.py`` directly under
``sysconfig.get_paths()["stdlib"]``): English docstrings and comments mixed with code, on
every machine that runs Python, with nothing to download. The text depends on the Python
version, so :class:`TextCorpus` records the version, the file names and a SHA-256 of the bytes.

* :func:`stdlib_files` lists the files in a deterministic order (sorted by name);
  :func:`split_files` puts every ``val_every``-th file into validation (a split by file, so no
  validation file is seen in training);
* :class:`TextCorpus` holds the two byte streams (vocabulary: the 256 byte values);
  :meth:`TextCorpus.train_batch` draws random windows from a generator (the data order),
  :meth:`TextCorpus.val_windows` / :meth:`TextCorpus.probe_windows` are fixed sets;
* :class:`ByteTransformerLM`: token and position embeddings, pre-LayerNorm blocks of causal
  self-attention (written out, so that it is twice differentiable on every backend) and a GELU
  MLP, a final LayerNorm and a linear head; it maps ``[B, T]`` bytes to ``[B, T, 256]`` logits.
  Every parameter lives in a ``Linear``, ``Embedding`` or ``LayerNorm``, so per-example
  gradients (Tr(F)) need no ``vmap``;
* :data:`LANGUAGE_MODELS` / :func:`build_language_model`: the language models the scripts
  build by name (the byte transformer at its default size, a tiny Hugging Face GPT-2 from a
  config); :func:`token_cross_entropy` is the next-token loss over every position.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LANGUAGE_MODELS",
    "VOCAB_SIZE",
    "ByteTransformerLM",
    "TextCorpus",
    "build_language_model",
    "load_stdlib_corpus",
    "split_files",
    "stdlib_files",
    "tiny_gpt2",
    "token_cross_entropy",
]

#: Byte-level vocabulary.
VOCAB_SIZE = 256


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``*.py`` files directly under ``root`` (default: this Python's stdlib), by name."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.py files under {root}")
    return files


def split_files(files: Sequence[Path], val_every: int) -> tuple[list[Path], list[Path]]:
    """``(train, validation)``: file ``i`` (0-based) goes to validation when
    ``i % val_every == val_every - 1``.

    >>> names = [Path(f"{c}.py") for c in "abcdef"]
    >>> [[p.stem for p in part] for part in split_files(names, 3)]
    [['a', 'b', 'd', 'e'], ['c', 'f']]
    """
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an integer ≥ 2, got {val_every!r}")
    val = [f for i, f in enumerate(files) if i % val_every == val_every - 1]
    train = [f for i, f in enumerate(files) if i % val_every != val_every - 1]
    if not val:
        raise ValueError(f"{len(files)} files with val_every={val_every} leave no validation file")
    return train, val


def _read(files: Sequence[Path], max_bytes: int | None) -> Tensor:
    """The files' bytes, concatenated, cut at ``max_bytes``, as a uint8 tensor."""
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()


@dataclass
class TextCorpus:
    """Training and validation byte streams (uint8 tensors) and where they came from."""

    train: Tensor
    val: Tensor
    train_files: list[str]
    val_files: list[str]
    source: str

    def describe(self) -> dict[str, object]:
        """What the corpus is, for the results file (Python version, files, sizes, SHA-256)."""
        digest = hashlib.sha256()
        digest.update(self.train.numpy().tobytes())
        digest.update(self.val.numpy().tobytes())
        return {
            "source": self.source,
            "python": sys.version.split()[0],
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": len(self.train),
            "val_bytes": len(self.val),
            "sha256": digest.hexdigest(),
            "val_file_names": self.val_files,
        }

    def to(self, device: torch.device | str) -> TextCorpus:
        """The corpus with its byte streams on ``device`` (windows are then cut there; the
        random positions of :meth:`train_batch` are still drawn by its generator)."""
        return TextCorpus(
            self.train.to(device),
            self.val.to(device),
            self.train_files,
            self.val_files,
            self.source,
        )

    def _windows(self, stream: Tensor, starts: Tensor, length: int) -> Tensor:
        if starts.device != stream.device:  # positions drawn on the host: copied, no wait
            starts = starts.pin_memory().to(stream.device, non_blocking=True)
        return stream[starts.unsqueeze(1) + torch.arange(length, device=stream.device)].long()

    def train_batch(self, batch_size: int, context: int, generator: torch.Generator) -> Tensor:
        """``[batch_size, context + 1]`` windows at random training positions (inputs are
        ``[:, :-1]``, next-byte targets ``[:, 1:]``), on the streams' device; the generator
        fixes the data order (a CPU generator: the same batches on every device)."""
        high = len(self.train) - context
        if high < 1:
            raise ValueError(
                f"the training text ({len(self.train)} bytes) is shorter than a "
                f"window of {context + 1} bytes"
            )
        starts = torch.randint(high, (batch_size,), generator=generator)
        return self._windows(self.train, starts, context + 1)

    def seeded_batches(
        self, count: int, batch_size: int, context: int, seed: int = 0
    ) -> list[tuple[Tensor, Tensor]]:
        """``count`` batches ``(inputs, targets)`` of :meth:`train_batch` windows drawn by a
        generator seeded with ``seed``: ``[batch_size, context]`` byte ids and their next
        bytes (the same batches on every call)."""
        g = torch.Generator().manual_seed(seed)
        windows = [self.train_batch(batch_size, context, g) for _ in range(count)]
        return [(w[:, :-1], w[:, 1:]) for w in windows]

    def val_windows(self, count: int, context: int) -> Tensor:
        """``count`` windows of ``context + 1`` bytes evenly spaced over the validation text."""
        return self._fixed(self.val, count, context, "validation")

    def probe_windows(self, count: int, context: int) -> Tensor:
        """``count`` windows of ``context + 1`` bytes evenly spaced over the training text:
        the fixed probe set of Tr(F)."""
        return self._fixed(self.train, count, context, "training")

    def _fixed(self, stream: Tensor, count: int, context: int, name: str) -> Tensor:
        high = len(stream) - context - 1
        if high < 0:
            raise ValueError(
                f"the {name} text ({len(stream)} bytes) is shorter than a window "
                f"of {context + 1} bytes"
            )
        starts = torch.linspace(0, high, count).round().long()
        return self._windows(stream, starts, context + 1)


def load_stdlib_corpus(
    val_every: int = 10, max_bytes: int | None = None, root: str | Path | None = None
) -> TextCorpus:
    """The stdlib corpus, split by file (:func:`split_files`); each stream is cut at
    ``max_bytes`` (None: whole files)."""
    files = stdlib_files(root)
    train_files, val_files = split_files(files, val_every)
    base = files[0].parent
    return TextCorpus(
        train=_read(train_files, max_bytes),
        val=_read(val_files, max_bytes),
        train_files=[f.name for f in train_files],
        val_files=[f.name for f in val_files],
        source=str(base),
    )


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``h + attn(ln(h))``, then ``h + mlp(ln(h))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: Tensor, causal: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, d/heads]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~causal[:t, :t], float("-inf"))
        att = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(att)
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class ByteTransformerLM(nn.Module):
    """A small causal transformer over bytes: ``[B, T]`` byte ids → ``[B, T, 256]`` logits.

    >>> _ = torch.manual_seed(0)
    >>> lm = ByteTransformerLM(context=8, dim=16, layers=1, heads=2)
    >>> lm(torch.randint(256, (3, 8))).shape
    torch.Size([3, 8, 256])
    """

    def __init__(self, context: int = 64, dim: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        for name, value in (
            ("context", context),
            ("dim", dim),
            ("layers", layers),
            ("heads", heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.context = context
        self.tok = nn.Embedding(VOCAB_SIZE, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB_SIZE)
        causal = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)
        for m in self.modules():  # GPT-2's initialisation: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for block in self.blocks:
            h = block(h, self.causal)
        return self.head(self.ln(h))


def token_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over every position: ``[..., V]`` logits against ``[...]`` targets,
    flattened to ``[N, V]`` and ``[N]`` (``[B, C]`` logits of a classifier are unchanged).

    >>> logits = torch.zeros(2, 3, 4)
    >>> float(token_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long)))  # log 4
    1.3862943649291992
    """
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


def tiny_gpt2() -> nn.Module:
    """A tiny Hugging Face ``GPT2LMHeadModel`` from a config (random weights, no download):
    2 layers, width 32, 2 heads, vocabulary 50, 64 positions, no dropout. Needs
    ``transformers``."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


#: The language models built by name: :class:`ByteTransformerLM` at its default size
#: (context 64, width 128, 2 layers, 4 heads) and :func:`tiny_gpt2`.
LANGUAGE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "byte_transformer": ByteTransformerLM,
    "tiny_gpt2": tiny_gpt2,
}


def build_language_model(name: str) -> nn.Module:
    """Instantiate language model ``name`` (a key of :data:`LANGUAGE_MODELS`) at its
    initialisation from the global random state (seed it first for the same weights).

    >>> _ = torch.manual_seed(0)
    >>> type(build_language_model("byte_transformer")).__name__
    'ByteTransformerLM'
    """
    try:
        factory = LANGUAGE_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown language model {name!r}; valid names: {', '.join(LANGUAGE_MODELS)}"
        ) from None
    return factory()

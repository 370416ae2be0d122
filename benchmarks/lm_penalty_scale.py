"""How the Fisher penalty's scale follows the sequence length (docs/guides/language-models.md).

A tiny GPT-2 from a config (random weights, no download), batches of B = 4 random token
sequences of length T = 8, 16, 32, 64 (no padding). For each T: the mean and standard error,
over batches and label draws, of ``Tr(F_B)`` (``penalty_scale="batch"``, the paper's) and of
``N · Tr(F_B)`` (``penalty_scale="per_row"``), with N = B · (T − 1) target rows (the last
position of each sequence has no next token).

    python benchmarks/lm_penalty_scale.py [--draws 50]

``--device`` measures there, ``--amp`` computes the penalty under ``torch.autocast`` (as a
training step under autocast computes it with :func:`fisher_optim.fisher_penalty`), and
``--pack N`` measures N lengths at once, one process each; ``--compile`` is refused (the
penalty needs double backward).
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.harness import resolve_device  # noqa: E402
from benchmarks.common.runner import COMPLETE, Job, Precision, sweep  # noqa: E402
from fisher_optim.cli import integer, option, parser, positive_int  # noqa: E402


@dataclass
class ScaleOptions:
    """What ``benchmarks/lm_penalty_scale.py`` measures."""

    draws: int = option(
        50,
        "batches per sequence length T, each with one label draw; at "
        "least 2 (the standard error needs two)",
        type=integer(2),
        metavar="N",
    )
    batch: int = option(4, "sequences per batch", type=positive_int, metavar="B")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every value is range-checked (a bad one is an argparse error)."""
    p = parser("benchmarks/lm_penalty_scale.py", __doc__.splitlines()[0], ScaleOptions)
    add_shared_options(p, refused=REFUSED, defaults={"device": "cpu"})
    return p


#: ``--compile``: the penalty is a gradient norm, differentiated again by a training step.
REFUSED = {
    "compile": "the Fisher penalty is a squared gradient norm that a training step "
    "differentiates again (double backward), which torch.compile does not support; the "
    "optimizers compute it on the eager model",
}
#: The sequence lengths T.
LENGTHS = (8, 16, 32, 64)


def tiny_gpt2() -> Any:
    """The tiny GPT-2 at its seeded random initialisation (no download)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
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


def measure_length(seq: int, args: argparse.Namespace, deadline: float | None = None) -> dict:
    """The table line of sequence length ``seq``: mean and standard error of ``Tr(F_B)`` over
    ``--draws`` batches (as a :class:`~benchmarks.common.runner.Job` of a sweep returns it).
    The batches are those of one generator drawn through the lengths in order, so a length
    measured alone (``--pack``) sees the same batches."""
    from fisher_optim import fisher_penalty

    device = resolve_device(args.device)
    model = tiny_gpt2().to(device)
    precision = Precision(args.amp, device)
    data = torch.Generator().manual_seed(1)
    for earlier in LENGTHS[: LENGTHS.index(seq)]:
        for _ in range(args.draws):
            torch.randint(50, (args.batch, earlier), generator=data)
    values = []
    for i in range(args.draws):
        ids = torch.randint(50, (args.batch, seq), generator=data).to(device)
        gen = torch.Generator(device).manual_seed(i)
        with precision.autocast():
            values.append(float(fisher_penalty(model, ids, generator=gen).detach()))
    n = args.batch * (seq - 1)
    mean = sum(values) / len(values)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    line = f"{seq:>4} {n:>5} {mean:>12.4f} ± {se:<7.4f} {n * mean:>14.2f} ± {n * se:<7.2f}"
    return {"status": COMPLETE, "line": line}


def main(argv: list[str] | None = None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if resolve_device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    precision = f", the penalty under amp {args.amp}" if args.amp else ""
    print(
        f"tiny GPT-2 (2 layers, width 32, vocabulary 50), B = {args.batch}, "
        f"{args.draws} batches per T{precision}"
    )
    print(f"{'T':>4} {'N':>5} {'Tr(F_B) (batch)':>22} {'N·Tr(F_B) (per_row)':>24}")
    results, _ = sweep([Job(measure_length, seq, args) for seq in LENGTHS], pack=args.pack)
    lines = [r["line"] for r in results]
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()

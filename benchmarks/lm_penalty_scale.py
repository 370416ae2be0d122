"""How the Fisher penalty's scale follows the sequence length (docs/guides/language-models.md).

A tiny GPT-2 from a config (random weights, no download), batches of B = 4 random token
sequences of length T = 8, 16, 32, 64 (no padding). For each T: the mean and standard error,
over batches and label draws, of ``Tr(F_B)`` (``penalty_scale="batch"``, the paper's) and of
``N · Tr(F_B)`` (``penalty_scale="per_row"``), with N = B · (T − 1) target rows (the last
position of each sequence has no next token).

    python benchmarks/lm_penalty_scale.py [--draws 50]
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisher_optim.cli import integer, option, parser, positive_int  # noqa: E402  # noqa: E402


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
    return parser("benchmarks/lm_penalty_scale.py", __doc__.splitlines()[0], ScaleOptions)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    import transformers

    from fisher_optim import fisher_penalty

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
    model = transformers.GPT2LMHeadModel(config)
    print(
        f"tiny GPT-2 (2 layers, width 32, vocabulary 50), B = {args.batch}, "
        f"{args.draws} batches per T"
    )
    print(f"{'T':>4} {'N':>5} {'Tr(F_B) (batch)':>22} {'N·Tr(F_B) (per_row)':>24}")
    data = torch.Generator().manual_seed(1)
    for seq in (8, 16, 32, 64):
        values = []
        for i in range(args.draws):
            ids = torch.randint(50, (args.batch, seq), generator=data)
            gen = torch.Generator().manual_seed(i)
            values.append(float(fisher_penalty(model, ids, generator=gen).detach()))
        n = args.batch * (seq - 1)
        mean = sum(values) / len(values)
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        print(f"{seq:>4} {n:>5} {mean:>12.4f} ± {se:<7.4f} {n * mean:>14.2f} ± {n * se:<7.2f}")


if __name__ == "__main__":
    main()

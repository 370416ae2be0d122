"""How the finite-difference penalty gradient agrees with the exact one, against the step r.

For each network, dtype and seed (fresh initialisation and batch), computes the exact
``∇ Tr(F_B)`` (double backprop) and the forward difference at ``r = c · max(1, ||θ||)`` for
each relative step ``c``, with the same sampled labels, and prints the median and minimum
cosine over seeds as a Markdown table (the default step is marked).

    python benchmarks/fd_step.py --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisher_optim import penalty_gradient  # noqa: E402
from fisher_optim.engines import DEFAULT_FD_STEP  # noqa: E402

STEPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def smooth_cnn() -> nn.Module:
    """Tanh/GELU, BatchNorm, average pooling: a loss that is smooth in θ."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def relu_cnn() -> nn.Module:
    """ReLU and max pooling (SimpleCNN's layers at 16x16): piecewise-smooth loss."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


NETWORKS = {"smooth_cnn": smooth_cnn, "relu_cnn": relu_cnn}


def cosines(net: str, dtype: torch.dtype, seed: int, batch: int) -> dict[float, float]:
    torch.manual_seed(seed)
    model = NETWORKS[net]().to(dtype)
    x = torch.randn(batch, 3, 16, 16, dtype=dtype)
    theta = float(torch.cat([p.detach().flatten() for p in model.parameters()]).double().norm())

    def flat(mode: str, step: float | None = None) -> torch.Tensor:
        grads = penalty_gradient(
            model, x, mode=mode, fd_step=step, generator=torch.Generator().manual_seed(seed)
        )
        return torch.cat([g.flatten() for g in grads]).double()

    exact = flat("exact")
    return {
        c: F.cosine_similarity(exact, flat("finite_difference", c * max(1.0, theta)), dim=0).item()
        for c in STEPS
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    header = "| network | dtype | " + " | ".join(f"{c:g}" for c in STEPS) + " |"
    lines = [
        f"Cosine between the two modes, median (min) over {args.seeds} seeds, batch "
        f"{args.batch_size}; columns: relative step c, r = c·max(1, ‖θ‖); **bold** = default.",
        "",
        header,
        "|" + "---|" * (len(STEPS) + 2),
    ]
    for net in NETWORKS:
        for dtype in (torch.float32, torch.float64):
            runs = [cosines(net, dtype, s, args.batch_size) for s in range(args.seeds)]
            cells = []
            for c in STEPS:
                values = [r[c] for r in runs]
                cell = f"{statistics.median(values):.4f} ({min(values):.4f})"
                cells.append(f"**{cell}**" if c == DEFAULT_FD_STEP[dtype] else cell)
            lines.append(f"| {net} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""How far the finite-difference penalty gradient is from the exact one, against the step.

For each network, parameter dtype and seed (fresh initialisation and batch) the reference is
the exact ``∇ Tr(F_B) = 2 H g`` by double backprop **in float64** (same model, same sampled
labels). The finite difference (forward: 2 gradients, central: 3 gradients) is computed in
the given dtype at ``r = c · max(1, ||θ||)`` for each relative step ``c``. The library
refuses bfloat16 parameters in finite-difference mode; this script measures them anyway (the
engine is let through for the measurement) to show why. Printed as two
Markdown tables, median (worst) over the seeds: the relative L2 error
``||fd − exact|| / ||exact||`` and the cosine between the two. The library's default scheme
and step are marked in bold.

    taskset -c 1 python benchmarks/fd_step.py --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisher_optim._cli import HelpFormatter, open_fraction, positive_int  # noqa: E402
from fisher_optim._logits import sample_labels  # noqa: E402
from fisher_optim.engines import (  # noqa: E402
    DEFAULT_FD_SCHEME,
    DEFAULT_FD_STEP,
    FD_SCHEMES,
    exact_penalty_gradient,
    finite_difference_penalty_gradient,
)
from fisher_optim.penalty import Batch, PenaltyObjective  # noqa: E402

STEPS = (3e-2, 1e-2, 1e-3, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7, 1e-8)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def smooth_mlp() -> nn.Module:
    """Tanh and GELU: a loss that is smooth in θ."""
    return nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)
    )


def relu_mlp() -> nn.Module:
    """ReLU: a piecewise-smooth loss."""
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def smooth_cnn() -> nn.Module:
    """Tanh/GELU, BatchNorm (batch statistics), average pooling: smooth in θ."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def tiny_smooth_cnn() -> nn.Module:
    """The test suite's small CNN (8x8 inputs): conv-BN-tanh-avgpool-conv-GELU-linear."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3), nn.GELU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5),
    )


def relu_cnn() -> nn.Module:
    """ReLU and max pooling (SimpleCNN's layers at 16x16): piecewise smooth."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


#: name -> (model factory, input shape of one example)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "smooth_mlp": (smooth_mlp, (32,)),
    "relu_mlp": (relu_mlp, (32,)),
    "smooth_cnn": (smooth_cnn, (3, 16, 16)),
    "tiny_smooth_cnn": (tiny_smooth_cnn, (3, 8, 8)),
    "relu_cnn": (relu_cnn, (3, 16, 16)),
}


def flat(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten().double()
            for g, p in zip(grads, params)
        ]
    )


def measure(
    net: str, dtype: torch.dtype, seed: int, batch: int, steps: list[float], schemes: list[str]
) -> dict[tuple[str, float], tuple[float, float]]:
    """``{(scheme, c): (relative L2 error, cosine)}`` against the float64 exact gradient."""
    make, shape = NETWORKS[net]
    torch.manual_seed(seed)
    ref_model = make().double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    with torch.no_grad():
        labels = sample_labels(ref_model(x), generator=torch.Generator().manual_seed(seed))

    def objective(model: nn.Module, inputs: torch.Tensor) -> PenaltyObjective:
        obj = PenaltyObjective(model, Batch((inputs,)))
        obj.labels = labels  # the same labels in every dtype and pass
        return obj

    reference = exact_penalty_gradient(objective(ref_model, x))
    exact = flat(reference.grads, list(ref_model.parameters()))
    model = copy.deepcopy(ref_model).to(dtype)
    params = list(model.parameters())
    theta = float(torch.cat([p.detach().double().flatten() for p in params]).norm())
    out = {}
    for scheme in schemes:
        for c in steps:
            with let_through(dtype):
                result = finite_difference_penalty_gradient(
                    objective(model, x.to(dtype)), c * max(1.0, theta), scheme
                )
            fd = flat(result.grads, params)
            err = float((fd - exact).norm() / exact.norm())
            cos = float(F.cosine_similarity(fd, exact, dim=0))
            out[scheme, c] = (err if math.isfinite(err) else math.inf, cos)
    return out


@contextlib.contextmanager
def let_through(dtype: torch.dtype) -> Iterator[None]:
    """Let the engine run on ``dtype`` parameters although the library refuses them."""
    refused = dtype not in DEFAULT_FD_STEP
    if refused:
        DEFAULT_FD_STEP[dtype] = math.nan  # only the key is checked: the step is explicit
    try:
        yield
    finally:
        if refused:
            del DEFAULT_FD_STEP[dtype]


def table(
    title: str,
    rows: dict[tuple[str, str, str], dict[float, list[float]]],
    steps: list[float],
    worst: Callable[[list[float]], float],
    fmt: str,
) -> list[str]:
    lines = [
        title,
        "",
        "| network | dtype | scheme | " + " | ".join(f"{c:g}" for c in steps) + " |",
        "|" + "---|" * (len(steps) + 3),
    ]
    for (net, dname, scheme), cells in rows.items():
        texts = []
        for c in steps:
            v = cells[c]
            text = f"{statistics.median(v):{fmt}} ({worst(v):{fmt}})"
            dtype = DTYPES[dname]
            default = (
                scheme == DEFAULT_FD_SCHEME.get(dtype) and c == DEFAULT_FD_STEP.get(dtype)
            )
            texts.append(f"**{text}**" if default else text)
        lines.append(f"| {net} | {dname} | {scheme} | " + " | ".join(texts) + " |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command line; every value is range-checked (a bad one is an argparse error)."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/fd_step.py",
        description=__doc__.split("\n\n")[0] + " Prints relative error and cosine tables.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=5,
        help="number of seeds (fresh initialisation, batch and labels each); the tables show "
        "the median and the worst over them",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="examples per batch")
    parser.add_argument(
        "--steps", type=open_fraction, nargs="+", default=list(STEPS), metavar="C",
        help="relative steps c, each in (0, 1); the step is r = c * max(1, ||θ||)",
    )
    parser.add_argument(
        "--schemes", nargs="+", choices=FD_SCHEMES, default=list(FD_SCHEMES),
        help="difference schemes: forward (2 gradients), central and guarded (3 gradients)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
        help="parameter dtypes of the finite difference; the reference is always the float64 "
        "exact gradient",
    )
    parser.add_argument(
        "--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
        help="smooth (tanh/GELU, average pooling) and ReLU/max-pool MLPs and CNNs",
    )
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch intra-op threads")
    parser.add_argument(
        "--output", type=Path, default=None, metavar="FILE",
        help="also write the tables (Markdown) to FILE (default: print only)",
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    errors: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    cosines: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for net in args.networks:
        for dname in args.dtypes:
            runs = [
                measure(net, DTYPES[dname], s, args.batch_size, args.steps, args.schemes)
                for s in range(args.seeds)
            ]
            for scheme in args.schemes:
                key = (net, dname, scheme)
                errors[key] = {c: [r[scheme, c][0] for r in runs] for c in args.steps}
                cosines[key] = {c: [r[scheme, c][1] for r in runs] for c in args.steps}
    setting = (
        f"median (worst) over {args.seeds} seeds, batch {args.batch_size}; columns: relative "
        "step c, r = c·max(1, ‖θ‖); **bold** = the library's default scheme and step."
    )
    lines = [
        *table(f"Relative L2 error against the float64 exact gradient, {setting}",
               errors, args.steps, max, ".2e"),
        "",
        *table(f"Cosine to the float64 exact gradient, {setting}",
               cosines, args.steps, min, ".4f"),
    ]
    command = " ".join(["python benchmarks/fd_step.py", *(sys.argv[1:] if argv is None else argv)])
    lines += [
        "",
        f"Produced by `{command}` (CPU, torch {torch.__version__}, {args.threads} thread(s), "
        f"{time.perf_counter() - start:.0f} s).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()

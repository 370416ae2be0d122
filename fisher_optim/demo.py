"""A one-minute demo: plain SGD versus FisherPenaltySGD on scikit-learn's handwritten digits.

Run ``python -m fisher_optim.demo`` (needs scikit-learn: ``pip install "fisher-optim[demo]"``).

Runs of the same MLP from the same initialisation, on the same mini-batches:

* SGD at a large learning rate (the reference),
* SGD at a 10x smaller learning rate,
* :class:`~fisher_optim.FisherPenaltySGD` at that small learning rate (penalty ``"fisher"``),
  once for each penalty weight α.

After every epoch it measures Tr(F), the trace of the Fisher information matrix, with
:func:`fisher_optim.curvature.fisher_trace` on a fixed probe set of training examples (exact
expectation over the model's labels). The FP paper (Jastrzebski et al., ICML 2021) reports
that a small learning rate lets Tr(F) grow large early in training ("catastrophic Fisher
explosion") and that the penalty keeps it lower. The demo prints what it measures on this
small, easy data set; it does not assert any outcome. Every number can be changed on the
command line (``--help``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisher_optim.cli import (
    from_args,
    integer,
    momentum,
    open_fraction,
    option,
    parser,
    positive_float,
    positive_int,
)
from fisher_optim.fisher_penalty_sgd import FisherPenaltySGD


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Result:
    name: str
    test_accuracy: float
    final_trace: float
    peak_trace: float
    peak_epoch: int
    seconds: float


def load_digits_split(test_fraction: float, seed: int) -> Split:
    """The 1,797 8x8 digits bundled with scikit-learn, standardised, split into train/test."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            'the demo needs scikit-learn: pip install "fisher-optim[demo]" '
            "(or pip install scikit-learn)"
        ) from e
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3  # train statistics only
    return Split((x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te))


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train(
    name: str, data: Split, probe: Tensor, args: DemoOptions, *, lr: float, alpha: float
) -> Result:
    """Train one model; measure Tr(F) on ``probe`` after every epoch."""
    from fisher_optim import curvature  # imported here so that ``--help`` stays light

    torch.manual_seed(args.seed)  # same initialisation for every run
    model = make_model(args.width)
    if alpha > 0:
        opt: torch.optim.Optimizer = FisherPenaltySGD(
            model, lr=lr, momentum=args.momentum, alpha=alpha, every=args.every, seed=args.seed
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    order = torch.Generator().manual_seed(args.seed)  # same mini-batches for every run
    n = len(data.x_train)
    traces: list[float] = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        traces.append(curvature.fisher_trace(model, probe, labels="exact"))
        if epoch == 1 or epoch % args.print_every == 0 or epoch == args.epochs:
            extra = ""
            if isinstance(opt, FisherPenaltySGD) and opt.penalty_value is not None:
                extra = f"  Tr(F_B) penalty {opt.penalty_value:8.4f}"
            print(
                f"  [{name}] epoch {epoch:3d}  train loss {total / n:.4f}  "
                f"test acc {accuracy(model, data.x_test, data.y_test):.4f}  "
                f"Tr(F) {traces[-1]:8.3f}{extra}",
                flush=True,
            )
    peak = max(range(len(traces)), key=traces.__getitem__)
    return Result(
        name=name,
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        final_trace=traces[-1],
        peak_trace=traces[peak],
        peak_epoch=peak + 1,
        seconds=time.perf_counter() - start,
    )


@dataclass
class DemoOptions:
    """The demo's command line: every value is checked by its type (an invalid one is an
    argparse error, never a traceback or a run that silently does something else)."""

    lr: float = option(
        0.01,
        "the small learning rate, shared by the small-LR SGD run and the FP runs",
        type=positive_float,
    )
    large_lr: float = option(0.05, "learning rate of the reference SGD run", type=positive_float)
    alpha: list[float] = option(
        [0.1, 0.3], "Fisher penalty weights α > 0, one FP run each", type=positive_float, nargs="+"
    )
    every: int = option(
        1,
        "penalty refresh period in steps (1: cheap for this small MLP; the paper uses 10 on "
        "CIFAR, where a stale penalty gradient with α ≥ 0.3 can diverge here)",
        type=positive_int,
        metavar="N",
    )
    epochs: int = option(30, "training epochs of each run", type=positive_int)
    batch_size: int = option(32, "mini-batch size", type=positive_int)
    momentum: float = option(0.9, "SGD momentum, in [0, 1)", type=momentum)
    width: int = option(128, "hidden units per layer", type=positive_int)
    probe: int = option(
        256,
        "Tr(F) is measured on the first N training examples (all of them when N exceeds the "
        "training set)",
        type=positive_int,
        metavar="N",
    )
    test_fraction: float = option(
        0.3, "fraction of the 1,797 digits held out for testing, in (0, 1)", type=open_fraction
    )
    seed: int = option(
        0,
        "seed of the initialisation, the mini-batch order and the split",
        type=integer(0, 2**32 - 1),
    )
    threads: int = option(1, "torch CPU threads", type=positive_int, metavar="N")
    print_every: int = option(
        5,
        "print progress every N epochs (and after the first and last)",
        type=positive_int,
        metavar="N",
    )


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line: the fields of :class:`DemoOptions`."""
    return parser(
        "python -m fisher_optim.demo",
        "Plain SGD vs FisherPenaltySGD on sklearn's digits; prints accuracy and Tr(F).",
        DemoOptions,
    )


def parse_args(argv: list[str] | None = None) -> DemoOptions:
    return from_args(DemoOptions, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split(args.test_fraction, args.seed)
    probe = data.x_train[: args.probe]
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test examples; MLP 64-"
        f"{args.width}-{args.width}-10; batch {args.batch_size}, momentum {args.momentum}, "
        f"{args.epochs} epochs; Tr(F) on {len(probe)} training examples (exact labels)",
        flush=True,
    )
    runs = [
        (f"SGD lr={args.large_lr:g}", args.large_lr, 0.0),
        (f"SGD lr={args.lr:g}", args.lr, 0.0),
    ]
    runs += [(f"FP  lr={args.lr:g} alpha={a:g} every={args.every}", args.lr, a) for a in args.alpha]
    results = [train(name, data, probe, args, lr=lr, alpha=alpha) for name, lr, alpha in runs]
    width = max(len(r.name) for r in results)
    print()
    print(f"{'run':<{width}}  test acc  final Tr(F)  peak Tr(F) (epoch)  seconds")
    for r in results:
        print(
            f"{r.name:<{width}}  {r.test_accuracy:8.4f}  {r.final_trace:11.3f}  "
            f"{r.peak_trace:10.3f} ({r.peak_epoch:3d})  {r.seconds:7.1f}"
        )
    return results


if __name__ == "__main__":
    main()

"""How far the finite-difference penalty gradient is from the exact one, on the networks
people train, at their real size.

For each network, at PyTorch's default initialisation (or ``--init``'s) and after
``--train-steps`` SGD steps, and for each of ``--batches`` batches of real data (CIFAR-10 images; stdlib text
for the transformer), the float32 finite difference ``∇ Tr(F_B)`` is compared with the
exact one (double backprop) on the same sampled labels: relative L2 error and cosine. The
differences compared (``r = c · max(1, ||θ||)``):

* ``old``: the former float32 default, the guarded central difference at ``c = 1e-5``
  *without* the activation pattern (its guard is kept below, verbatim in substance);
* ``central``: the central difference at the default ``c = 3e-5`` on the base point's
  activation pattern (what ``fd_scheme="auto"`` checks with, and uses when the forward
  difference is not trusted; the functional default);
* ``forward``: the forward difference at ``c = 3e-5`` on the pattern (two gradients,
  what ``"auto"`` uses between checks while it is trusted);
* ``central_1e-4``, ``forward_1e-4``, ``forward_1e-5``: the same at other steps.

The reference is the float32 exact gradient; on the first batch of each network the
float32 exact gradient is also compared with the float64 one (column ``exact32``), which
shows that it is a sound reference. Printed (and with ``--output`` written) as a
Markdown table: median and worst over the batches.

    python benchmarks/fd_step.py --data-root DATA --batches 10 --output fd.md

``--device`` measures there; ``--compile`` and ``--amp`` apply to the SGD steps before the
trained state (through ``torch.compile``, under ``torch.autocast``), the measurements stay
eager, in float32; ``--pack N`` measures N networks at once, one process each.
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.data import load_dataset  # noqa: E402
from benchmarks.common.harness import resolve_device  # noqa: E402
from benchmarks.common.models import INITS, build_model  # noqa: E402
from benchmarks.common.runner import COMPLETE, Job, Precision, sweep, train_step  # noqa: E402
from benchmarks.common.text import (  # noqa: E402
    build_language_model,
    load_stdlib_corpus,
    token_cross_entropy,
)
from fisher_optim.batch import Batch  # noqa: E402
from fisher_optim.cli import (  # noqa: E402
    option,
    parser,
    positive_int,  # noqa: E402
)
from fisher_optim.differentiation import (  # noqa: E402
    DEFAULT_FD_STEP,
    exact_penalty_gradient,
    finite_difference_penalty_gradient,
)
from fisher_optim.penalty import PenaltyObjective, squared_norm  # noqa: E402

#: network -> batch size (VGG-11 and DenseNet smaller: the exact reference is costly on a CPU)
NETWORKS = {
    "simplecnn": 64,
    "vgg11": 32,
    "resnet20": 64,
    "densenet40_12": 16,
    "moe_mlp": 64,
    "transformer": 16,
}
#: The transformer's window of bytes.
CONTEXT = 64
#: label -> (scheme, relative step c, replay the activation pattern)
DIFFERENCES = {
    "old": ("guarded", 1e-5, False),
    "central": ("central", DEFAULT_FD_STEP[torch.float32], True),
    "forward": ("forward", DEFAULT_FD_STEP[torch.float32], True),
    "central_1e-4": ("central", 1e-4, True),
    "forward_1e-4": ("forward", 1e-4, True),
    "forward_1e-5": ("forward", 1e-5, True),
}


def flat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t).flatten().double()
            for t, p in zip(tensors, like)
        ]
    )


def old_guarded(objective: PenaltyObjective, step: float) -> list[Tensor | None]:
    """The former default: central difference without the activation pattern; where its
    two one-sided halves disagree by more than 10%, twice the half of smaller norm."""
    params = objective.params
    at = list(torch.autograd.grad(objective.loss(), params, allow_unused=True))
    norm = squared_norm(at).sqrt()
    rng = torch.get_rng_state()

    def shifted(sign: float) -> list[Tensor]:
        torch.set_rng_state(rng)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, at):
                p.add_(g, alpha=sign * step / float(norm))
        try:
            return list(torch.autograd.grad(objective.loss(), params))
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    ahead, behind = shifted(1.0), shifted(-1.0)
    plus = [a - g for a, g in zip(ahead, at)]
    minus = [g - b for g, b in zip(at, behind)]
    n_plus, n_minus = squared_norm(plus).sqrt(), squared_norm(minus).sqrt()
    gap = squared_norm([p - m for p, m in zip(plus, minus)]).sqrt()
    factor = float(norm) / step
    if gap <= 0.1 * min(n_plus, n_minus):
        return [(p + m) * factor for p, m in zip(plus, minus)]
    side = plus if n_plus <= n_minus else minus
    return [2 * s * factor for s in side]


def network_batches(
    net: str, args: argparse.Namespace
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Network ``net``'s ``--batches`` measurement inputs and ``--train-steps`` training
    batches: disjoint batches of CIFAR-10 in a seeded order, or windows of the stdlib text
    for the transformer."""
    count, size = args.batches + args.train_steps, NETWORKS[net]
    if net == "transformer":
        corpus = load_stdlib_corpus(max_bytes=2_000_000)
        batches = corpus.seeded_batches(count, size, CONTEXT)
    else:
        train, _ = load_dataset("cifar10", args.data_root)
        batches = train.seeded_batches(count, size)
    return [x for x, _ in batches[: args.batches]], batches[args.batches :]


def make_network(name: str, init: str = "torch") -> nn.Module:
    """Network ``name`` of :data:`NETWORKS` at the initialisation ``init`` of its conv and
    linear layers (seed 0; the transformer's own)."""
    torch.manual_seed(0)
    if name == "transformer":
        return build_language_model("byte_transformer")
    return build_model(name, 10, init=init)


def train(
    model: nn.Module,
    data: list[tuple[Tensor, Tensor]],
    compile: bool = False,
    amp: str | None = None,
) -> None:
    """SGD (lr 0.01, momentum 0.9) on the batches ``data``, a :func:`~benchmarks.common.
    runner.train_step` each: the forward through ``torch.compile(model)`` with ``compile``,
    under ``torch.autocast`` with ``amp`` (the measurements stay eager, in float32)."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile else model
    precision = Precision(amp, device)
    for x, y in data:
        train_step(forward, opt, precision, x.to(device), y.to(device), token_cross_entropy)


def measure(
    model: nn.Module, x: Tensor, seed: int, with_float64: bool, differences: list[str]
) -> dict[str, tuple[float, float]]:
    """``{difference: (relative L2 error, cosine)}`` against the exact gradient."""
    params = [p for p in model.parameters() if p.requires_grad]

    def objective(m: nn.Module = model, inputs: Tensor = x) -> PenaltyObjective:
        labels = torch.Generator(inputs.device).manual_seed(seed)
        return PenaltyObjective(m, Batch((inputs,)), generator=labels)

    base = objective()
    exact = flat(exact_penalty_gradient(base).grads, params)
    labels = base.labels

    def frozen(m: nn.Module = model, inputs: Tensor = x) -> PenaltyObjective:
        o = objective(m, inputs)
        o.labels = labels
        return o

    theta = float(torch.cat([p.detach().double().flatten() for p in params]).norm())
    out: dict[str, tuple[float, float]] = {}

    def score(got: Tensor) -> tuple[float, float]:
        err = float((got - exact).norm() / exact.norm())
        return err, float(F.cosine_similarity(got, exact, dim=0))

    if with_float64:
        wide = copy.deepcopy(model).double()
        ref = frozen(wide, x.double() if x.is_floating_point() else x)
        exact64 = flat(exact_penalty_gradient(ref).grads, list(wide.parameters()))
        out["exact32"] = (float((exact - exact64).norm() / exact64.norm()), 1.0)
    for label in differences:
        scheme, c, replay = DIFFERENCES[label]
        r = c * max(1.0, theta)
        if scheme == "guarded":
            grads = old_guarded(frozen(), r)
        else:
            grads = finite_difference_penalty_gradient(frozen(), r, scheme, replay=replay).grads
        out[label] = score(flat(grads, params))
    return out


@dataclass
class FdStepOptions:
    """What ``benchmarks/fd_step.py`` measures."""

    data_root: str | None = option(None, "where CIFAR-10 is (default: the library's data root)")
    networks: list[str] = option(
        list(NETWORKS), "networks to measure", nargs="+", choices=list(NETWORKS)
    )
    differences: list[str] = option(
        list(DIFFERENCES),
        "the differences to compare (the cosine column is the first's)",
        nargs="+",
        choices=list(DIFFERENCES),
    )
    batches: int = option(
        10, "measurement batches per network and state (init, trained)", type=positive_int
    )
    train_steps: int = option(
        30, "SGD steps (lr 0.01, momentum 0.9) before the trained state", type=positive_int
    )
    init: str = option(
        "torch",
        "initialisation of the image networks' conv and linear layers "
        "(benchmarks/common/models.py; the training scripts' default is kaiming)",
        choices=list(INITS),
    )
    threads: int = option(1, "torch intra-op threads", type=positive_int)
    output: Path | None = option(
        None,
        "also write the table (Markdown) to FILE (default: print only)",
        type=Path,
        metavar="FILE",
    )


def build_parser() -> argparse.ArgumentParser:
    p = parser("benchmarks/fd_step.py", __doc__.split("\n\n")[0], FdStepOptions)
    add_shared_options(p, defaults={"device": "cpu"})  # (its batches are made on the host)
    return p


def _cell(values: list[float], worst: Callable[[list[float]], float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({worst(values):{fmt}})"


def measure_network(
    net: str, args: argparse.Namespace, deadline: float | None = None
) -> dict[str, Any]:
    """The table rows of network ``net`` (init, trained), as a :class:`~benchmarks.common.
    runner.Job` of a sweep returns them (no deadline: a network is measured to the end)."""
    device = resolve_device(args.device)
    labels, size = args.differences, NETWORKS[net]
    xs, steps = network_batches(net, args)
    xs = [x.to(device) for x in xs]
    model = make_network(net, args.init).to(device).train()
    rows = []
    for state in ("init", "trained"):
        if state == "trained":
            train(model, steps, args.compile, args.amp)
        runs = [
            measure(model, x, i, i == 0 and state == "init", args.differences)
            for i, x in enumerate(xs)
        ]
        errors = [_cell([r[k][0] for r in runs], max, ".2e") for k in labels]
        cos = _cell([r[labels[0]][1] for r in runs], min, ".5f")
        ref = f"{runs[0]['exact32'][0]:.1e}" if "exact32" in runs[0] else ""
        rows.append(
            f"| {net} | {state} | {len(xs)} × {size} | "
            + " | ".join(errors)
            + f" | {cos} | {ref} |"
        )
        print(rows[-1], flush=True)
    return {"status": COMPLETE, "rows": rows}


def main(argv: list[str] | None = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    labels = args.differences
    lines = [
        "Relative L2 error of the float32 finite difference against the exact penalty "
        "gradient on the same labels, median (worst) over the batches; `exact32`: float32 "
        "exact against float64 exact (first batch).",
        "",
        "| network | state | batches × size | "
        + " | ".join(labels)
        + f" | cosine, {labels[0]} (worst) | exact32 |",
        "|" + "---|" * (len(labels) + 5),
    ]
    jobs = [Job(measure_network, net, args) for net in args.networks]
    results, _ = sweep(jobs, pack=args.pack)
    lines += [row for result in results for row in result["rows"]]
    command = " ".join(["python benchmarks/fd_step.py", *(sys.argv[1:] if argv is None else argv)])
    training = ", trained through torch.compile" if args.compile else ""
    training += f", trained under amp {args.amp}" if args.amp else ""
    lines += [
        "",
        f"Produced by `{command}` ({device}{training}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()

"""Step-time overhead of FisherPenaltySGD over plain SGD, measured side by side.

For each model (CIFAR shape, batch 128) every variant trains its own copy of the same
initial model on the same stream of distinct batches, a new one every step; variants are
timed in interleaved rounds (one window of ``--window`` steps per variant per round, after a
warm-up), CUDA-synchronised, and the median over rounds is reported as ms/step and as a
ratio to plain ``torch.optim.SGD``, with the range of the per-round ratios.

    python benchmarks/overhead.py --device cpu --models simplecnn vgg11 --json overhead.json

``--compile`` times every variant's training forward through ``torch.compile`` and ``--amp``
under ``torch.autocast`` (the penalty is the optimizer's own pass: the finite difference
through the compiled module in float32, the exact mode on the eager one under the training
forward's autocast);
``--pack`` is refused (a timing runs alone).

Cost model (forward = 1, backward = 2, so one SGD step = 3): a refresh adds about 9 in exact
mode, 6 with the forward difference and 9 with the central one; the float32 default
(``fd_scheme="auto"``) takes one central refresh in ten where the forward difference is
trusted (6.3 on average), else central ones. The floors at every=10 are 1.30x (exact),
1.20x (forward), 1.21x (auto, trusted) and 1.30x (central); at every=1, 4.0x / 3.0x / 3.1x /
4.0x.
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.data import load_dataset  # noqa: E402
from benchmarks.common.harness import resolve_device  # noqa: E402
from benchmarks.common.models import MODELS, build_model  # noqa: E402
from benchmarks.common.runner import Precision, RunningOptions, train_step  # noqa: E402
from benchmarks.common.timing import (  # noqa: E402
    PACK_REFUSED,
    TimingOptions,
    interleaved_windows,
    medians,
    round_ratio_range,
)
from fisher_optim import FisherPenaltySGD  # noqa: E402
from fisher_optim.cli import (  # noqa: E402
    option,
    parser,
    positive_int,  # noqa: E402
)

#: name -> FisherPenaltySGD keyword arguments (None: plain SGD).
VARIANTS: dict[str, dict | None] = {
    "sgd": None,
    # the float32 default, fd_scheme="auto": central, forward while the central trusts it
    "fp_fd_k10": {"mode": "finite_difference", "every": 10},
    "fp_fd_forward_k10": {"mode": "finite_difference", "fd_scheme": "forward", "every": 10},
    "fp_fd_central_k10": {"mode": "finite_difference", "fd_scheme": "central", "every": 10},
    "fp_exact_k10": {"mode": "exact", "every": 10},
    # the spike safeguard off (the paper's FP exactly): what the safeguard costs
    "fp_fd_k10_noguard": {"mode": "finite_difference", "every": 10, "spike_factor": None},
    "fp_exact_k10_noguard": {"mode": "exact", "every": 10, "spike_factor": None},
    "fp_fd_k1": {"mode": "finite_difference", "every": 1},
    "fp_exact_k1": {"mode": "exact", "every": 1},
    "gp_exact_k10": {"mode": "exact", "every": 10, "penalty": "gradient"},
    "gpr_exact_k10": {"mode": "exact", "every": 10, "penalty": "random_label"},
    "gpx_exact_k10": {"mode": "exact", "every": 10, "penalty": "input_gradient"},
}
TARGETS = {"fp_fd_k10": 1.2, "fp_exact_k10": 1.35, "fp_fd_k1": 3.15, "fp_exact_k1": 4.2}
DEFAULT_MODELS = ("simplecnn", "vgg11", "wresnet44_3", "densenet40_12")


def make_step(
    model: torch.nn.Module,
    kwargs: dict | None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    compile: bool = False,
    amp: str | None = None,
) -> Callable[[], None]:
    """One training step of the standard loop (:func:`~benchmarks.common.runner.train_step`),
    for a fresh optimizer of this variant, on the next of ``batches`` (in turn, as an epoch
    would): the forward through ``torch.compile(model)`` with ``compile``, under
    ``torch.autocast`` with ``amp`` (the penalty is the optimizer's own pass: the finite
    difference through the compiled module, the exact mode on the eager one, see the
    integration guide)."""
    common = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    forward = torch.compile(model) if compile else model
    if kwargs is None:
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **common)
    else:  # on the module the loop calls (the compiled one: it sees its forwards)
        opt = FisherPenaltySGD(forward, alpha=0.01, **common, **kwargs)
    needs_targets = isinstance(opt, FisherPenaltySGD) and opt.penalty.needs_targets
    precision = Precision(amp, batches[0][0].device)
    stream = itertools.cycle(batches)

    def step() -> None:
        x, y = next(stream)
        before_step = (lambda: opt.set_targets(y)) if needs_targets else None
        train_step(forward, opt, precision, x, y, before_step=before_step)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(
    name: str,
    device: torch.device,
    batch: int,
    window: int,
    rounds: int,
    warmup: int,
    variants: list[str],
    clock: Callable[[], float] = time.perf_counter,
    data_root: str | None = None,
    compile: bool = False,
    amp: str | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each variant (plain SGD always included) on one model, in each
    interleaved round. Every variant trains on the same stream of distinct batches, one per
    step, as in an epoch: a batch seen again and again is soon fitted, its loss and Fisher
    near zero, which is not what a training step costs (the ``"auto"`` scheme, for one,
    then distrusts the forward difference)."""
    torch.manual_seed(0)
    base = build_model(name, 10).to(device)
    count = warmup + rounds * window
    if data_root is None:
        g = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(10, (batch,), generator=g))
            for _ in range(count)
        ]
    else:  # disjoint shuffled batches of CIFAR-10 training images (cycled past one epoch)
        train, _ = load_dataset("cifar10", data_root)
        batches = train.seeded_batches(min(count, len(train) // batch), batch)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    names = ["sgd", *(v for v in variants if v != "sgd")]
    steps = {v: make_step(copy.deepcopy(base), VARIANTS[v], batches, compile, amp) for v in names}
    return interleaved_windows(steps, window, rounds, warmup, lambda: sync(device), clock)


@dataclass
class OverheadOptions:
    """What ``benchmarks/overhead.py`` times."""

    models: list[str] = option(
        list(DEFAULT_MODELS),
        f"networks to time, of: {', '.join(sorted(MODELS))}",
        nargs="+",
        choices=sorted(MODELS),
        metavar="MODEL",
    )
    variants: list[str] | None = option(
        None,
        "what to time besides plain SGD, of: "
        f"{', '.join(v for v in VARIANTS if v != 'sgd')} (default: all)",
        nargs="+",
        choices=list(VARIANTS),
        metavar="VARIANT",
    )
    batch_size: int = option(
        128,
        "batch size of the CIFAR-shaped batches (random, or with "
        "--data-root shuffled CIFAR-10 training images; a new batch every step)",
        type=positive_int,
    )
    data_root: str | None = option(
        None,
        "take the batches from CIFAR-10 at this directory or "
        "archive, as the forward difference sees them in training "
        "(default: random batches)",
    )
    clock: str = option(
        "wall",
        "wall: perf_counter; process: this process's CPU time, which "
        "other jobs on a shared machine do not inflate (CPU only; meaningful "
        "with --threads 1)",
        choices=("wall", "process"),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every value is range-checked (a bad one is an argparse error)."""
    p = parser(
        "benchmarks/overhead.py",
        __doc__.split("\n\n")[0],
        OverheadOptions,
        TimingOptions,
        RunningOptions,
        only=OVERHEAD_OPTIONS,
    )
    add_shared_options(p, refused={"pack": PACK_REFUSED})
    return p


#: The options of this script besides the shared ones: the timing's and ``--threads``.
OVERHEAD_OPTIONS = (
    *(f.name for f in fields(OverheadOptions)),
    *(f.name for f in fields(TimingOptions)),
    "threads",
)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.variants is None:
        args.variants = list(VARIANTS)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    header = (
        f"{'model':<14}{'variant':<20}{'ms/step':>10}{'ratio':>8}{'round ratios':>16}{'target':>8}"
    )
    print(
        f"device={device} threads={torch.get_num_threads()} clock={args.clock} "
        f"compile={args.compile} amp={args.amp or 'float32'} "
        f"batch={args.batch_size} "
        f"window={args.window} rounds={args.rounds} torch={torch.__version__}"
    )
    print(header)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for name in args.models:
        windows = time_model(
            name,
            device,
            args.batch_size,
            args.window,
            args.rounds,
            args.warmup,
            args.variants,
            clock,
            args.data_root,
            args.compile,
            args.amp,
        )
        rows = {}
        times = medians(windows)
        for v, samples in windows.items():
            t = times[v]
            ratio = t / times["sgd"]
            low, high = round_ratio_range(samples, windows["sgd"])
            target = TARGETS.get(v)
            rows[v] = {
                "ms_per_step": 1e3 * t,
                "ratio": ratio,
                "round_ratio_range": [low, high],
                "target": target,
            }
            mark = "" if target is None else f"{target:>7.2f}{'' if ratio <= target else ' !'}"
            spread = f"{low:.2f} – {high:.2f}"
            print(f"{name:<14}{v:<20}{1e3 * t:>10.1f}{ratio:>8.2f}{spread:>16} {mark}")
        results[name] = rows
    if args.json:
        setup = {"device": str(device), "compile": args.compile, "amp": args.amp}
        args.json.write_text(json.dumps({**setup, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()

"""Training throughput of the benchmarks' loop against a bare hand-written loop.

Side by side in one process: the training step of ``benchmarks/common/harness.py`` (the one
every experiment script runs: the batch gathered and normalised from the resident uint8 data
set, the step's loss, hits and divergence check summed on the device) against a bare loop of
the same model, batch and optimizer written out by hand (gather, normalise, forward,
backward, SGD step, nothing else). Each trains its own copy of the same initial model on the
same batches; interleaved rounds of ``--window`` steps after a warm-up, the median window of
each (``benchmarks/common/timing.py``). Reports images/s and the ratio.

    python benchmarks/loop_speed.py --threads 1

With ``--compile`` both loops train through ``torch.compile(model)``, with ``--amp`` both
under ``torch.autocast`` (the harness's ``Precision``); ``--pack`` is refused (a timing runs
alone).
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    harness,  # noqa: E402
    runner,  # noqa: E402
)
from benchmarks.common.config import (
    RunSpec,  # noqa: E402
    add_shared_options,  # noqa: E402
)
from benchmarks.common.data import CIFAR10_MEAN, CIFAR10_STD, ImageDataset  # noqa: E402
from benchmarks.common.models import MODELS, build_model  # noqa: E402
from benchmarks.common.runner import RunningOptions  # noqa: E402
from benchmarks.common.timing import (  # noqa: E402
    PACK_REFUSED,
    TimingOptions,
    interleaved_windows,
    medians,
)
from fisher_optim.cli import (  # noqa: E402
    add_options,
    option,
    parser,
    positive_int,  # noqa: E402
)


@dataclass
class LoopOptions:
    """What ``benchmarks/loop_speed.py`` compares."""

    model: str = option("simplecnn", "the network", choices=sorted(MODELS), metavar="MODEL")
    batch_size: int = option(128, "mini-batch size", type=positive_int)
    images: int = option(
        2048, "training images of the synthetic CIFAR-shaped data set", type=positive_int
    )


def build_parser() -> argparse.ArgumentParser:
    p = parser("benchmarks/loop_speed.py", __doc__.split("\n\n")[0], LoopOptions, TimingOptions)
    add_options(p, RunningOptions, only=("threads",))
    add_shared_options(p, refused={"pack": PACK_REFUSED})
    return p


def _data(n: int, device: torch.device) -> harness.DataBundle:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    train = ImageDataset(images, torch.randint(10, (n,), generator=g), 10, name="synthetic")
    return harness.DataBundle(train, None, train).to(device)


def steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The two step functions (each draws the next batch of the same epoch order); each has
    the model it trains as its ``model``."""
    data = _data(args.images, device)
    spec = RunSpec(
        experiment="loop_speed",
        dataset="cifar10",
        model=args.model,
        method="baseline",
        lr=0.01,
        batch_size=args.batch_size,
        probe_size=8,
        amp=args.amp,
    )
    # the scripts' step, as they train
    run = harness._Run(spec, data, Path("."), device, compile=args.compile)
    torch.manual_seed(spec.seed)
    model = build_model(args.model, 10).to(device)
    model.load_state_dict(run.model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    forward = torch.compile(model) if args.compile else model
    precision = runner.Precision(args.amp, device)
    images, labels = data.train.images, data.train.labels
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
    n, bs = len(images), args.batch_size
    order = torch.randperm(n, device=device)
    position = {"harness": 0, "bare": 0}

    def batch(name: str) -> torch.Tensor:
        start = position[name] % (n // bs) * bs
        position[name] += 1
        return order[start : start + bs]

    def harness_step() -> None:
        run._step(batch("harness"))

    def bare_step() -> None:
        # written out by hand on purpose, not runner.train_step: the bare loop is the
        # reference the benchmarks' step is measured against
        idx = batch("bare")
        x = (images[idx].float().div_(255) - mean) / std
        with precision.autocast():
            loss = F.cross_entropy(forward(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(opt)

    harness_step.model, bare_step.model = run.model, model  # type: ignore[attr-defined]
    return {"harness": harness_step, "bare": bare_step}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.resolve_device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = medians(
        interleaved_windows(steps(args, device), args.window, args.rounds, args.warmup, sync)
    )
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "compile": args.compile,
        "amp": args.amp,
        "batch_size": args.batch_size,
        "window": args.window,
        "rounds": args.rounds,
        "images_per_s": {k: args.batch_size / t for k, t in times.items()},
        "harness_time_over_bare": times["harness"] / times["bare"],
    }
    print(
        f"{args.model}, batch {args.batch_size}, {device}, {result['threads']} thread(s)"
        + (", compiled" if args.compile else "")
        + (f", amp {args.amp}" if args.amp else "")
        + ": "
        + ", ".join(f"{k} {v:.0f} images/s" for k, v in result["images_per_s"].items())
        + f"; the harness's step takes {result['harness_time_over_bare']:.3f}x the bare "
        "loop's"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

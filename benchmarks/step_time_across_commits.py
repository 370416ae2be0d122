"""Step time of the optimizers at two checkouts of fisher_optim, side by side.

Times a training step of SimpleCNN on one batch of random CIFAR-sized inputs with
``FisherNoiseSGD`` (diagonal and full covariance) and ``FisherPenaltySGD`` (exact and finite
difference, refreshed at every step) once with the ``fisher_optim`` of ``--baseline`` (a
folder holding another checkout of this repository) and once with this checkout's. Each
measurement is a fresh process (one thread, the process's CPU time over ``--steps`` steps
after ``--warmup`` untimed ones); the two checkouts alternate within each of ``--repeats``
rounds, their order flipped every round. Reported: the median of each, and the median (and
range) of the rounds' ratios this checkout / baseline (below 1: faster now), each ratio taken
between two processes that ran back to back, so that a load that changes during the run
cancels in it.

    git worktree add BASELINE 5fb4978
    python benchmarks/step_time_across_commits.py --baseline BASELINE --repeats 5 --steps 20
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded from its file is not)
import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.timing import PACK_REFUSED  # noqa: E402
from fisher_optim.cli import nonnegative_int, option, parser, positive_int  # noqa: E402

#: variant -> the optimizer it builds (``model`` in scope), at the API both checkouts share.
VARIANTS = {
    "noise_diagonal": "FisherNoiseSGD(model, lr=0.01, small_batch_size=16, covariance='diagonal')",
    "noise_full": "FisherNoiseSGD(model, lr=0.01, small_batch_size=16, covariance='full')",
    "fp_exact": "FisherPenaltySGD(model, lr=0.01, alpha=0.01, every=1, mode='exact')",
    "fp_fd": "FisherPenaltySGD(model, lr=0.01, alpha=0.01, every=1, mode='finite_difference')",
}

#: The timed process, in the checkout's folder (its ``fisher_optim`` is imported), with the
#: model of this checkout's ``benchmarks/common/models.py`` (loaded by path).
WORKER = """
import json, sys, time
import torch
import torch.nn.functional as F
import importlib.util
import fisher_optim
from fisher_optim import FisherNoiseSGD, FisherPenaltySGD

variant, steps, warmup, batch = sys.argv[1], *map(int, sys.argv[2:5])
spec = importlib.util.spec_from_file_location("models", sys.argv[6])  # this checkout's models
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
torch.set_num_threads(1)
torch.manual_seed(0)
model = models.build_model("simplecnn")
opt = eval(sys.argv[5])
x, y = torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,))

def step():  # written out: the other checkout's benchmarks/common need not have train_step
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()

for _ in range(warmup):
    step()
start = time.process_time()
for _ in range(steps):
    step()
seconds = (time.process_time() - start) / steps
with torch.profiler.profile(with_flops=True) as prof:  # the work of one step, untimed
    step()
events = [e for e in prof.events() if e.name.startswith("aten::")]
work = {"gflop": sum(e.flops or 0 for e in events) / 1e9, "aten_calls": len(events)}
print(json.dumps({"seconds": seconds, **work, "fisher_optim": fisher_optim.__file__}))
"""


@dataclass
class StepTimeOptions:
    """What ``benchmarks/step_time_across_commits.py`` compares."""

    baseline: Path = option(
        None,
        "the folder of the checkout to compare with, whose fisher_optim/ is imported",
        unset="none, it must be given",
        type=Path,
        required=True,
    )
    variants: list[str] = option(
        default_factory=lambda: list(VARIANTS),
        help="the optimizers timed",
        nargs="+",
        choices=sorted(VARIANTS),
    )
    repeats: int = option(5, "rounds of both checkouts", type=positive_int)
    steps: int = option(20, "timed steps per process", type=positive_int)
    warmup: int = option(2, "untimed steps first", type=nonnegative_int)
    batch_size: int = option(128, "examples per step", type=positive_int)
    output: Path | None = option(
        None, "also write the table to this file", unset="print it only", type=Path
    )


def build_parser() -> argparse.ArgumentParser:
    p = parser("step_time_across_commits.py", __doc__.split("\n\n")[0], StepTimeOptions)
    add_shared_options(p, refused=REFUSED, defaults={"device": "cpu"})
    return p


#: The shared options this script declares but does not take, and why.
REFUSED = {
    "device": "it times the CPU step of two checkouts, each in fresh one-thread processes",
    **dict.fromkeys(
        ("compile", "amp"),
        "it times the optimizers' eager float32 step through the API both checkouts share; "
        "--compile and --amp are not part of that API",
    ),
    "pack": PACK_REFUSED,
}


def time_once(checkout: Path, variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of ``variant`` in a fresh process importing ``checkout``'s package,
    and the work of one step (``gflop``, ``aten_calls``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    models = ROOT / "benchmarks" / "common" / "models.py"
    argv = [variant, args.steps, args.warmup, args.batch_size, VARIANTS[variant], models]
    out = subprocess.run(
        [sys.executable, "-c", WORKER, *map(str, argv)],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{variant} at {checkout} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    imported = Path(result["fisher_optim"]).resolve()
    if not imported.is_relative_to(checkout.resolve()):
        raise RuntimeError(f"the worker imported {imported}, not the package of {checkout}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.baseline / "fisher_optim" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no fisher_optim/ package in it")
    checkouts = {"baseline": args.baseline, "this": ROOT}
    samples: dict[tuple[str, str], list[dict[str, float]]] = {
        (v, c): [] for v in args.variants for c in checkouts
    }
    for r in range(args.repeats):
        for v in args.variants:
            order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
            for c in order:
                samples[v, c].append(time_once(checkouts[c], v, args))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    lines = [
        "| variant | baseline ms/step | this ms/step | this / baseline | rounds' range "
        "| GFLOP/step, baseline / this | ATen calls/step, baseline / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        base, this = (samples[v, c] for c in checkouts)
        ms = [statistics.median(r["seconds"] for r in runs) * 1e3 for runs in (base, this)]
        ratios = [t["seconds"] / b["seconds"] for b, t in zip(base, this)]
        lines.append(
            f"| {v} | {ms[0]:.1f} | {ms[1]:.1f} | {statistics.median(ratios):.3f} "
            f"| {min(ratios):.3f} – {max(ratios):.3f} "
            f"| {base[0]['gflop']:.2f} / {this[0]['gflop']:.2f} "
            f"| {base[0]['aten_calls']} / {this[0]['aten_calls']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

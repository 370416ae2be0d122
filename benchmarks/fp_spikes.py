"""What the FP spikes are: analyse the per-refresh log of benchmark runs (the FP collapses).

Every FP run of the benchmark harness writes ``refreshes.jsonl``: one record per penalty
refresh with ``Tr(F_B)`` (``value``), ``||∇ Tr(F_B)||`` (``grad_norm``) and the spike
safeguard's scale. For each run directory given, this prints:

* the distribution of ``r_t = ||∇P_t|| / median(||∇P|| over the previous 20 refreshes)`` —
  the statistic :class:`fisher_optim.SpikeGuard` thresholds — and how many refreshes each
  ``spike_factor`` would flag;
* the same ratio for the penalty value ``Tr(F_B)``;
* the collapses (an epoch whose training accuracy is more than 10 points below the previous
  epoch's) and the largest ``r_t`` in the epoch before each;
* with ``--top N``, the N largest spikes (step, epoch, value, norm, ratios).

``--pull E [E ...]`` instead compares penalties across runs: for each run, the median over the
refreshes of epoch E (``E ≤ epoch < E + 1``) of ``α · ||∇P||``, the penalty's pull on the
parameters, with α and the method read from the run's ``config.json``. Matching the pulls of
FP and of GP/GPr/GPx early in training is how their α ranges are set (docs/measured.md).

``--schedule N [N ...]`` needs no run: for training sets of N examples it prints which
epochs end with a refresh on the short last batch (the spikes' main source, docs/measured.md)
and how much larger ``E[Tr(F_B)] ≈ Tr(F)/b`` is there than on a full batch.

    python benchmarks/fp_spikes.py runs/cifar10_simplecnn/fp_lr0.003_a0.01_s0_init-torch

It reads logs only: of the options every script takes (``--device``, ``--compile``,
``--amp``, ``--pack``) it accepts the defaults and refuses any other value.
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.config import (  # noqa: E402
    SHARED_OPTIONS,
    SIMPLECNN_CIFAR10,
    Setting,
    add_shared_options,
)
from benchmarks.common.runner import READS_LOGS, read_jsonl  # noqa: E402
from fisher_optim.cli import nonnegative_int, option, parser, positive_int  # noqa: E402

FACTORS = (2.0, 3.0, 4.0, 6.0, 10.0)
#: ``--schedule``'s default batch size, refresh interval and epochs: SimpleCNN's setting.
_SCHEDULE = Setting(**SIMPLECNN_CIFAR10)


def running_ratios(values: Sequence[float | None], window: int) -> list[float | None]:
    """``v_t / median(v_{t-window} .. v_{t-1})`` (None until ``window // 4`` values are known)."""
    out: list[float | None] = []
    seen: list[float] = []
    for v in values:
        recent = seen[-window:]
        if v is None or len(recent) < max(1, window // 4) or statistics.median(recent) <= 0:
            out.append(None)
        else:
            out.append(v / statistics.median(recent))
        if v is not None:
            seen.append(v)
    return out


def collapses(metrics: Sequence[dict[str, Any]], drop: float = 10.0) -> list[int]:
    """Epochs whose training accuracy fell more than ``drop`` points below the previous one."""
    accs = [(r["epoch"], r.get("train_acc")) for r in metrics if r["epoch"] >= 1]
    return [
        e
        for (_, a0), (e, a1) in zip(accs, accs[1:])
        if a0 is not None and a1 is not None and a1 < a0 - drop
    ]


def short_batch_refreshes(n_train: int, batch_size: int, every: int, epochs: int) -> list[int]:
    """The epochs (1-based) whose short last batch is a refresh step of FisherPenaltySGD.

    The optimizer refreshes at global steps t ≡ 0 (mod ``every``), counted from 0 over
    ``ceil(n_train / batch_size)`` steps per epoch, without dropping the last batch. Empty
    when ``batch_size`` divides ``n_train`` (no short batch).
    """
    steps = -(-n_train // batch_size)
    if n_train % batch_size == 0:
        return []
    return [e for e in range(1, epochs + 1) if (steps * e - 1) % every == 0]


def schedule_report(sizes: Sequence[int], batch_size: int, every: int, epochs: int) -> str:
    """Markdown table of :func:`short_batch_refreshes` for each training-set size."""
    lines = [
        "| training examples | steps/epoch | last batch | E[Tr(F_B)] there / full batch "
        f"| epochs (of {epochs}) ending on a refresh |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        last = n % batch_size or batch_size
        hits = short_batch_refreshes(n, batch_size, every, epochs)
        shown = ", ".join(map(str, hits[:5])) + (", ..." if len(hits) > 5 else "")
        lines.append(
            f"| {n} | {-(-n // batch_size)} | {last} | {batch_size / last:.1f} | "
            f"{len(hits)}{f' ({shown})' if hits else ''} |"
        )
    return "\n".join(lines)


def analyse(run: Path, window: int, top: int) -> str:
    refreshes = read_jsonl(run / "refreshes.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    norms = [r["grad_norm"] for r in refreshes]
    r_norm = running_ratios(norms, window)
    r_value = running_ratios([r["value"] for r in refreshes], window)
    known = [x for x in r_norm if x is not None]
    lines = [f"## {run.name}: {len(refreshes)} refreshes, {len(metrics) - 1} epochs"]
    if known:
        qs = statistics.quantiles(known, n=100)
        lines.append(
            f"||∇P|| / running median: median {statistics.median(known):.2f}, "
            f"p90 {qs[89]:.2f}, p99 {qs[98]:.2f}, max {max(known):.2f}"
        )
    lines.append(
        "| spike_factor | refreshes flagged (norm) | share | flagged by Tr(F_B) ratio at factor² |"
    )
    lines.append("|---|---|---|---|")
    for f in FACTORS:
        n = sum(1 for x in known if x > f)
        nv = sum(1 for x in r_value if x is not None and x > f * f)
        lines.append(f"| {f:g} | {n} | {100.0 * n / max(len(known), 1):.2f}% | {nv} |")
    guard = [r for r in refreshes if r.get("scale") is not None and r["scale"] < 1.0]
    if guard:
        lines.append(f"safeguard on in this run: {len(guard)} refreshes scaled down")
    falls = collapses(metrics)
    lines.append(f"collapses (train acc -10 points in one epoch): {falls or 'none'}")
    for e in falls:
        before = [x for r, x in zip(refreshes, r_norm) if x is not None and e - 1 <= r["epoch"] < e]
        if before:
            lines.append(f"  epoch {e}: largest ||∇P|| ratio during it: {max(before):.2f}")
    if top:
        ranked = sorted((x, i) for i, x in enumerate(r_norm) if x is not None)[-top:]
        lines.append("| step | epoch | Tr(F_B) | ||∇P|| | norm ratio | value ratio |")
        lines.append("|---|---|---|---|---|---|")
        for x, i in reversed(ranked):
            r = refreshes[i]
            vr = r_value[i]
            lines.append(
                f"| {r['step']} | {r['epoch']:.2f} | {r['value']:.4g} | "
                f"{r['grad_norm']:.4g} | {x:.2f} | "
                f"{'-' if vr is None else format(vr, '.2f')} |"
            )
    return "\n".join(lines)


def pull_report(runs: Sequence[Path], epochs: Sequence[int]) -> str:
    """Markdown table: per run, the median ``α · ||∇P||`` over the refreshes of each epoch."""
    lines = [
        "| run | method | α | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
        "|---|---|---|" + "---|" * len(epochs),
    ]
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        alpha = config["alpha"]
        refreshes = read_jsonl(run / "refreshes.jsonl")
        cells = []
        for e in epochs:
            norms = [
                r["grad_norm"]
                for r in refreshes
                if e <= r["epoch"] < e + 1 and r.get("grad_norm") is not None
            ]
            cells.append(f"{alpha * statistics.median(norms):.3g}" if norms else "-")
        lines.append(f"| {run.name} | {config['method']} | {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class SpikeOptions:
    """What ``benchmarks/fp_spikes.py`` reports."""

    runs: list[Path] = option(
        [],
        "run directories, each with refreshes.jsonl and metrics.jsonl "
        "(default: every FP run under runs/<script>/)",
        flag="runs",
        nargs="*",
        type=Path,
    )
    window: int = option(
        20,
        "refreshes the running median is taken over (the safeguard's spike_window)",
        type=positive_int,
        metavar="N",
    )
    top: int = option(
        5, "list the N largest spikes of each run (0: none)", type=nonnegative_int, metavar="N"
    )
    schedule: list[int] | None = option(
        None,
        "instead of analysing runs: for training sets of N examples, the epochs that end "
        "with a refresh on the short last batch (default: analyse runs)",
        nargs="+",
        type=positive_int,
        metavar="N",
    )
    pull: list[int] | None = option(
        None,
        "per run, the median α·||∇P|| over the refreshes of each epoch E, from its "
        "config.json and refreshes.jsonl (default: the spike statistics)",
        nargs="+",
        type=nonnegative_int,
        metavar="E",
    )
    batch_size: int = option(
        _SCHEDULE.batch_size,
        "with --schedule: the training batch size",
        type=positive_int,
        metavar="B",
    )
    every: int = option(
        _SCHEDULE.every,
        "with --schedule: FisherPenaltySGD's refresh interval",
        type=positive_int,
        metavar="K",
    )
    epochs: int = option(
        _SCHEDULE.epochs, "with --schedule: epochs of training", type=positive_int, metavar="E"
    )


def build_parser() -> argparse.ArgumentParser:
    p = parser("benchmarks/fp_spikes.py", __doc__.split("\n\n")[0], SpikeOptions)
    add_shared_options(p, refused=REFUSED)
    return p


#: It declares the options every script takes, and takes none of them.
REFUSED = dict.fromkeys(SHARED_OPTIONS, READS_LOGS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.schedule:
        print(schedule_report(args.schedule, args.batch_size, args.every, args.epochs))
        return 0
    runs = args.runs or sorted(p.parent for p in Path("runs").glob("*/*/refreshes.jsonl"))
    if not runs:
        print("no FP run found under runs/: pass run directories", file=sys.stderr)
        return 2
    for run in runs:
        if not (run / "refreshes.jsonl").is_file():
            print(f"{run}: no refreshes.jsonl (not an FP run of the harness?)", file=sys.stderr)
            return 2
    if args.pull:
        print(pull_report(runs, args.pull))
        return 0
    for run in runs:
        print(analyse(run, args.window, args.top))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

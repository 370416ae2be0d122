"""Seed-level report of finished benchmark runs: arms, mean ± sd, paired differences, Fig. 2.

An *arm* is every run whose spec differs only in the seed (method, learning rate, α, spike
safeguard, schedule, ...). For each arm this prints, over its seeds, the mean ± sd (sample
standard deviation) of the best validation accuracy, the test accuracy at the best-validation
epoch, the final test and training accuracy, the peak Tr(F) and Tr(F_i), the collapses (an
epoch whose training accuracy is more than 10 points below the previous epoch's, as in
``fp_spikes.py``) and the harness overhead (wall time over time in training steps, minus 1).

* ``--pair A B``: the per-seed paired difference ``A − B`` of the test accuracy at the best
  validation epoch over the seeds both arms ran, with its mean ± sd;
* ``--spearman``: the rank correlation of Tr(F_i) and the final test accuracy over the runs
  (paper Fig. 2; ties get their average rank);
* ``--scatter PNG``: that scatter plot; ``--curves PNG``: validation accuracy and Tr(F)
  against epochs for the first seed of each arm (the paper's Fig. 1 style).

Arms are named ``method/lr<η>/a<α>`` plus ``/guard<F>`` for the spike safeguard of a
penalised method, ``/e<epochs>`` when the arms' schedules differ, ``/bs<B>`` when their
batch sizes differ (Wen et al.'s SB and LB) and ``/gbn<G>`` (``/gbn0``: none) when their Ghost
BatchNorm differs, e.g. ``fp/lr0.001/a0.01/guard4``, ``noise_diag/lr0.1/a0/bs512/gbn32``.

    python benchmarks/report.py runs/c16L --pair fp/lr0.001/a0.01/guard4 baseline/lr0.001/a0
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

from benchmarks.common.cli import mean_std  # noqa: E402
from benchmarks.common.config import PENALTY_OF_METHOD, SHARED_OPTIONS, add_shared_options  # noqa: E402
from benchmarks.common.runner import READS_LOGS  # noqa: E402
from benchmarks.fp_spikes import collapses, read_jsonl  # noqa: E402
from fisher_optim.cli import option, parser  # noqa: E402

#: (summary key, column head, format of the value) of the per-arm table.
COLUMNS = (
    ("best_val_acc", "best val", "{:.2f}"),
    ("test_acc_at_best_val", "test@best val", "{:.2f}"),
    ("final_test_acc", "final test", "{:.2f}"),
    ("final_train_acc", "final train", "{:.2f}"),
    ("max_trace", "peak Tr(F)", "{:.0f}"),
    ("tr_f_i", "Tr(F_i)", "{:.0f}"),
    ("overhead", "overhead", "{:.1%}"),
)


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The finished runs under ``paths``: a run directory, or a folder of run directories.

    Each run is its ``summary.json`` with ``"metrics"`` (``metrics.jsonl``) and ``"dir"``
    added. A run without a summary (still training) is left out.
    """
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory (give run directories or their parent)")
        dirs = (
            [path]
            if (path / "summary.json").is_file()
            else sorted(p.parent for p in path.glob("*/summary.json"))
        )
        for d in dirs:
            summary = json.loads((d / "summary.json").read_text())
            metrics = d / "metrics.jsonl"
            summary["metrics"] = read_jsonl(metrics) if metrics.is_file() else []
            summary["dir"] = str(d)
            runs.append(summary)
    return runs


#: Spec fields that only act on penalised methods: a baseline's value of them is noise.
PENALTY_ONLY = ("spike_factor", "guard_early")


def _arm_key(spec: dict[str, Any]) -> str:
    """The spec without its seed (and, for a method without a penalty, without
    :data:`PENALTY_ONLY`): the runs of one arm share it."""
    drop = {"seed"} | (set() if PENALTY_OF_METHOD.get(spec["method"]) else set(PENALTY_ONLY))
    return json.dumps({k: v for k, v in spec.items() if k not in drop}, sort_keys=True)


def arm_label(
    spec: dict[str, Any],
    with_epochs: bool = False,
    with_batch: bool = False,
    with_ghost: bool = False,
) -> str:
    """``method/lr<η>/a<α>[/guard<F>][/e<epochs>][/bs<B>][/gbn<G>]`` (see the module
    docstring)."""
    label = f"{spec['method']}/lr{spec['lr']:g}/a{spec['alpha']:g}"
    if spec.get("spike_factor") is not None and PENALTY_OF_METHOD.get(spec["method"]):
        label += f"/guard{spec['spike_factor']:g}" + ("e" if spec.get("guard_early") else "")
    if with_epochs:
        label += f"/e{spec['epochs']}"
    if with_batch:
        label += f"/bs{spec['batch_size']}"
    if with_ghost:
        label += f"/gbn{_ghost(spec)}"
    return label


def _ghost(spec: dict[str, Any]) -> int:
    """The run's Ghost BatchNorm virtual batch (0: none, also when it is the whole batch)."""
    ghost = spec.get("ghost_batch_size") or 0
    return ghost if 0 < ghost < spec.get("batch_size", ghost + 1) else 0


def group_arms(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by arm, labelled by :func:`arm_label`, each arm's runs sorted by seed.

    Raises ``ValueError`` if two different arms would get the same label or an arm holds
    the same seed twice.
    """
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault(_arm_key(r["spec"]), []).append(r)
    with_epochs = len({r["spec"]["epochs"] for r in runs}) > 1
    with_batch = len({r["spec"].get("batch_size") for r in runs}) > 1
    with_ghost = len({_ghost(r["spec"]) for r in runs}) > 1
    arms: dict[str, list[dict[str, Any]]] = {}
    for members in by_key.values():
        label = arm_label(members[0]["spec"], with_epochs, with_batch, with_ghost)
        if label in arms:
            raise ValueError(
                f"two arms are both labelled {label!r}: their specs differ in "
                "a field the label does not show; report them separately"
            )
        seeds = [r["spec"]["seed"] for r in members]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"arm {label!r} holds seed(s) twice: {sorted(seeds)}")
        arms[label] = sorted(members, key=lambda r: r["spec"]["seed"])
    return arms


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks of ``x`` and ``y``."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(
            f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}"
        )
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        raise ValueError("spearman is undefined when every value of one sequence is equal")
    return sxy / (sxx * syy) ** 0.5


def paired_differences(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "test_acc_at_best_val"
) -> dict[int, float]:
    """``{seed: a[key] − b[key]}`` over the seeds both arms ran."""
    vb = {r["spec"]["seed"]: r.get(key) for r in b}
    return {
        r["spec"]["seed"]: r[key] - vb[r["spec"]["seed"]]
        for r in a
        if r.get(key) is not None and vb.get(r["spec"]["seed"]) is not None
    }


def arm_table(arms: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per arm, mean ± sd over its seeds, and its collapse count."""
    head = ["arm", "seeds", *(h for _, h, _ in COLUMNS), "collapses"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in arms.items():
        cells = [label, ",".join(str(r["spec"]["seed"]) for r in runs)]
        for key, _, fmt in COLUMNS:
            m, sd = mean_std([r.get(key) for r in runs])
            if m is None:
                cells.append("-")
            else:
                spread = f" ± {fmt.format(sd)}" if len(runs) > 1 else ""
                cells.append(fmt.format(m) + spread)
        counts = [len(collapses(r["metrics"])) for r in runs]
        cells.append(f"{sum(counts)} ({'/'.join(map(str, counts))})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _arm(arms: dict[str, list[dict[str, Any]]], label: str) -> list[dict[str, Any]]:
    if label not in arms:
        raise ValueError(f"no arm {label!r}; the arms are: {', '.join(arms)}")
    return arms[label]


@dataclass
class ReportOptions:
    """What ``benchmarks/report.py`` reports."""

    paths: list[str] = option(
        help="run directories, or folders holding run directories",
        flag="paths",
        nargs="+",
        metavar="RUNS",
    )
    pair: list[list[str]] = option(
        [],
        "print the per-seed paired difference A − B of "
        "test@best val (repeatable; arms as labelled in the table) "
        "(default: no pair)",
        nargs=2,
        action="append",
        metavar=("A", "B"),
    )
    spearman: bool = option(
        False,
        "rank correlation of Tr(F_i) and the final test accuracy over the runs",
        action="store_true",
    )
    scatter: str | None = option(
        None,
        "write the Tr(F_i) against final test accuracy scatter plot here",
        unset="no plot",
        metavar="PNG",
    )
    curves: str | None = option(
        None,
        "write validation accuracy and Tr(F) against epochs (first seed of each arm) here",
        unset="no plot",
        metavar="PNG",
    )


def build_parser() -> argparse.ArgumentParser:
    p = parser("benchmarks/report.py", __doc__.split("\n\n")[0], ReportOptions)
    add_shared_options(p, refused=dict.fromkeys(SHARED_OPTIONS, READS_LOGS))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.paths)
        if not runs:
            raise ValueError(f"no finished run (summary.json) under {args.paths}")
        arms = group_arms(runs)
        pairs = [(a, b, _arm(arms, a), _arm(arms, b)) for a, b in args.pair]
    except ValueError as err:
        parser.error(str(err))
    print(arm_table(arms))
    for a, b, runs_a, runs_b in pairs:
        diffs = paired_differences(runs_a, runs_b)
        m, sd = mean_std(list(diffs.values()))
        per_seed = ", ".join(f"seed {s}: {d:+.2f}" for s, d in sorted(diffs.items()))
        summary = "no common seed" if m is None else f"mean {m:+.2f} ± {sd:.2f}"
        print(f"\n{a} − {b}, test@best val: {per_seed} ({summary})")
    if args.spearman:
        points = [
            (r["tr_f_i"], r["final_test_acc"])
            for r in runs
            if r.get("tr_f_i") is not None and r.get("final_test_acc") is not None
        ]
        try:
            rho = spearman(*zip(*points)) if len(points) > 1 else None
        except ValueError as err:
            parser.error(f"--spearman: {err}")
        if rho is None:
            parser.error("--spearman needs two runs or more with Tr(F_i) and a final test")
        print(f"\nSpearman ρ(Tr(F_i), final test accuracy) = {rho:+.3f} over {len(points)} runs")
    if args.scatter or args.curves:
        from benchmarks.common import plots

        if args.scatter:
            print(plots.plot_trace_scatter(runs, args.scatter))
        if args.curves:
            print(
                plots.plot_runs(
                    [rs[0]["dir"] for rs in arms.values()], args.curves, labels=list(arms)
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Paper-style figures from run directories (matplotlib, Agg backend).

* :func:`plot_runs`: validation accuracy (test accuracy when a run has no validation split)
  and Tr(F) against epochs, one line per run (Fig. 1/3 style).
* :func:`plot_trace_scatter`: Tr(F_i) (Tr(F) when the training loss first crosses ε)
  against the final test accuracy, one point per run (Fig. 2 style).

Command line::

    python -m benchmarks.common.plots RUN_DIR... -o fig.png
    python -m benchmarks.common.plots RUN_DIR... -o scatter.png --scatter
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.common.runner import read_jsonl
from fisher_optim.cli import option, parser

__all__ = ["label_runs", "load_metrics", "main", "plot_runs", "plot_trace_scatter", "save_figure"]

_LABEL_FIELDS = (
    "method",
    "lr",
    "alpha",
    "batch_size",
    "fp_start_epoch",
    "augment",
    "label_noise",
    "seed",
    "model",
)


def load_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.jsonl``."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {"method": Path(run_dir).name}


def label_runs(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Short legend labels: the method plus whichever fields differ between the runs."""
    varying = [k for k in _LABEL_FIELDS[1:] if len({json.dumps(c.get(k)) for c in configs}) > 1]
    short = {
        "batch_size": "bs",
        "fp_start_epoch": "start",
        "label_noise": "noise",
        "alpha": "α",
        "lr": "lr",
        "seed": "seed",
    }
    labels = []
    for c in configs:
        parts = [str(c.get("method", "?"))]
        parts += [
            f"{short.get(k, k)}={c.get(k):g}"
            if isinstance(c.get(k), float)
            else f"{short.get(k, k)}={c.get(k)}"
            for k in varying
        ]
        labels.append(" ".join(parts))
    return labels


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Validation accuracy and Tr(F) against epochs, one line per run; returns the path."""
    configs = [_config(d) for d in run_dirs]
    labels = list(labels) if labels is not None else label_runs(configs)
    fig, (ax_acc, ax_tr) = plt.subplots(1, 2, figsize=(11, 4))
    acc_name = "validation accuracy (%)"
    for run_dir, label in zip(run_dirs, labels):
        logs = load_metrics(run_dir)
        key = "val_acc" if any(r.get("val_acc") is not None for r in logs) else "test_acc"
        if key == "test_acc":
            acc_name = "accuracy (%) (test where no validation split)"
        pts = [(r["epoch"], r[key]) for r in logs if r["epoch"] >= 1 and r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), label=label)
        tr = [(r["epoch"], r["trace"]) for r in logs if r.get("trace") is not None]
        if tr:
            ax_tr.plot(*zip(*tr), label=label)
    ax_acc.set(xlabel="epoch", ylabel=acc_name)
    ax_tr.set(xlabel="epoch", ylabel="Tr(F)")
    if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax_tr.get_lines()):
        ax_tr.set_yscale("log")
    for ax in (ax_acc, ax_tr):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


def save_figure(
    fig: Any, out_png: str | os.PathLike, rect: tuple[float, float, float, float] = (0, 0, 1, 1)
) -> Path:
    """Lay out the axes inside ``rect`` (figure fractions: left, bottom, right, top; the rest
    is room for a figure legend), write (creating the folder) and close a figure."""
    fig.tight_layout(rect=rect)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_trace_scatter(
    summaries: Sequence[dict[str, Any]],
    out_png: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Tr(F_i) against final test accuracy, one annotated point per run (Fig. 2)."""
    configs = [s.get("spec", {}) for s in summaries]
    labels = label_runs(configs)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, label in zip(summaries, labels):
        x, y = s.get("tr_f_i"), s.get("final_test_acc")
        if x is None or y is None:
            continue
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    eps = summaries[0].get("loss_threshold") if summaries else None
    ax.set(
        xlabel=f"Tr(F_i) (Tr(F) when the training loss first < {eps})",
        ylabel="final test accuracy (%)",
    )
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return save_figure(fig, out_png)


@dataclass
class PlotOptions:
    """``python -m benchmarks.common.plots``'s options."""

    run_dirs: list[str] = option(
        help="run directories (with metrics.jsonl)", flag="run_dirs", nargs="+"
    )
    output: str = option("figure.png", "output PNG", flag=("-o", "--output"))
    scatter: bool = option(
        False,
        "Tr(F_i) vs final test accuracy (needs summary.json in each run)",
        action="store_true",
    )
    title: str | None = option(None, "the figure's title", unset="none")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.common.plots RUN_DIR... --output fig.png [--scatter]``."""
    args = parser(
        "python -m benchmarks.common.plots", __doc__.split("\n\n")[0], PlotOptions
    ).parse_args(argv)
    if args.scatter:
        summaries = []
        for d in args.run_dirs:
            path = Path(d) / "summary.json"
            if path.is_file():
                summaries.append(json.loads(path.read_text()))
        out = plot_trace_scatter(summaries, args.output, args.title)
    else:
        out = plot_runs(args.run_dirs, args.output, title=args.title)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

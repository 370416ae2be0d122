"""The command line shared by every benchmark script: ``main(CONFIG)``.

A plain run reproduces the script's table row: the baseline at η* and every method at
η*/10 (η*/30 for TinyImageNet), one α each. Options change which runs are made:

* ``--lrs A B ...`` and/or ``--methods m1 m2 ...``: explicit learning rates (× methods,
  crossed); ``--methods`` alone keeps the table's learning rate of each method;
* ``--alpha A``: one α for every penalised method (``--mixup-beta`` for mixup);
  ``--alpha-grid``: the paper's α search, choosing α by validation accuracy;
* ``--augment``: Table 2 (standard augmentation; η* with and without FP);
* ``--seeds 0 1 2``; ``--epochs E`` (milestones scaled, see :mod:`benchmarks.common.config`);
* ``--train-subset N`` for CPU budgets; ``--quick`` for a smoke test of a few minutes.
* large-batch noise (Wen et al., 2020): methods ``noise_trace``/``noise_diag``/``noise_full``
  (FisherNoiseSGD) are made only for batch sizes above ``--small-batch-size`` (M_S);
  ``--fisher``, ``--noise-every``, ``--ghost-batch-size``; per-batch-size learning rates by
  ``--lr-scaling linear|sqrt`` (+ ``--lr-cap``) or explicitly by ``--batch-lrs`` (one per
  ``--batch-sizes`` entry); ``--log-every-update`` writes ``train_curve.jsonl`` per run.

Every run goes to ``OUT/<method>_lr<lr>_a<alpha>_s<seed>[...]`` (``OUT`` defaults to
``runs/<script>``); finished runs are skipped with ``--resume``, so a long sweep can be
split into pieces with ``--time-limit MINUTES --resume``. At the end ``OUT/results.json``,
``OUT/results.md`` (one row per method and learning rate, α chosen on validation, mean ± std
over seeds) and ``OUT/figure.png`` are written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from benchmarks.common import runner
from benchmarks.common.config import (
    CLI_DEFAULTS,
    DATA,
    MEASURE,
    NOISE,
    NOISE_OF_METHOD,
    PER_RUN,
    QUICK,
    SETTING,
    WHAT,
    ExperimentConfig,
    RunSpec,
    SweepOptions,
    scale_milestones,
)
from benchmarks.common.data import MissingData
from benchmarks.common.runner import FINISHED
from fisher_optim.cli import from_args, option_fields, parser, tagged

__all__ = [
    "CLI_DEFAULTS",
    "QUICK",
    "SweepOptions",
    "aggregate",
    "build_parser",
    "main",
    "make_specs",
    "results_table",
]


def build_parser(cfg: ExperimentConfig) -> argparse.ArgumentParser:
    """The argument parser of a script with config ``cfg``: the option fields of
    :class:`SweepOptions`, :class:`~benchmarks.common.config.RunSpec` and
    :class:`~benchmarks.common.runner.RunningOptions`.

    ``--help`` shows each option's default once (:class:`fisher_optim.cli.HelpFormatter`);
    every value is range-checked here, so a bad one is an argparse error naming the option.
    """
    classes = (SweepOptions, RunSpec, runner.DeviceOptions, runner.RunningOptions)
    names = {f.name for cls in classes for f in option_fields(cls)} - set(
        tagged(SweepOptions, "resolved")
    )
    defaults = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in names}
    defaults.update(loss_threshold=cfg.threshold, out=f"runs/{cfg.name}")
    p = parser(
        f"benchmarks/{cfg.name}.py",
        cfg.description or cfg.name,
        *classes,
        defaults=defaults,
        context=cfg,
        sections=(WHAT, SETTING, NOISE, DATA, MEASURE, runner.DEVICE, runner.RUNNING),
    )
    return p


def _apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--quick`` values for options left at their defaults."""
    if not args.quick:
        return
    for key, value in QUICK.items():
        if getattr(args, key) == parser.get_default(key):
            if key == "bn_refresh_batches":
                value = min(value, args.bn_refresh_batches)
            setattr(args, key, value)


def _run_pairs(cfg: ExperimentConfig, args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, lr) pairs of this invocation."""
    star = args.lr_star
    if args.lrs is not None:
        methods = args.methods or list(cfg.default_methods)
        return [(m, lr) for lr in args.lrs for m in methods]
    if args.augment is not None:
        pairs = [(m, star * f) for f in cfg.augment_lr_factors for m in cfg.augment_methods]
    elif cfg.lr_factors:
        pairs = [(m, star * f) for f in cfg.lr_factors for m in cfg.default_methods]
    elif cfg.lrs:
        pairs = [(m, lr) for lr in cfg.lrs for m in cfg.default_methods]
    else:
        small = star / cfg.small_lr_divisor
        pairs = [("baseline", star)] + [(m, small) for m in cfg.default_methods]
    if args.methods:
        kept = [(m, lr) for m, lr in pairs if m in args.methods]
        missing = [m for m in args.methods if m not in {m for m, _ in kept}]
        small = star / cfg.small_lr_divisor
        pairs = kept + [(m, small) for m in missing]
    seen, out = set(), []
    for pair in pairs:
        key = (pair[0], round(pair[1], 12))
        if key not in seen:
            seen.add(key)
            out.append((pair[0], float(f"{pair[1]:.6g}")))
    return out


def _alphas(cfg: ExperimentConfig, args: argparse.Namespace, method: str) -> tuple[float, ...]:
    if method == "baseline" or method in NOISE_OF_METHOD:
        return (0.0,)
    if args.alpha_grid:
        if args.alphas and method != "mixup":
            return tuple(args.alphas)
        return cfg.alpha_values(method)
    if method == "mixup":
        return (args.mixup_beta if args.mixup_beta is not None else cfg.default_alpha("mixup"),)
    if args.alpha is not None:
        return (args.alpha,)
    return (cfg.default_alpha(method),)


def make_specs(cfg: ExperimentConfig, args: argparse.Namespace) -> list[RunSpec]:
    """Every run of this invocation (method × lr × α × seed × batch size × FP start)."""
    cfg = cfg.with_overrides(alpha_center=args.alpha_center, gpx_center=args.gpx_center)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    batch_sizes = args.batch_sizes or list(cfg.batch_sizes) or [args.batch_size]
    starts = args.fp_start_epochs or list(cfg.fp_start_epochs)
    augment = args.augment if args.augment is not None else cfg.augment
    if args.milestones is not None:
        bad = [m for m in args.milestones if not 0 < m < args.epochs]
        if bad:
            raise ValueError(
                f"--milestones must lie in 1..{args.epochs - 1} (--epochs {args.epochs}), got {bad}"
            )
        milestones = sorted(set(args.milestones))
    else:
        milestones = scale_milestones(cfg.milestones, cfg.epochs, args.epochs)
    fixed = {
        f.name: getattr(cfg, f.name)
        for f in fields(RunSpec)  # gamma, momentum, ...
        if f.name not in PER_RUN and "argparse" not in f.metadata
    }
    base = from_args(
        RunSpec,
        args,
        **{
            **fixed,
            "experiment": cfg.name,
            "method": "baseline",
            "lr": 0.1,
            "milestones": tuple(milestones),
            "augment": augment,
            "probe_size": args.probe_size or args.batch_size,
            "track_groups": cfg.track_groups or args.label_noise > 0,
        },
    )
    batch_lrs = args.batch_lrs
    if batch_lrs is not None and len(batch_lrs) != len(batch_sizes):
        raise ValueError(
            f"--batch-lrs needs one learning rate per batch size {batch_sizes}, got {batch_lrs}"
        )
    specs = []
    for method, lr in _run_pairs(cfg, args):
        method_starts = (
            [s for s in starts if s <= args.epochs] if (starts and method == "fp") else [1]
        )
        for bs, start, alpha, seed in itertools.product(
            batch_sizes, method_starts, _alphas(cfg, args, method), seeds
        ):
            if method in NOISE_OF_METHOD and bs <= base.small_batch_size:
                continue  # the noise imitates a smaller batch than the one trained on
            if batch_lrs is not None:
                run_lr = float(batch_lrs[batch_sizes.index(bs)])
            else:
                run_lr = _scaled_lr(lr, bs, args)
            specs.append(
                replace(
                    base,
                    method=method,
                    lr=run_lr,
                    alpha=float(alpha),
                    seed=seed,
                    batch_size=bs,
                    fp_start_epoch=start,
                    probe_size=args.probe_size or base.probe_size,
                )
            )
    return specs


def _scaled_lr(lr: float, batch_size: int, args: argparse.Namespace) -> float:
    """``lr`` scaled to ``batch_size`` by ``--lr-scaling`` (capped at ``--lr-cap``)."""
    scaling = args.lr_scaling
    if scaling == "none":
        return lr
    ratio = batch_size / args.lr_base_batch
    out = lr * (ratio if scaling == "linear" else ratio**0.5)
    if args.lr_cap is not None:
        out = min(out, args.lr_cap)
    return float(f"{out:.6g}")


def mean_std(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the known (not None) values; sd 0.0 for one
    value, (None, None) for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(specs: Sequence[RunSpec], summaries: dict[str, dict[str, Any]]) -> list[dict]:
    """One row per table cell (runs differing only in α and seed).

    α is chosen by the mean (over seeds) best validation accuracy (never by test accuracy;
    a cell with several α and no validation split raises ``ValueError``); the row reports
    the mean ± std over seeds of the chosen α's metrics.
    """
    from benchmarks.common import harness

    cells: dict[tuple, list[RunSpec]] = {}
    for s in specs:
        cells.setdefault(s.group_key, []).append(s)
    rows = []
    for cell in cells.values():
        done = [
            summaries[s.name]
            for s in cell
            if s.name in summaries and summaries[s.name].get("status") in FINISHED
        ]
        if len(done) < len(cell):
            continue
        by_alpha: dict[float, list[dict]] = {}
        for s in done:
            by_alpha.setdefault(s["spec"]["alpha"], []).append(s)
        if len(by_alpha) > 1:
            means = [
                {
                    "spec": {"alpha": a},
                    "name": f"alpha={a}",
                    "best_val_acc": mean_std([r["best_val_acc"] for r in runs])[0],
                }
                for a, runs in by_alpha.items()
            ]
            alpha = harness.select_best(means)["spec"]["alpha"]
        else:
            alpha = next(iter(by_alpha))
        runs = by_alpha[alpha]
        spec = runs[0]["spec"]
        row: dict[str, Any] = {
            "method": spec["method"],
            "lr": spec["lr"],
            "alpha": alpha,
            "batch_size": spec["batch_size"],
            "fp_start_epoch": spec["fp_start_epoch"],
            "augment": spec["augment"],
            "label_noise": spec["label_noise"],
            "seeds": [r["spec"]["seed"] for r in runs],
            "alphas_searched": sorted(by_alpha),
            "val_acc_by_alpha": {
                str(a): mean_std([r["best_val_acc"] for r in rs])[0]
                for a, rs in sorted(by_alpha.items())
            },
            "runs": [r["name"] for r in runs],
        }
        for key in (
            "best_val_acc",
            "test_acc_at_best_val",
            "final_test_acc",
            "max_trace",
            "tr_f_i",
            "sec_per_epoch",
            "images_per_s",
            "final_train_acc",
            "final_train_acc_clean",
            "final_train_acc_noisy",
        ):
            row[key], row[f"{key}_std"] = mean_std([r.get(key) for r in runs])
        if spec["method"] in NOISE_OF_METHOD or spec.get("ghost_batch_size"):
            errs = [
                None if r.get("final_train_acc") is None else 100.0 - r["final_train_acc"]
                for r in runs
            ]
            row["final_train_err"], row["final_train_err_std"] = mean_std(errs)
        rows.append(row)
    return rows


def _fmt(v: Any, std: Any = None) -> str:
    if v is None:
        return "-"
    s = f"{v:.2f}" if isinstance(v, float) else str(v)
    return s + (f" ± {std:.2f}" if std else "")


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`aggregate` rows."""
    cols = [
        ("method", "method"),
        ("lr", "lr"),
        ("alpha", "α"),
        ("best_val_acc", "best val"),
        ("test_acc_at_best_val", "test@best val"),
        ("final_test_acc", "final test"),
        ("max_trace", "max Tr(F)"),
        ("tr_f_i", "Tr(F_i)"),
        ("sec_per_epoch", "s/epoch"),
    ]
    extra = [
        ("batch_size", "batch"),
        ("fp_start_epoch", "FP from"),
        ("final_train_acc_clean", "train clean"),
        ("final_train_acc_noisy", "train noisy"),
    ]
    for key, head in extra:
        if len({json.dumps(r.get(key)) for r in rows}) > 1 or (
            key.startswith("final_train_acc_") and any(r.get(key) is not None for r in rows)
        ):
            cols.insert(3, (key, head))
    if any("final_train_err" in r for r in rows):  # large-batch noise experiments
        cols.insert(-3, ("final_train_err", "train err"))
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if key in ("lr", "alpha"):
                cells.append(f"{v:g}")
            else:
                cells.append(_fmt(v, r.get(f"{key}_std")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(
    cfg: ExperimentConfig,
    root: Path,
    rows: Sequence[dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
) -> Path | None:
    from benchmarks.common import plots

    if not rows:
        return None
    if cfg.figure == "scatter":
        chosen = [summaries[n] for r in rows for n in r["runs"]]
        return plots.plot_trace_scatter(chosen, root / "figure.png", title=cfg.name)
    dirs = [root / r["runs"][0] for r in rows]
    return plots.plot_runs(dirs, root / "figure.png", title=cfg.name)


def apply_dataset(cfg: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """The config for ``--dataset``; ε follows the data set unless ``--loss-threshold`` is set."""
    if args.dataset == cfg.dataset:
        return cfg
    default_threshold = args.loss_threshold == cfg.threshold
    cfg = cfg.with_overrides(dataset=args.dataset)
    if default_threshold:
        args.loss_threshold = cfg.threshold
    return cfg


def main(cfg: ExperimentConfig, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train every run, write results and the figure. Returns an exit code
    (0 done, 3 stopped by ``--time-limit``: rerun the same command with ``--resume``).

    torch and the harness are imported only here (after parsing), so ``--help`` is instant.
    """
    parser = build_parser(cfg)
    args = parser.parse_args(argv)
    cfg = apply_dataset(cfg, args)
    _apply_quick(args, parser)
    try:
        specs = make_specs(cfg, args)
    except ValueError as e:  # options that are valid alone but not together
        parser.error(str(e))
    root = Path(args.out)
    print(f"{cfg.name}: {len(specs)} run(s) -> {root}")
    for s in specs:
        print(f"  {s.name}")
    if args.dry_run:
        return 0
    if args.alpha_grid and args.val_size <= 0:
        parser.error(
            "--alpha-grid needs a validation split (--val-size > 0): α is never "
            "chosen on test accuracy"
        )
    import torch

    from benchmarks.common import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.resolve_device(args.device)
    t0 = time.perf_counter()
    try:
        data = harness.prepare_data(
            cfg.dataset,
            args.data_root,
            val_size=args.val_size,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            split_seed=args.split_seed,
            label_noise=args.label_noise,
            download=args.download,
        )
    except MissingData as missing:
        return missing.exit()
    data = harness.place_data(data, device, args.data_on_device)
    val_n = 0 if data.val is None else len(data.val)
    print(
        f"data: {len(data.train)} train / {val_n} val / {len(data.test)} test on "
        f"{data.train.images.device} ({time.perf_counter() - t0:.1f}s)"
    )
    deadline = runner.deadline_after(args.time_limit)
    results = harness.run_many(
        specs,
        data,
        root,
        device=device,
        resume=args.resume,
        extend=args.extend,
        progress=not args.no_progress,
        deadline=deadline,
        pack=args.pack,
        compile=args.compile,
        data_on_device=args.data_on_device,
    )
    summaries = {s["name"]: s for s in results}
    interrupted = any(s.get("status") not in FINISHED for s in results) or len(results) < len(specs)
    rows = aggregate(specs, summaries)
    root.mkdir(parents=True, exist_ok=True)
    runner.write_json(
        root / "results.json", {"experiment": cfg.name, "rows": rows, "args": vars(args)}
    )
    table = results_table(rows)
    (root / "results.md").write_text(table + "\n")
    print(table)
    if not args.no_plot and not interrupted:
        fig = _figure(cfg, root, rows, summaries)
        if fig is not None:
            print(f"figure: {fig}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    if interrupted:
        print(runner.STOPPED)
        return runner.EXIT_INTERRUPTED
    return 0

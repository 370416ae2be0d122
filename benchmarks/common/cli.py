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
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from benchmarks.common import runner
from benchmarks.common.config import (
    AUGMENT_MODES,
    LR_SCALINGS,
    MEASURE,
    METHODS,
    NOISE,
    NOISE_OF_METHOD,
    SETTING,
    WHAT,
    ExperimentConfig,
    RunSpec,
    scale_milestones,
)
from benchmarks.common.options import add_options, from_args, option, option_fields, tagged
from benchmarks.common.runner import FINISHED
from fisher_optim._cli import (
    HelpFormatter,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

__all__ = ["CLI_DEFAULTS", "QUICK", "SweepOptions", "aggregate", "build_parser", "main",
           "make_specs", "results_table"]

#: What ``--quick`` sets (unless given explicitly).
QUICK = {"train_subset": 1000, "val_size": 500, "test_subset": 500, "epochs": 3,
         "probe_size": 32, "group_probe_size": 200, "bn_refresh_batches": 4}


def _default_lrs_text(cfg: ExperimentConfig) -> str:
    """What a plain run's learning rates are (mirrors :func:`_run_pairs`)."""
    if cfg.lr_factors:
        return "every method at " + ", ".join(
            "η*" if f == 1 else f"{f:g}·η*" for f in cfg.lr_factors)
    if cfg.lrs:
        return "every method at " + " ".join(f"{lr:g}" for lr in cfg.lrs)
    return f"the table's: baseline at η*, the others at η*/{cfg.small_lr_divisor:g}"


def _default_alphas_text(cfg: ExperimentConfig) -> str:
    methods = [m for m in dict.fromkeys((*cfg.default_methods, *cfg.augment_methods))
               if m not in ("baseline", "mixup") and m not in NOISE_OF_METHOD]
    if not methods:
        return "none of this setting's methods is penalised"
    return "each method's own: " + ", ".join(f"{m} {cfg.default_alpha(m):g}" for m in methods)


def _augment_runs_text(cfg: ExperimentConfig) -> str:
    lrs = ", ".join("η*" if f == 1 else f"{f:g}·η*" for f in cfg.augment_lr_factors)
    return f"{' '.join(cfg.augment_methods)} at {lrs}"


def _device(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:INDEX``."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:INDEX, got {text!r}")
    return text


_DATA = "data"


@dataclass
class SweepOptions:
    """The options that choose an invocation's runs and how they are made (each run's own
    settings are :class:`~benchmarks.common.config.RunSpec`'s option fields). One field per
    option; a field of the script's ``ExperimentConfig`` with the same name is its default
    (except for ``resolved`` ones: their None means the setting's value, resolved by
    :func:`make_specs`), and a help text that is a function is given that config."""

    methods: list[str] | None = option(
        None, lambda cfg: f"training methods, of: {', '.join(METHODS)} (default: "
        f"{' '.join(cfg.default_methods)}, each at the table's learning rate)", nargs="+",
        choices=METHODS, metavar="METHOD", group=WHAT)
    lrs: list[float] | None = option(
        None, lambda cfg: "learning rates, each crossed with every method (default: "
        f"{_default_lrs_text(cfg)})", nargs="+", type=positive_float, metavar="LR",
        group=WHAT, tags=("resolved",))
    lr_star: float = option(0.1, "η*, the paper's tuned large learning rate (a guess; see "
                            "config)", type=positive_float, group=WHAT)
    alpha: float | None = option(None, lambda cfg: "single α for every penalised method "
                                 f"(default: {_default_alphas_text(cfg)})",
                                 type=nonnegative_float, group=WHAT)
    alpha_grid: bool = option(False, "search α on the paper's grid and choose it by validation "
                              "accuracy", action="store_true", group=WHAT)
    alphas: list[float] | None = option(
        None, "with --alpha-grid: search these α (one grid for every penalised method; "
        "default: the paper's 10 log-spaced values per method)", nargs="+",
        type=nonnegative_float, metavar="ALPHA", group=WHAT)
    alpha_center: float = option(0.01, "v of the α grid [0.1v, 10v] for FP, GP, GPr",
                                 type=positive_float, group=WHAT)
    gpx_center: float = option(100.0, "v of the α grid [0.1v, 10v] for GPx", type=positive_float,
                               group=WHAT)
    mixup_beta: float | None = option(None, lambda cfg: "mixup's Beta(β, β) parameter (default: "
                                      f"{cfg.default_alpha('mixup'):g})", type=positive_float,
                                      group=WHAT)
    seeds: list[int] | None = option(None, "seeds, one run each (default: --seed)", nargs="+",
                                     type=nonnegative_int, metavar="SEED", group=WHAT)
    seed: int = option(0, "seed of a single-seed run", type=nonnegative_int, group=WHAT)
    augment: str | None = option(
        None, lambda cfg: "augmentation (standard: random crop + flip; the bare flag means "
        f"standard); giving it makes Table 2's runs: {_augment_runs_text(cfg)} (default: "
        f"{cfg.augment}, the plain run's methods)", nargs="?", const="standard",
        choices=AUGMENT_MODES, group=WHAT, tags=("resolved",))
    fp_start_epochs: list[int] | None = option(
        None, lambda cfg: "switch FP on at these epochs, one run each (Fig. 3; default: "
        + (" ".join(map(str, cfg.fp_start_epochs)) if cfg.fp_start_epochs
           else "from the first epoch") + ")", nargs="+", type=positive_int, metavar="EPOCH",
        group=WHAT, tags=("resolved",))
    batch_sizes: list[int] | None = option(
        None, lambda cfg: "sweep batch sizes, one run each (default: "
        + (" ".join(map(str, cfg.batch_sizes)) if cfg.batch_sizes else "--batch-size") + ")",
        nargs="+", type=positive_int, metavar="B", group=WHAT, tags=("resolved",))
    milestones: list[int] | None = option(
        None, lambda cfg: f"multiply the LR by {cfg.gamma:g} at these epochs of this run (each "
        "in 1..EPOCHS-1); the bare flag keeps the LR constant (default: the setting's "
        "milestones, scaled to --epochs)", nargs="*", type=positive_int, metavar="EPOCH",
        group=SETTING, tags=("resolved",))
    lr_scaling: str = option("none", "scale each run's learning rate by (B / --lr-base-batch) "
                             "(linear) or its square root (sqrt), B the run's batch size",
                             choices=LR_SCALINGS, group=NOISE)
    lr_base_batch: int = option(128, "batch size at which the learning rate is not scaled",
                                type=positive_int, group=NOISE)
    lr_cap: float | None = option(None, "upper bound of the scaled learning rate",
                                  unset="no cap", type=positive_float, group=NOISE)
    batch_lrs: list[float] | None = option(
        None, "explicit learning rate per batch size (aligned with --batch-sizes; overrides "
        "--lrs/--lr-star and --lr-scaling; default: not used)", nargs="+",
        type=positive_float, metavar="LR", group=NOISE)
    data_root: str | None = option(None, "dataset directory/archive",
                                   unset="$FISHER_OPTIM_DATA, else ~/.cache/fisher_optim/data",
                                   group=_DATA)
    train_subset: int | None = option(None, "use N training examples (after holding out "
                                      "validation)", unset="all", type=positive_int,
                                      metavar="N", group=_DATA)
    val_size: int = option(5000, "validation examples held out of the training set (0: none)",
                           type=nonnegative_int, group=_DATA)
    test_subset: int | None = option(None, "evaluate on N test examples", unset="all",
                                     type=positive_int, metavar="N", group=_DATA)
    split_seed: int = option(0, "seed of the validation split, subsets and label noise",
                             type=nonnegative_int, group=_DATA)
    device: str = option("auto", "auto (CUDA if available, else CPU), cpu, cuda or "
                         "cuda:INDEX", type=_device, group=runner.RUNNING)
    extend: bool = option(False, "as --resume, and lengthen runs trained on a shorter "
                          "schedule: a run whose checkpoint differs only in "
                          "--epochs/--milestones, with the same milestones over the epochs it "
                          "has done, continues on the new schedule", action="store_true",
                          group=runner.RUNNING)
    quick: bool = option(False, "CPU smoke test: " + ", ".join(f"{k}={v}"
                                                               for k, v in QUICK.items()),
                         action="store_true", group=runner.RUNNING)
    no_progress: bool = option(False, "no progress bars", action="store_true", group=runner.RUNNING)
    dry_run: bool = option(False, "list the runs and exit", action="store_true", group=runner.RUNNING)


#: Command-line defaults that differ from the RunSpec field's default (which is what a
#: ``config.json`` of a run made before the option existed means).
CLI_DEFAULTS = {"spike_factor": 4.0, "probe_size": None}


def build_parser(cfg: ExperimentConfig) -> argparse.ArgumentParser:
    """The argument parser of a script with config ``cfg``: the option fields of
    :class:`SweepOptions`, :class:`~benchmarks.common.config.RunSpec` and
    :class:`~benchmarks.common.runner.RunningOptions`.

    ``--help`` shows each option's default once (:class:`fisher_optim._cli.HelpFormatter`);
    every value is range-checked here, so a bad one is an argparse error naming the option.
    """
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{cfg.name}.py",
        description=cfg.description or cfg.name,
        formatter_class=HelpFormatter,
    )
    classes = (SweepOptions, RunSpec, runner.RunningOptions)
    names = {f.name for cls in classes for f in option_fields(cls)} - set(
        tagged(SweepOptions, "resolved"))
    defaults = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in names}
    defaults.update(CLI_DEFAULTS, loss_threshold=cfg.threshold, out=f"runs/{cfg.name}")
    add_options(p, *classes, defaults=defaults, context=cfg,
                groups={title: p.add_argument_group(title) for title in
                        (WHAT, SETTING, NOISE, _DATA, MEASURE, runner.RUNNING)})
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
        return cfg.alpha_grid(method)
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
            raise ValueError(f"--milestones must lie in 1..{args.epochs - 1} (--epochs "
                             f"{args.epochs}), got {bad}")
        milestones = sorted(set(args.milestones))
    else:
        milestones = scale_milestones(cfg.milestones, cfg.epochs, args.epochs)
    base = from_args(
        RunSpec, args, experiment=cfg.name, dataset=cfg.dataset, method="baseline", lr=0.1,
        milestones=tuple(milestones), gamma=cfg.gamma, momentum=cfg.momentum, augment=augment,
        probe_size=args.probe_size or args.batch_size,
        track_groups=cfg.track_groups or args.label_noise > 0,
    )
    batch_lrs = args.batch_lrs
    if batch_lrs is not None and len(batch_lrs) != len(batch_sizes):
        raise ValueError(f"--batch-lrs needs one learning rate per batch size {batch_sizes}, "
                         f"got {batch_lrs}")
    specs = []
    for method, lr in _run_pairs(cfg, args):
        method_starts = [s for s in starts if s <= args.epochs] if (
            starts and method == "fp") else [1]
        for bs, start, alpha, seed in itertools.product(
            batch_sizes, method_starts, _alphas(cfg, args, method), seeds
        ):
            if method in NOISE_OF_METHOD and bs <= base.small_batch_size:
                continue  # the noise imitates a smaller batch than the one trained on
            if batch_lrs is not None:
                run_lr = float(batch_lrs[batch_sizes.index(bs)])
            else:
                run_lr = _scaled_lr(lr, bs, args)
            specs.append(replace(base, method=method, lr=run_lr, alpha=float(alpha), seed=seed,
                                 batch_size=bs, fp_start_epoch=start,
                                 probe_size=args.probe_size or base.probe_size))
    return specs


def _scaled_lr(lr: float, batch_size: int, args: argparse.Namespace) -> float:
    """``lr`` scaled to ``batch_size`` by ``--lr-scaling`` (capped at ``--lr-cap``)."""
    scaling = args.lr_scaling
    if scaling == "none":
        return lr
    ratio = batch_size / args.lr_base_batch
    out = lr * (ratio if scaling == "linear" else ratio ** 0.5)
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
        done = [summaries[s.name] for s in cell if s.name in summaries
                and summaries[s.name].get("status") in FINISHED]
        if len(done) < len(cell):
            continue
        by_alpha: dict[float, list[dict]] = {}
        for s in done:
            by_alpha.setdefault(s["spec"]["alpha"], []).append(s)
        if len(by_alpha) > 1:
            means = [{"spec": {"alpha": a}, "name": f"alpha={a}",
                      "best_val_acc": mean_std([r["best_val_acc"] for r in runs])[0]}
                     for a, runs in by_alpha.items()]
            alpha = harness.select_best(means)["spec"]["alpha"]
        else:
            alpha = next(iter(by_alpha))
        runs = by_alpha[alpha]
        spec = runs[0]["spec"]
        row: dict[str, Any] = {
            "method": spec["method"], "lr": spec["lr"], "alpha": alpha,
            "batch_size": spec["batch_size"], "fp_start_epoch": spec["fp_start_epoch"],
            "augment": spec["augment"], "label_noise": spec["label_noise"],
            "seeds": [r["spec"]["seed"] for r in runs],
            "alphas_searched": sorted(by_alpha),
            "val_acc_by_alpha": {str(a): mean_std([r["best_val_acc"] for r in rs])[0]
                                 for a, rs in sorted(by_alpha.items())},
            "runs": [r["name"] for r in runs],
        }
        for key in ("best_val_acc", "test_acc_at_best_val", "final_test_acc", "max_trace",
                    "tr_f_i", "sec_per_epoch", "images_per_s", "final_train_acc",
                    "final_train_acc_clean", "final_train_acc_noisy"):
            row[key], row[f"{key}_std"] = mean_std([r.get(key) for r in runs])
        if spec["method"] in NOISE_OF_METHOD or spec.get("ghost_batch_size"):
            errs = [None if r.get("final_train_acc") is None else 100.0 - r["final_train_acc"]
                    for r in runs]
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
    cols = [("method", "method"), ("lr", "lr"), ("alpha", "α"), ("best_val_acc", "best val"),
            ("test_acc_at_best_val", "test@best val"), ("final_test_acc", "final test"),
            ("max_trace", "max Tr(F)"), ("tr_f_i", "Tr(F_i)"), ("sec_per_epoch", "s/epoch")]
    extra = [("batch_size", "batch"), ("fp_start_epoch", "FP from"),
             ("final_train_acc_clean", "train clean"), ("final_train_acc_noisy", "train noisy")]
    for key, head in extra:
        if len({json.dumps(r.get(key)) for r in rows}) > 1 or (
            key.startswith("final_train_acc_") and any(r.get(key) is not None for r in rows)
        ):
            cols.insert(3, (key, head))
    if any("final_train_err" in r for r in rows):  # large-batch noise experiments
        cols.insert(-3, ("final_train_err", "train err"))
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "---|" * len(cols)]
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


def _figure(cfg: ExperimentConfig, root: Path, rows: Sequence[dict[str, Any]],
            summaries: dict[str, dict[str, Any]]) -> Path | None:
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
    if args.penalty_batch_size is None and cfg.penalty_batch_size is not None:
        args.penalty_batch_size = cfg.penalty_batch_size
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
        parser.error("--alpha-grid needs a validation split (--val-size > 0): α is never "
                     "chosen on test accuracy")
    import torch

    from benchmarks.common import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.resolve_device(args.device)
    t0 = time.perf_counter()
    data = harness.prepare_data(
        cfg.dataset, args.data_root, val_size=args.val_size, train_subset=args.train_subset,
        test_subset=args.test_subset, split_seed=args.split_seed, label_noise=args.label_noise,
    ).to(device)
    val_n = 0 if data.val is None else len(data.val)
    print(f"data: {len(data.train)} train / {val_n} val / {len(data.test)} test on {device} "
          f"({time.perf_counter() - t0:.1f}s)")
    deadline = runner.deadline_after(args.time_limit)
    results = harness.run_many(specs, data, root, device=device, resume=args.resume,
                               extend=args.extend, progress=not args.no_progress, deadline=deadline)
    summaries = {s["name"]: s for s in results}
    interrupted = any(s.get("status") not in FINISHED for s in results) or len(results) < len(
        specs)
    rows = aggregate(specs, summaries)
    root.mkdir(parents=True, exist_ok=True)
    runner.write_json(root / "results.json", {"experiment": cfg.name, "rows": rows,
                                              "args": vars(args)})
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

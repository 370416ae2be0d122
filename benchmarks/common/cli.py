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
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import runner
from benchmarks.common.config import (
    AUGMENT_MODES,
    LR_SCALINGS,
    METHODS,
    NOISE_FISHERS,
    NOISE_OF_METHOD,
    ExperimentConfig,
    RunSpec,
    scale_milestones,
)
from benchmarks.common.models import INITS, MODELS
from benchmarks.common.runner import FINISHED
from fisher_optim._cli import (
    HelpFormatter,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

__all__ = ["QUICK", "aggregate", "build_parser", "main", "make_specs", "results_table"]

#: What ``--quick`` sets (unless given explicitly).
QUICK = {"train_subset": 1000, "val_size": 500, "test_subset": 500, "epochs": 3,
         "probe_size": 32, "group_probe_size": 200, "bn_refresh_batches": 4}


def build_parser(cfg: ExperimentConfig) -> argparse.ArgumentParser:
    """The argument parser of a script with config ``cfg``.

    ``--help`` shows each option's default once (:class:`fisher_optim._cli.HelpFormatter`);
    every value is range-checked here, so a bad one is an argparse error naming the option.
    """
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{cfg.name}.py",
        description=cfg.description or cfg.name,
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=None, metavar="METHOD",
                   help=f"training methods, of: {', '.join(METHODS)} (default: "
                   f"{' '.join(cfg.default_methods)}, each at the table's learning rate)")
    g.add_argument("--lrs", nargs="+", type=positive_float, default=None, metavar="LR",
                   help="learning rates, each crossed with every method (default: "
                   f"{_default_lrs_text(cfg)})")
    g.add_argument("--lr-star", type=positive_float, default=cfg.lr_star,
                   help="η*, the paper's tuned large learning rate (a guess; see config)")
    g.add_argument("--alpha", type=nonnegative_float, default=None,
                   help="single α for every penalised method (default: "
                   f"{_default_alphas_text(cfg)})")
    g.add_argument("--alpha-grid", action="store_true",
                   help="search α on the paper's grid and choose it by validation accuracy")
    g.add_argument("--alphas", nargs="+", type=nonnegative_float, default=None, metavar="ALPHA",
                   help="with --alpha-grid: search these α (one grid for every penalised "
                   "method; default: the paper's 10 log-spaced values per method)")
    g.add_argument("--alpha-center", type=positive_float, default=cfg.alpha_center,
                   help="v of the α grid [0.1v, 10v] for FP, GP, GPr")
    g.add_argument("--gpx-center", type=positive_float, default=cfg.gpx_center,
                   help="v of the α grid [0.1v, 10v] for GPx")
    g.add_argument("--mixup-beta", type=positive_float, default=None,
                   help="mixup's Beta(β, β) parameter (default: "
                   f"{cfg.default_alpha('mixup'):g})")
    g.add_argument("--seeds", nargs="+", type=nonnegative_int, default=None, metavar="SEED",
                   help="seeds, one run each (default: --seed)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of a single-seed run")
    g.add_argument("--augment", nargs="?", const="standard", default=None, choices=AUGMENT_MODES,
                   help="augmentation (standard: random crop + flip; the bare flag means "
                   "standard); giving it makes Table 2's runs: "
                   f"{_augment_runs_text(cfg)} (default: {cfg.augment}, the plain run's "
                   "methods)")
    g.add_argument("--noise", type=fraction, default=cfg.label_noise,
                   help="fraction of training labels replaced by random labels, in [0, 1]")
    g.add_argument("--fp-start-epochs", nargs="+", type=positive_int, default=None,
                   metavar="EPOCH",
                   help="switch FP on at these epochs, one run each (Fig. 3; default: "
                   + (" ".join(map(str, cfg.fp_start_epochs)) if cfg.fp_start_epochs
                      else "from the first epoch") + ")")
    g.add_argument("--batch-sizes", nargs="+", type=positive_int, default=None, metavar="B",
                   help="sweep batch sizes, one run each (default: "
                   + (" ".join(map(str, cfg.batch_sizes)) if cfg.batch_sizes
                      else "--batch-size") + ")")

    g = p.add_argument_group("training setting")
    g.add_argument("--epochs", type=positive_int, default=cfg.epochs,
                   help=f"epochs; the setting's LR milestones {list(cfg.milestones)} (for "
                   f"{cfg.epochs} epochs) are scaled to it")
    g.add_argument("--milestones", type=positive_int, nargs="*", default=None, metavar="EPOCH",
                   help=f"multiply the LR by {cfg.gamma:g} at these epochs of this run (each in "
                   "1..EPOCHS-1); the bare flag keeps the LR constant (default: the setting's "
                   "milestones, scaled to --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=cfg.batch_size,
                   help="mini-batch size")
    g.add_argument("--weight-decay", type=nonnegative_float, default=cfg.weight_decay,
                   help="L2 weight decay of SGD")
    g.add_argument("--model", choices=sorted(MODELS), default=cfg.model, metavar="MODEL",
                   help=f"network, of: {', '.join(sorted(MODELS))} (see "
                   "benchmarks/common/models.py)")
    g.add_argument("--init", choices=INITS, default="kaiming",
                   help="initialisation of the conv and linear layers: kaiming (the models' "
                   "own), torch (PyTorch's layer default) or glorot (Keras's default); the "
                   "paper does not state its own, and the scale of Tr(F) depends on it")
    g.add_argument("--dataset", choices=("cifar10", "cifar100", "tinyimagenet"),
                   default=cfg.dataset, help="train on another data set than the paper's "
                   "setting (its loss threshold ε follows unless --loss-threshold is given)")
    g.add_argument("--every", type=positive_int, default=cfg.every, metavar="N",
                   help="recompute the penalty gradient every N steps")
    g.add_argument("--penalty-batch-size", type=positive_int, default=cfg.penalty_batch_size,
                   metavar="N",
                   help="compute the penalty on the first N examples of the batch"
                   + ("" if cfg.penalty_batch_size is not None
                      else " (default: the whole batch)"))
    g.add_argument("--fd-mode", choices=("exact", "finite_difference"), default=cfg.fd_mode,
                   help="how FisherPenaltySGD computes the penalty gradient")
    g.add_argument("--bn-refresh-batches", type=nonnegative_int, default=cfg.bn_refresh_batches,
                   metavar="N",
                   help="re-estimate BatchNorm statistics on N train batches before evaluating "
                   "(0: keep the running statistics)")

    g = p.add_argument_group("large-batch noise (Wen et al., AISTATS 2020)")
    g.add_argument("--small-batch-size", type=positive_int, default=cfg.small_batch_size,
                   help="M_S: the small batch whose gradient noise the noise_* methods imitate "
                   "(they run only at batch sizes above it)")
    g.add_argument("--fisher", dest="noise_fisher", choices=NOISE_FISHERS,
                   default=cfg.noise_fisher,
                   help="noise_*: empirical Fisher (true labels, the paper) or true Fisher "
                   "(labels sampled from the model)")
    g.add_argument("--noise-every", type=positive_int, default=cfg.noise_every, metavar="N",
                   help="noise_trace/noise_diag: re-estimate the Fisher every N steps "
                   "(1: every step, the paper; noise_full always uses 1)")
    g.add_argument("--ghost-batch-size", type=nonnegative_int, default=cfg.ghost_batch_size,
                   help="Ghost BatchNorm with this virtual batch for runs with a larger batch "
                   "(0: plain BatchNorm)")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, default=cfg.lr_scaling,
                   help="scale each run's learning rate by (B / --lr-base-batch) "
                   "(linear) or its square root (sqrt), B the run's batch size")
    g.add_argument("--lr-base-batch", type=positive_int, default=cfg.lr_base_batch,
                   help="batch size at which the learning rate is not scaled")
    g.add_argument("--lr-cap", type=positive_float, default=cfg.lr_cap,
                   help="upper bound of the scaled learning rate"
                   + ("" if cfg.lr_cap is not None else " (default: no cap)"))
    g.add_argument("--batch-lrs", nargs="+", type=positive_float, default=None, metavar="LR",
                   help="explicit learning rate per batch size (aligned with --batch-sizes; "
                   "overrides --lrs/--lr-star and --lr-scaling; default: not used)")
    g.add_argument("--log-every-update", action=argparse.BooleanOptionalAction,
                   default=cfg.log_every_update,
                   help="write train_curve.jsonl: loss and error of every update's batch")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None,
                   help="dataset directory/archive (default: $FISHER_OPTIM_DATA or ./data)")
    g.add_argument("--train-subset", type=positive_int, default=None, metavar="N",
                   help="use N training examples (after holding out validation; default: all)")
    g.add_argument("--val-size", type=nonnegative_int, default=cfg.val_size,
                   help="validation examples held out of the training set (0: none)")
    g.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                   help="evaluate on N test examples (default: all)")
    g.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="seed of the validation split, subsets and label noise")

    g = p.add_argument_group("measurements")
    g.add_argument("--probe-size", type=positive_int, default=None, metavar="N",
                   help="Tr(F) on the first N training examples (default: the batch size)")
    g.add_argument("--trace-labels", choices=("sample", "exact"), default="sample",
                   help="Tr(F) with sampled labels (fixed generator) or summed over classes")
    g.add_argument("--trace-every-steps", type=nonnegative_int, default=0, metavar="N",
                   help="also measure Tr(F) every N steps (finer Tr(F_i)); 0: per epoch")
    g.add_argument("--loss-threshold", type=positive_float, default=cfg.threshold,
                   help="ε of Tr(F_i): the Tr(F) of the first measurement whose training "
                   "loss is below ε")
    g.add_argument("--eval-train", action="store_true", default=cfg.eval_train,
                   help="also evaluate the whole training set every epoch (eval mode)"
                   + (" (default: on in this setting)" if cfg.eval_train else ""))
    g.add_argument("--test-every", type=nonnegative_int, default=1, metavar="N",
                   help="evaluate test (and noisy-train) accuracy every N epochs, at the last "
                        "epoch and at each new best validation accuracy; 0: at the last epoch, "
                        "plus once at the end on the kept best-validation weights (the same "
                        "test@best-val, one test pass per run)")
    g.add_argument("--val-every", type=positive_int, default=1, metavar="N",
                   help="measure validation accuracy and the epoch's Tr(F) every N epochs and "
                        "at the last epoch (model selection sees only those epochs)")
    g.add_argument("--spike-factor", type=_spike_factor, default=4.0, metavar="F",
                   help="FisherPenaltySGD's spike safeguard: a refreshed penalty gradient over "
                        "this many times the running median norm is scaled down to that bound "
                        "and used for one step only; 'none' turns it off (the paper's FP)")
    g.add_argument("--guard-early", action="store_true",
                   help="FisherPenaltySGD(guard_early=True): the first 5 refreshes, before a "
                        "median exists, are each used for one step only")
    g.add_argument("--group-probe-size", type=positive_int, default=1000, metavar="N",
                   help="examples for clean/noisy gradient norms (label-noise runs)")

    g = p.add_argument_group("running")
    g.add_argument("--out", default=None, help=f"output root (default: runs/{cfg.name})")
    g.add_argument("--device", type=_device, default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:INDEX")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--resume", action="store_true",
                   help="continue interrupted runs from their checkpoints, skip finished ones")
    g.add_argument("--extend", action="store_true",
                   help="as --resume, and lengthen runs trained on a shorter schedule: a run "
                   "whose checkpoint differs only in --epochs/--milestones, with the same "
                   "milestones over the epochs it has done, continues on the new schedule")
    g.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                   help="checkpoint and stop once exceeded (resume with --resume; "
                   "default: no limit)")
    g.add_argument("--quick", action="store_true",
                   help="CPU smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    g.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    return p


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
    base = RunSpec(
        experiment=cfg.name, dataset=cfg.dataset, model=args.model, method="baseline", lr=0.1,
        epochs=args.epochs, milestones=tuple(milestones), gamma=cfg.gamma,
        weight_decay=args.weight_decay, momentum=cfg.momentum, batch_size=args.batch_size,
        augment=augment, every=args.every, penalty_batch_size=args.penalty_batch_size,
        fd_mode=args.fd_mode, label_noise=args.noise,
        probe_size=args.probe_size or args.batch_size, trace_labels=args.trace_labels,
        trace_every_steps=args.trace_every_steps, loss_threshold=args.loss_threshold,
        bn_refresh_batches=args.bn_refresh_batches, eval_train=args.eval_train,
        track_groups=cfg.track_groups or args.noise > 0,
        group_probe_size=args.group_probe_size, test_every=args.test_every, init=args.init,
        val_every=args.val_every, spike_factor=args.spike_factor,
        guard_early=args.guard_early,
    )
    base = replace(base, **_noise_fields(cfg, args))
    batch_lrs = getattr(args, "batch_lrs", None)
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


def _noise_fields(cfg: ExperimentConfig, args: argparse.Namespace) -> dict[str, Any]:
    """RunSpec fields of the large-batch noise options (empty when none is set)."""
    keys = {"small_batch_size": cfg.small_batch_size, "noise_fisher": cfg.noise_fisher,
            "noise_every": cfg.noise_every, "ghost_batch_size": cfg.ghost_batch_size,
            "log_every_update": cfg.log_every_update}
    return {k: getattr(args, k, default) for k, default in keys.items()}


def _scaled_lr(lr: float, batch_size: int, args: argparse.Namespace) -> float:
    """``lr`` scaled to ``batch_size`` by ``--lr-scaling`` (capped at ``--lr-cap``)."""
    scaling = getattr(args, "lr_scaling", "none")
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
    root = Path(args.out or Path("runs") / cfg.name)
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
    data_root = args.data_root or os.environ.get("FISHER_OPTIM_DATA") or "data"
    t0 = time.perf_counter()
    data = harness.prepare_data(
        cfg.dataset, data_root, val_size=args.val_size, train_subset=args.train_subset,
        test_subset=args.test_subset, split_seed=args.split_seed, label_noise=args.noise,
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


def _spike_factor(text: str) -> float | None:
    """``--spike-factor``: a number > 1, or "none"."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 1):
        raise argparse.ArgumentTypeError(f"must be a number > 1 or 'none', got {text!r}")
    return value

"""The break-even point and the edge of stability: λ_K^1, λ_H^1, Tr(K), Tr(F) along training.

Jastrzebski et al., "The Break-Even Point on Optimization Trajectories of Deep Neural
Networks", ICLR 2020, conjecture that after the break-even point early in training the
SGD trajectory depends on the learning rate η and the batch size B as follows:

* (variance reduction) the maximum attained λ_H^1 (largest Hessian eigenvalue) and λ_K^1
  (largest eigenvalue of the gradient covariance K) are smaller for a larger η or a
  smaller B;
* (pre-conditioning) the conditioning of K and H, measured by ``λ^k/λ^1`` with ``λ^k`` the
  smallest of the top-k eigenvalues, is better (larger) for a larger η or a smaller B.

Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability", ICLR 2021: under full-batch gradient descent λ_H^1 rises to about ``2/η`` and
hovers there.

What this script runs (SimpleCNN on real CIFAR-10, the first epochs on a class-stratified
training subset, plain SGD):

1. for each setting ``LR:BATCH`` (default 0.1:128, 0.01:128, 0.1:512) and seed, SGD for
   ``--epochs`` epochs; every ``--measure-every-examples`` training examples it measures,
   with :class:`fisher_optim.CurvatureMonitor` on fixed probe sets of training examples,
   the top-k eigenvalues of K and H (k = ``--top-k``), Tr(K), Tr(F) and ``λ_H^1·η/2``, and
   records the running training accuracy and loss of the mini-batches since the last
   measurement;
2. full-batch gradient descent on ``--gd-subset`` images at ``--gd-lr``, recording λ_H^1 of
   the full-batch loss against ``2/η``.

It writes one JSON file per run into ``--out``, then ``summary.json``, ``break_even.png``
(each quantity against steps or epochs, one line per setting, mean over seeds) and
``edge_of_stability.png``, and prints the tables of ``docs/break-even.md``. Runs can be cut by
``--time-limit`` (the unfinished run is checkpointed, even mid-epoch) and continued with
``--resume`` (finished runs are kept; the result is bitwise that of an uninterrupted run on
CPU). ``--pack N`` trains N runs at once, one process each.

``--device``, ``--compile``, ``--amp`` and ``--pack`` are the shared runner's
(``benchmarks/common/runner.py``). The training steps go through ``torch.compile(model)``
with ``--compile`` and under ``torch.autocast`` with ``--amp`` (part of the run: its files get
an ``_amp-<precision>`` suffix); every measurement uses the eager model, which shares the
parameters (λ_H needs double backward, which a compiled module does not support), in
float32. An ordinary training step reads nothing back from the device: SGD's hits and loss
and gradient descent's loss are read at the measurements. Example (about 30 minutes on one
CPU core)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/break_even.py --threads 1
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import runner  # noqa: E402
from benchmarks.common.config import SweepOptions, add_shared_options  # noqa: E402
from benchmarks.common.data import (  # noqa: E402
    DATASETS,
    ImageDataset,
    MissingData,
    default_cache_dir,
    default_data_root,
    load_dataset,
    shuffled_order,
)
from benchmarks.common.harness import resolve_device  # noqa: E402
from benchmarks.common.models import INITS, MODELS, build_model  # noqa: E402
from benchmarks.common.plots import save_figure  # noqa: E402
from benchmarks.common.runner import COMPLETE, DIVERGED, INTERRUPTED  # noqa: E402
from fisher_optim import CurvatureMonitor  # noqa: E402
from fisher_optim.cli import (  # noqa: E402
    HelpFormatter,
    add_options,
    momentum,
    nonnegative_int,
    option,
    positive_float,
    positive_int,
    tagged,
)
from fisher_optim.curvature import hessian_eigenvalues  # noqa: E402

QUANTITIES = ("trace_F", "trace_K", "lambda_K", "lambda_H", "lambda_H_eta_over_2")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _setting(text: str) -> tuple[float, int]:
    """``"LR:BATCH"`` -> ``(lr, batch)``."""
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"a setting is LR:BATCH (e.g. 0.1:128), got {text!r}")
    return positive_float(parts[0]), positive_int(parts[1])


@dataclass
class BreakEvenOptions:
    """The command line: one field per option (every option has one default, stated in its
    help); the ``run``-tagged ones determine the runs' numbers (a saved run made with other
    values is not reused by --resume)."""

    dataset: str = option("cifar10", "image data set", choices=DATASETS, tags=("run",))
    data_root: Path = option(
        default_factory=default_data_root,
        type=Path,
        help="where the data set lies (any layout benchmarks/common/data.py reads)",
    )
    cache_dir: Path = option(
        default_factory=default_cache_dir, type=Path, help="cache of decoded images"
    )
    model: str = option(
        "simplecnn",
        "the network (benchmarks/common/models.py)",
        choices=sorted(MODELS),
        tags=("run",),
    )
    init: str = option(
        "kaiming",
        "initialisation of conv/linear layers (benchmarks/common/models.py)",
        choices=INITS,
        tags=("run",),
    )
    settings: list[tuple[float, int]] = option(
        [(0.1, 128), (0.01, 128), (0.1, 512)],
        "SGD settings LR:BATCH; the first is the "
        "reference that the others are compared with (larger LR or smaller batch first); "
        "none: only the gradient-descent run",
        type=_setting,
        nargs="*",
    )
    seeds: list[int] = option(
        [0, 1, 2], "seeds (initialisation and data order)", type=nonnegative_int, nargs="+"
    )
    train_subset: int = option(
        2560,
        "training examples (class-stratified, the same for every run)",
        type=positive_int,
        tags=("run",),
    )
    epochs: int = option(8, "SGD epochs per run", type=positive_int, tags=("run",))
    momentum: float = option(0.0, "SGD momentum (plain SGD: 0)", type=momentum, tags=("run",))
    measure_every_examples: int = option(
        2048,
        "measure every this many training examples (rounded to steps)",
        type=positive_int,
        tags=("run",),
    )
    probe_size: int = option(
        128, "probe examples for K and Tr(F) (training examples)", type=positive_int, tags=("run",)
    )
    hessian_probe_size: int = option(
        64,
        "probe examples for the Hessian (the first of the probe set)",
        type=positive_int,
        tags=("run",),
    )
    top_k: int = option(
        5,
        "top eigenvalues of K and H; conditioning proxy λ^k/λ^1",
        type=positive_int,
        tags=("run",),
    )
    lanczos_iters: int = option(
        15,
        "Lanczos steps (Hessian-vector products) per Hessian measurement",
        type=positive_int,
        tags=("run",),
    )
    lanczos_tol: float = option(
        1e-2,
        "relative residual tolerance: converged when every "
        "reported ||Hv_i - λ_i v_i|| <= tol·|λ_i| (reported)",
        type=positive_float,
        tags=("run",),
    )
    gd_subset: int = option(
        256,
        "images for the full-batch gradient-descent run (0: skip it)",
        type=nonnegative_int,
        tags=("run",),
    )
    gd_lr: float = option(
        0.02,
        "learning rate of the full-batch gradient-descent run",
        type=positive_float,
        tags=("run",),
    )
    gd_steps: int = option(100, "gradient-descent steps", type=positive_int, tags=("run",))
    gd_measure_every: int = option(
        5, "measure λ_H^1 every this many gradient-descent steps", type=positive_int, tags=("run",)
    )
    x_axis: str = option("steps", "x axis of the figure", choices=("steps", "epochs"))


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option has one default, stated in its help)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    groups = add_options(
        p,
        BreakEvenOptions,
        runner.RunningOptions,
        defaults={"out": Path("runs/break_even"), "threads": 1},
    )
    add_options(p, SweepOptions, only=("download",), groups=groups)
    # (no --data-on-device: its data always live on the device)
    add_shared_options(p, groups=groups, defaults={"device": "cpu"})
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments (invalid combinations are argparse errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = Path(args.out)
    if args.hessian_probe_size > args.probe_size:
        parser.error("--hessian-probe-size must be at most --probe-size")
    if args.probe_size > args.train_subset:
        parser.error("--probe-size must be at most --train-subset")
    if args.top_k > args.probe_size:
        parser.error("--top-k must be at most --probe-size")
    if not args.settings and args.gd_subset == 0:
        parser.error("nothing to run: give --settings or a --gd-subset > 0")
    if len(set(args.settings)) != len(args.settings):
        parser.error("--settings must be distinct")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def _tensors(ds: ImageDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole (small) data set as normalised float inputs and targets on ``device``."""
    ds = ds.to(device)
    return ds.batch(slice(None)), ds.labels


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


class SGDRun:
    """SGD at ``(lr, batch)`` from seed ``seed``: the records of every measurement (a
    :class:`~benchmarks.common.runner.Trainable`: it checkpoints and resumes mid-epoch)."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: dict[str, Any],
        train: ImageDataset,
        probe: tuple[torch.Tensor, torch.Tensor],
        lr: float,
        batch: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.args, self.config, self.lr, self.batch, self.seed = args, config, lr, batch, seed
        self.train_set = train.to(device)
        torch.manual_seed(seed)
        self.model = build_model(args.model, train.num_classes, init=args.init).to(device)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.precision = runner.Precision(args.amp, device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=args.momentum)
        hx, hy = probe[0][: args.hessian_probe_size], probe[1][: args.hessian_probe_size]
        self.labels_gen = torch.Generator().manual_seed(seed)
        self.monitor = CurvatureMonitor(
            self.model, probe, QUANTITIES, top_k=args.top_k, lr=self.opt,
            hessian_probe=(hx, hy), lanczos_iters=args.lanczos_iters,
            lanczos_tol=args.lanczos_tol, generator=self.labels_gen,
        )  # fmt: skip
        self.order_gen = torch.Generator(device=device).manual_seed(seed)
        self.every = max(1, round(args.measure_every_examples / batch))
        self.steps_per_epoch = -(-len(train) // batch)
        self.epoch = self.step_in_epoch = self.step = 0
        self.perm: torch.Tensor | None = None
        self.window = self._empty_window()
        self.records: list[dict[str, Any]] = []
        self.diverged = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "labels_gen": self.labels_gen.get_state(),
            "order_gen": self.order_gen.get_state(),
            **runner.random_state(),
            **self.precision.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "perm": self.perm,
            "window": dict(self.window),
            "records": self.records,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.labels_gen.set_state(st["labels_gen"])
        self.order_gen.set_state(st["order_gen"].cpu())
        runner.set_random_state(st)
        self.precision.load_state_dict(st)
        self.epoch, self.step_in_epoch, self.step = st["epoch"], st["step_in_epoch"], st["step"]
        self.perm = st["perm"]
        self.window, self.records = dict(st["window"]), st["records"]
        if "sums" not in self.window:  # a checkpoint of the loop that read every step
            old = self.window
            self.window = self._empty_window()
            self.window["sums"] += torch.tensor(
                [float(old["hits"]), old["loss"]], dtype=torch.float64
            )
            self.window["seen"] = old["seen"]

    def resume_error(self, saved: dict[str, Any]) -> str:
        return "it was made with other options"

    def position(self) -> dict[str, int]:
        return {"step": self.step}

    def _empty_window(self) -> dict[str, Any]:
        """The steps since the last measurement: hits and loss · b summed on the device (a
        step reads nothing back), examples seen."""
        device = self.train_set.images.device
        return {"sums": torch.zeros(2, dtype=torch.float64, device=device), "seen": 0}

    def window_diverged(self) -> bool:
        """Whether a loss since the last measurement was not finite (one read)."""
        return not torch.isfinite(self.window["sums"][1]).item()

    def record(self) -> None:
        hits, loss = self.window["sums"].tolist()
        w = {"hits": hits, "loss": loss, "seen": self.window["seen"]}
        row = self.monitor.measure(step=self.step)
        row.update(
            epoch=self.step / self.steps_per_epoch,
            examples=self.step * self.batch,
            train_acc=100.0 * w["hits"] / w["seen"] if w["seen"] else None,
            train_loss=w["loss"] / w["seen"] if w["seen"] else None,
        )
        self.records.append(row)
        self.window = self._empty_window()

    def train(self, deadline: float | None, checkpoint: Callable[[], None]) -> str:
        ds, model, bs = self.train_set, self.model, self.batch
        if not self.records:
            self.record()
        while self.epoch < self.args.epochs:
            if self.perm is None:
                self.perm = shuffled_order(len(ds), self.order_gen, ds.images.device)
            bar = runner.progress_bar(
                self.steps_per_epoch,
                self.step_in_epoch,
                f"lr {self.lr:g} batch {self.batch} seed {self.seed} "
                f"ep {self.epoch + 1}/{self.args.epochs}",
                not self.args.no_progress,
            )
            while self.step_in_epoch < self.steps_per_epoch:
                if runner.past(deadline):
                    if bar is not None:
                        bar.close()
                    return INTERRUPTED
                idx = self.perm[self.step_in_epoch * bs : (self.step_in_epoch + 1) * bs]
                x, y = ds.batch(idx), ds.labels[idx]
                model.train()
                out, loss = runner.train_step(self.forward, self.opt, self.precision, x, y)
                self.step += 1
                self.step_in_epoch += 1
                hits = (out.detach().argmax(1) == y).sum().double()
                self.window["sums"] += torch.stack([hits, loss.detach().double() * len(y)])
                self.window["seen"] += len(y)
                if bar is not None:
                    bar.update(1)
                if self.step % self.every == 0:  # a log point: divergence is seen here
                    if self.window_diverged():
                        self.diverged = True
                        if bar is not None:
                            bar.close()
                        return DIVERGED
                    self.record()
            if bar is not None:
                bar.close()
            self.epoch, self.step_in_epoch, self.perm = self.epoch + 1, 0, None
            last = self.records[-1] if self.records else {}
            print(
                f"[lr {self.lr:g} batch {self.batch} seed {self.seed}] epoch "
                f"{self.epoch}/{self.args.epochs} step {self.step} train acc "
                f"{_num(last.get('train_acc'))} Tr(F) {_num(last.get('trace_F'), '.4g')}",
                flush=True,
            )
        if self.step % self.every:
            if self.window_diverged():
                self.diverged = True
                return DIVERGED
            self.record()
        return COMPLETE

    def summary(self, status: str) -> dict[str, Any]:
        run = {
            "lr": self.lr,
            "batch_size": self.batch,
            "seed": self.seed,
            "steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "diverged": self.diverged,
            "records": self.records,
        }
        return {"status": status, "config": self.config, "run": run}


class GDRun:
    """Full-batch gradient descent at ``--gd-lr``: λ_H^1 of the full-batch loss vs ``2/η``
    (a :class:`~benchmarks.common.runner.Trainable`)."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: dict[str, Any],
        data: tuple[torch.Tensor, torch.Tensor],
        num_classes: int,
        device: torch.device,
    ) -> None:
        self.args, self.config, self.data = args, config, data
        torch.manual_seed(args.seeds[0])
        self.model = build_model(args.model, num_classes, init=args.init).to(device)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.precision = runner.Precision(args.amp, device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.gd_lr)
        self.gen = torch.Generator().manual_seed(args.seeds[0])
        self.step = 0
        self.records: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            **runner.random_state(),
            **self.precision.state_dict(),
            "step": self.step,
            "records": self.records,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.gen.set_state(st["gen"])
        runner.set_random_state(st)
        self.precision.load_state_dict(st)
        self.step, self.records = st["step"], st["records"]

    resume_error = SGDRun.resume_error

    def position(self) -> dict[str, int]:
        return {"step": self.step}

    def train(self, deadline: float | None, checkpoint: Callable[[], None]) -> str:
        args, model, (x, y) = self.args, self.model, self.data
        while True:
            if runner.past(deadline):
                return INTERRUPTED
            model.train()
            # the step in its two halves: a measurement sees the loss before the update
            out, loss = runner.forward_loss(self.forward, self.precision, x, y)
            if self.step % args.gd_measure_every == 0 or self.step == args.gd_steps:
                value = float(loss.detach())  # a measurement: the loop's one read
                if runner.diverged(value):  # (the weights are not finite: nothing to measure)
                    return DIVERGED
                spec = hessian_eigenvalues(model, (x, y), k=1, iters=args.lanczos_iters,
                                           tol=args.lanczos_tol, generator=self.gen)  # fmt: skip
                self.records.append({
                    "step": self.step, "loss": value,
                    "train_acc": 100.0 * float((out.argmax(1) == y).float().mean()),
                    "lambda_H": float(spec.eigenvalues[0]),
                    "lambda_H_residual": float(spec.residuals[0]),
                    "lambda_H_converged": spec.converged,
                })  # fmt: skip
                if self.step == args.gd_steps:
                    return COMPLETE
            runner.backward_step(self.opt, self.precision, loss)
            self.step += 1

    def summary(self, status: str) -> dict[str, Any]:
        run = {
            "lr": self.args.gd_lr,
            "num_examples": len(self.data[1]),
            "two_over_lr": 2 / self.args.gd_lr,
            "records": self.records,
        }
        return {"status": status, "config": self.config, "run": run}


# --------------------------------------------------------------------------------------
# Summary and figures
# --------------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ratio(row: dict[str, Any], key: str) -> float | None:
    top = row.get(f"{key}_top")
    return top[-1] / top[0] if top and top[0] > 0 else None


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Per run: maxima of λ_K^1, λ_H^1, Tr(K), Tr(F) over the measurements after the
    initialisation (step 0, the same for every setting of a seed, is left out), and the
    conditioning λ^k/λ^1 (mean over the second half of the measurements)."""
    recs = run["records"][1:] or run["records"]
    late = recs[len(recs) // 2 :]
    out: dict[str, Any] = {
        "max_lambda_K": max(r["lambda_K"] for r in recs),
        "max_lambda_H": max(r["lambda_H"] for r in recs),
        "max_trace_K": max(r["trace_K"] for r in recs),
        "max_trace_F": max(r["trace_F"] for r in recs),
        "final_train_acc": recs[-1]["train_acc"],
        "diverged": run["diverged"],
        "lambda_H_converged_fraction": statistics.fmean(
            float(r["lambda_H_converged"]) for r in recs
        ),
        # residual of the k-th Ritz pair relative to λ_H^1: how far λ_H^k can be trusted
        "lambda_H_k_relative_residual": statistics.median(
            r["lambda_H_top_residuals"][-1] / r["lambda_H"]
            for r in recs
            if r.get("lambda_H_top_residuals")
        )
        if any(r.get("lambda_H_top_residuals") for r in recs)
        else None,
        "lambda_H_1_relative_residual": statistics.median(
            r["lambda_H_residual"] / r["lambda_H"] for r in recs
        ),
    }
    for key in ("lambda_K", "lambda_H"):
        ratios = [_ratio(r, key) for r in late]
        ratios = [v for v in ratios if v is not None]
        out[f"conditioning_{key}"] = statistics.fmean(ratios) if ratios else None
    return out


def summarize(
    settings: list[tuple[float, int]],
    runs: dict[tuple[float, int, int], dict],
    gd: dict[str, Any] | None,
    top_k: int,
) -> dict[str, Any]:
    """Mean ± sd over seeds per setting, and the conjectures' verdicts (reference: the first
    setting, against each other setting with a smaller η or a larger batch)."""
    per_setting = []
    for lr, batch in settings:
        summaries = [
            run_summary(r) for (a, b, _), r in sorted(runs.items()) if (a, b) == (lr, batch)
        ]
        if not summaries:
            continue
        row: dict[str, Any] = {"lr": lr, "batch_size": batch, "seeds": len(summaries)}
        for key in summaries[0]:
            if key == "diverged":
                row["diverged"] = sum(s["diverged"] for s in summaries)
                continue
            row[key] = _mean_sd([s[key] for s in summaries])
        per_setting.append(row)
    verdicts = []
    if per_setting:
        ref = per_setting[0]
        for other in per_setting[1:]:
            favoured = other["lr"] < ref["lr"] or other["batch_size"] > ref["batch_size"]
            if not favoured:
                continue
            v = {
                "reference": (ref["lr"], ref["batch_size"]),
                "other": (other["lr"], other["batch_size"]),
            }
            for key in ("max_lambda_K", "max_lambda_H"):
                v[f"variance_reduction_{key}"] = ref[key][0] < other[key][0]
            for key in ("conditioning_lambda_K", "conditioning_lambda_H"):
                v[f"preconditioning_{key}"] = ref[key][0] > other[key][0]
            verdicts.append(v)
    summary: dict[str, Any] = {"top_k": top_k, "settings": per_setting, "verdicts": verdicts}
    if gd is not None:
        lam = [r["lambda_H"] for r in gd["records"]]
        half = lam[len(lam) // 2 :]
        summary["gd"] = {
            "lr": gd["lr"], "two_over_lr": gd["two_over_lr"], "num_examples": gd["num_examples"],
            "lambda_H_start": lam[0], "lambda_H_max": max(lam),
            "lambda_H_second_half_mean": statistics.fmean(half),
            "ratio_to_two_over_lr_second_half": statistics.fmean(half) / gd["two_over_lr"],
        }  # fmt: skip
    return summary


def _fmt(pair: tuple[float, float], spec: str = ".4g") -> str:
    mean, sd = pair
    return f"{mean:{spec}} ± {sd:{spec}}"


def tables(summary: dict[str, Any]) -> str:
    """The Markdown tables of the summary."""
    k = summary["top_k"]
    lines = [
        f"| η | batch | seeds | max λ_K^1 | max λ_H^1 | max Tr(K) | max Tr(F) | "
        f"λ_K^{k}/λ_K^1 | λ_H^{k}/λ_H^1 | train acc (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary["settings"]:
        lines.append(
            f"| {s['lr']:g} | {s['batch_size']} | {s['seeds']} | {_fmt(s['max_lambda_K'])} | "
            f"{_fmt(s['max_lambda_H'])} | {_fmt(s['max_trace_K'])} | {_fmt(s['max_trace_F'])} | "
            f"{_fmt(s['conditioning_lambda_K'], '.3f')} | "
            f"{_fmt(s['conditioning_lambda_H'], '.3f')} | {_fmt(s['final_train_acc'], '.1f')} |"
        )
    lines += [
        "",
        f"| η | batch | λ_H^1 residual / λ_H^1 | λ_H^{k} residual / λ_H^1 | "
        "measurements with every top-k residual ≤ tol·|λ_H^i| |",
        "|---|---|---|---|---|",
    ]
    for s in summary["settings"]:
        lines.append(
            f"| {s['lr']:g} | {s['batch_size']} | {s['lambda_H_1_relative_residual'][0]:.1e} | "
            f"{s['lambda_H_k_relative_residual'][0]:.2g} | "
            f"{100 * s['lambda_H_converged_fraction'][0]:.0f}% |"
        )
    lines += [
        "",
        "| reference vs other | variance reduction λ_K | variance reduction λ_H | "
        "pre-conditioning K | pre-conditioning H |",
        "|---|---|---|---|---|",
    ]
    yes = {True: "holds", False: "does not hold"}
    for v in summary["verdicts"]:
        (a, b), (c, d) = v["reference"], v["other"]
        lines.append(
            f"| η={a:g}, B={b} vs η={c:g}, B={d} | {yes[v['variance_reduction_max_lambda_K']]} | "
            f"{yes[v['variance_reduction_max_lambda_H']]} | "
            f"{yes[v['preconditioning_conditioning_lambda_K']]} | "
            f"{yes[v['preconditioning_conditioning_lambda_H']]} |"
        )
    gd = summary.get("gd")
    if gd:
        lines += [
            "",
            f"Full-batch GD, η = {gd['lr']:g} (2/η = {gd['two_over_lr']:g}), "
            f"{gd['num_examples']} images: λ_H^1 {gd['lambda_H_start']:.4g} at the start, "
            f"max {gd['lambda_H_max']:.4g}, mean over the second half "
            f"{gd['lambda_H_second_half_mean']:.4g} = "
            f"{gd['ratio_to_two_over_lr_second_half']:.2f} × 2/η.",
        ]
    return "\n".join(lines)


def figures(
    args: argparse.Namespace, runs: dict[tuple[float, int, int], dict], gd: dict[str, Any] | None
) -> list[Path]:
    """``break_even.png`` (each quantity vs steps/epochs, one line per setting, mean over
    seeds) and ``edge_of_stability.png``."""
    import matplotlib.pyplot as plt

    k = args.top_k
    panels = [
        ("lambda_K", "λ_K^1"), ("lambda_H", "λ_H^1"), ("trace_K", "Tr(K)"),
        ("trace_F", "Tr(F)"), ("cond_K", f"λ_K^{k}/λ_K^1"), ("cond_H", f"λ_H^{k}/λ_H^1"),
        ("train_acc", "training accuracy (%)"), ("lambda_H_eta_over_2", "λ_H^1·η/2"),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for lr, batch in args.settings:
        seeds = [r for (a, b, _), r in sorted(runs.items()) if (a, b) == (lr, batch)]
        if not seeds:
            continue
        length = min(len(r["records"]) for r in seeds)
        xkey = "step" if args.x_axis == "steps" else "epoch"
        xs = [seeds[0]["records"][i][xkey] for i in range(length)]
        for ax, (key, title) in zip(axes.flat, panels, strict=True):
            ys = []
            for i in range(length):
                vals = []
                for r in seeds:
                    row = r["records"][i]
                    v = (
                        _ratio(row, "lambda_K")
                        if key == "cond_K"
                        else _ratio(row, "lambda_H")
                        if key == "cond_H"
                        else row.get(key)
                    )
                    if v is not None:
                        vals.append(v)
                ys.append(statistics.fmean(vals) if vals else float("nan"))
            ax.plot(xs, ys, marker=".", label=f"η={lr:g}, B={batch}")
            ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel(args.x_axis, fontsize=11)
        ax.set_title(ax.get_title(), fontsize=12)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{args.model} on {args.dataset}, {args.train_subset} training examples, "
        f"mean over seeds {args.seeds}",
        fontsize=13,
    )
    # One legend for the eight panels (they share their lines), in a row below them.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, loc="lower center", ncol=len(labels), fontsize=12, frameon=False
        )
    paths = [save_figure(fig, args.out / "break_even.png", rect=(0, 0.06, 1, 1))]
    if gd is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [r["step"] for r in gd["records"]]
        ax1.plot(steps, [r["lambda_H"] for r in gd["records"]], marker=".", label="λ_H^1")
        ax1.axhline(gd["two_over_lr"], color="k", ls="--", label="2/η")
        ax1.set(xlabel="gradient-descent step", title=f"full-batch GD, η={gd['lr']:g}")
        ax1.legend()
        ax2.plot(steps, [r["loss"] for r in gd["records"]], marker=".")
        ax2.set(xlabel="gradient-descent step", title="training loss")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        paths.append(save_figure(fig, args.out / "edge_of_stability.png"))
    return paths


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """What determines a run's numbers (the ``run``-tagged options, and ``--amp``)."""
    config = {k: getattr(args, k) for k in tagged(BreakEvenOptions, "run")}
    if args.amp is not None:  # (left out in float32: the runs made before --amp resume)
        config["amp"] = args.amp
    return config


def _execute(
    args: argparse.Namespace,
    config: dict[str, Any],
    stem: str,
    start: Callable[[], runner.Trainable],
    deadline: float | None,
) -> dict[str, Any]:
    """Train (or resume, or find finished) the run ``stem`` of ``args.out``."""
    if args.amp is not None:
        stem = f"{stem}_amp-{args.amp}"
    begin = time.perf_counter()
    out = runner.execute(
        runner.RunFolder(args.out, config, stem=stem),
        start,
        resume=args.resume,
        deadline=deadline,
        keep_checkpoint=False,
        name=stem,
    )
    if out.get("status") != runner.INTERRUPTED:  # (older versions saved none)
        print(f"{stem}: {time.perf_counter() - begin:.0f} s; {_last(out['run'])}", flush=True)
    return out


def run_gd(
    args: argparse.Namespace,
    config: dict[str, Any],
    data: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    deadline: float | None,
) -> dict[str, Any]:
    """The gradient-descent run on ``data`` (on the host; moved to ``args.device``), a
    :class:`~benchmarks.common.runner.Job`'s function."""
    device = resolve_device(args.device)
    data = (data[0].to(device), data[1].to(device))
    return _execute(
        args,
        config,
        f"gd_lr{args.gd_lr:g}_n{args.gd_subset}",
        lambda: GDRun(args, config, data, num_classes, device),
        deadline,
    )


def run_sgd(
    args: argparse.Namespace,
    config: dict[str, Any],
    train: ImageDataset,
    probe: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    batch: int,
    seed: int,
    *,
    deadline: float | None,
) -> dict[str, Any]:
    """The SGD run at ``(lr, batch)`` from ``seed`` (data on the host; moved to
    ``args.device``), a :class:`~benchmarks.common.runner.Job`'s function."""
    device = resolve_device(args.device)
    probe = (probe[0].to(device), probe[1].to(device))
    return _execute(
        args,
        config,
        f"sgd_lr{lr:g}_bs{batch}_seed{seed}",
        lambda: SGDRun(args, config, train, probe, lr, batch, seed, device),
        deadline,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the benchmark; 0 when complete, 3 when the time limit stopped it
    (then the summary and figures cover the finished runs)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    deadline = runner.deadline_after(args.time_limit)
    config = _config(args)
    try:
        train, _ = load_dataset(
            args.dataset, args.data_root, cache_dir=args.cache_dir, download=args.download
        )
    except MissingData as missing:
        return missing.exit()
    train = train.subset(args.train_subset, seed=0)
    probe = _tensors(train.subset(args.probe_size, seed=1), torch.device("cpu"))
    print(
        f"{args.model} on {args.dataset}: {len(train)} training examples, probe "
        f"{args.probe_size} (Hessian {args.hessian_probe_size}), top-{args.top_k}"
    )

    jobs: list[tuple[tuple[float, int, int] | None, runner.Job]] = []
    if args.gd_subset > 0:  # first: the one run that every summary shows
        gd_data = _tensors(
            train.subset(min(args.gd_subset, len(train)), seed=2), torch.device("cpu")
        )
        jobs.append((None, runner.Job(run_gd, args, config, gd_data, train.num_classes)))
    for seed in args.seeds:
        for lr, batch in args.settings:
            job = runner.Job(run_sgd, args, config, train, probe, lr, batch, seed)
            jobs.append(((lr, batch, seed), job))
    results, complete = runner.sweep(
        [job for _, job in jobs], deadline=deadline, pack=args.pack, folder=args.out
    )
    finished = {
        key: out["run"]
        for (key, _), out in zip(jobs, results)
        if out.get("status") != runner.INTERRUPTED
    }
    gd = finished.pop(None, None)
    runs: dict[tuple[float, int, int], dict] = finished  # type: ignore[assignment]
    if not complete:
        print(
            f"time limit of {args.time_limit:g} min reached after {len(runs)} finished runs; "
            "rerun with --resume to continue (the summary below covers the finished runs)"
        )
    if runs or gd is not None:
        summary = summarize(args.settings, runs, gd, args.top_k)
        summary["complete"] = complete
        runner.write_json(args.out / "summary.json", summary)
        for p in [] if args.no_plot else figures(args, runs, gd):
            print(f"wrote {p}")
        print(tables(summary))
    return 0 if complete else runner.EXIT_INTERRUPTED


def _last(run: dict[str, Any]) -> str:
    """The last measurement of a run, for the log."""
    last = run["records"][-1]
    if "lambda_K" not in last:
        return f"last λ_H^1 {last['lambda_H']:.4g} (2/η = {run['two_over_lr']:g})"
    return (
        f"{run['steps']} steps; last λ_K^1 {last['lambda_K']:.4g}, λ_H^1 "
        f"{last['lambda_H']:.4g}, train acc {last['train_acc']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""The one training loop behind every benchmark script, with logging, checkpoints and sweeps.

:func:`train_run` trains one :class:`~benchmarks.common.config.RunSpec` on a
:class:`DataBundle` and writes, in its run directory:

* ``config.json`` - the run spec;
* ``metrics.jsonl`` - one JSON object per epoch (epoch 0 = at initialisation): learning rate,
  α, running train loss/accuracy, val/test loss/accuracy, ``trace`` (Tr(F) on the probe set),
  ``trace_fb`` (Tr(F_B) on the probe's first batch, training mode), ``penalty_value`` (the
  optimizer's last penalty, FP/GP/GPr/GPx), timings, and for label-noise runs the training
  accuracy and gradient norms on clean and noisy examples;
* ``trace.jsonl`` - with ``trace_every_steps > 0``: Tr(F) and the mean training loss of the
  last window of steps, every that many steps;
* ``train_curve.jsonl`` - with ``log_every_update``: one JSON object per update (``step``,
  fractional ``epoch``, ``lr``, the batch's training ``loss`` and ``train_err`` in %, and for
  noise methods ``noise_norm``), Wen et al.'s Fig. 3;
* ``summary.json`` - at the end (see :func:`summarize`);
* ``checkpoint.pt`` - after every epoch, and mid-epoch when a time limit stops the run:
  model, optimizer (with FisherPenaltySGD's cached penalty gradient and generator), scheduler,
  every random state, the position in the epoch and the logs. Resuming from it gives
  bitwise the same result as an uninterrupted run on CPU.

Large-batch noise runs (methods ``noise_trace``/``noise_diag``/``noise_full``, Wen et al.,
AISTATS 2020) train with ``FisherNoiseSGD`` (``small_batch_size``, ``noise_fisher`` - with
``"empirical"`` the batch's true labels are given by ``set_targets`` -, ``noise_every``) and
log ``noise_norm`` (last step), ``noise_norm_mean`` (mean over the epoch's steps),
``fisher_trace`` (last estimate) and ``noise_refreshes`` per epoch; a final partial batch of
at most ``small_batch_size`` examples is dropped for them (FisherNoiseSGD needs M_L > M_S).
Runs with ``0 < ghost_batch_size < batch_size`` convert their BatchNorm layers to
``GhostBatchNorm`` (``convert_to_ghost_batchnorm``) before training.

Measurement choices:

* Tr(F) is ``fisher_trace`` on the first ``probe_size`` training examples (default: the batch
  size, 128, as in the paper's App. I.2), without augmentation, BatchNorm in eval mode, with
  one label per example sampled from the model by a generator re-seeded identically at every
  measurement (``trace_labels="sample"``, the paper's estimator); ``trace_labels="exact"``
  sums over all classes instead (no sampling noise; C backward passes, cheap for CIFAR-10).
* ``max_trace`` is taken over epochs ≥ 1 (Table 4 starts after epoch 1: Tr(F) is huge at
  initialisation in BatchNorm networks) and over the intra-epoch measurements.
* Tr(F_i) is Tr(F) at the first measurement whose training loss is below ε: the running
  mean of the minibatch losses of the epoch (or of the window, with ``trace_every_steps``).
* Model selection ("early stopping"): ``test_acc_at_best_val`` is the test accuracy at the
  epoch of the best validation accuracy; α is chosen by the best validation accuracy
  (:func:`select_best`) and never by test accuracy.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.common import runner
from benchmarks.common.config import RunSpec
from benchmarks.common.data import ImageDataset, load_dataset, shuffled_order
from benchmarks.common.models import build_model
from benchmarks.common.runner import (
    COMPLETE,
    DIVERGED,
    INTERRUPTED,
    RunFolder,
    load_summary,
    write_jsonl,
)
from fisher_optim import FisherPenaltySGD
from fisher_optim.fisher_noise_sgd import FisherNoiseSGD
from fisher_optim.fisher_penalty_sgd import WEIGHT_KEY
from fisher_optim.ghost_batchnorm import convert_to_ghost_batchnorm

__all__ = [
    "TIME_KEYS",
    "DataBundle",
    "build_optimizer",
    "evaluate",
    "load_summary",
    "prepare_data",
    "resolve_device",
    "run_many",
    "select_best",
    "summarize",
    "train_run",
]

#: Log fields that measure time (they differ between otherwise identical runs).
TIME_KEYS = ("epoch_time", "train_time", "eval_time", "images_per_s", "wall_time")
METRICS = "metrics.jsonl"
TRACE = "trace.jsonl"
TRAIN_CURVE = "train_curve.jsonl"
REFRESHES = "refreshes.jsonl"


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """Train/validation/test sets (uint8, on the training device) for a run.

    ``noisy`` marks the training examples whose label was changed by label noise
    (``None`` without noise); ``clean_labels`` are the labels before the noise.
    """

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    noisy: Tensor | None = None
    clean_labels: Tensor | None = None

    def to(self, device: torch.device | str) -> DataBundle:
        """Move every set (and masks) to ``device``."""
        return DataBundle(
            self.train.to(device),
            None if self.val is None else self.val.to(device),
            self.test.to(device),
            None if self.noisy is None else self.noisy.to(device),
            None if self.clean_labels is None else self.clean_labels.to(device),
        )


def prepare_data(
    dataset: str | tuple[ImageDataset, ImageDataset],
    data_root: str | os.PathLike | None = None,
    *,
    val_size: int = 5000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    split_seed: int = 0,
    label_noise: float = 0.0,
    download: bool = False,
) -> DataBundle:
    """Load ``dataset`` and build the splits, in this order:

    1. hold out ``val_size`` training examples for validation (seeded by ``split_seed``;
       ``0``: no validation set, as for TinyImageNet);
    2. keep a class-stratified ``train_subset`` of the rest (and ``test_subset`` of the test
       set), for CPU budgets;
    3. with ``label_noise > 0``, replace that fraction of the training *and* validation labels
       by uniform random labels (so validation-based early stopping sees noisy labels, as a
       practitioner would). The test set stays clean.

    ``dataset`` is a name for :func:`~benchmarks.common.data.load_dataset` or an in-memory
    ``(train, test)`` pair (tests); ``download`` fetches a missing one
    (:func:`~benchmarks.common.data.download_dataset`).
    """
    if isinstance(dataset, str):
        train, test = load_dataset(dataset, data_root, download=download)
    else:
        train, test = dataset
    val = None
    if val_size > 0:
        train, val = train.split_validation(val_size, split_seed)
    if train_subset is not None and train_subset < len(train):
        train = train.subset(train_subset, split_seed)
    if test_subset is not None and test_subset < len(test):
        test = test.subset(test_subset, split_seed)
    noisy = clean = None
    if label_noise > 0:
        clean = train.labels.clone()
        train, _ = train.with_label_noise(label_noise, split_seed + 1)
        noisy = train.labels != clean
        if val is not None:
            val, _ = val.with_label_noise(label_noise, split_seed + 2)
    return DataBundle(train, val, test, noisy, clean)


def place_data(data: DataBundle, device: torch.device, mode: str = "auto") -> DataBundle:
    """``data`` resident on ``device`` (``mode`` "yes"), left on the host ("no": batches are
    made there and copied), or resident if it takes at most half the device's free memory
    ("auto"; always on the CPU)."""
    if mode not in runner.DATA_ON_DEVICE:
        raise ValueError(f"data_on_device must be one of {runner.DATA_ON_DEVICE}, got {mode!r}")
    device = torch.device(device)
    resident = mode == "yes" or device.type == "cpu"
    if mode == "auto" and device.type == "cuda":
        sets = [data.train, data.test] + ([data.val] if data.val is not None else [])
        size = sum(d.images.nbytes + d.labels.nbytes for d in sets)
        resident = size <= torch.cuda.mem_get_info(device)[0] / 2
    if mode == "no" and device.type != "cpu":
        return data.to("cpu")
    return data.to(device) if resident else data.to("cpu")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: ImageDataset, batch_size: int = 500
) -> tuple[float, float, Tensor]:
    """``(mean loss, accuracy in %, per-example correctness)`` of ``model`` (eval mode).

    The batches are moved to the model's device (a data set kept on the host) and the sums
    stay there: one read back per call."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = []
    for start in range(0, len(ds), batch_size):
        x = to_device(ds.batch(slice(start, start + batch_size)), device)
        y = to_device(ds.labels[start : start + batch_size], device)
        out = model(x)
        total += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct.append(out.argmax(1) == y)
    model.train(was_training)
    hits = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool, device=device)
    n = max(len(ds), 1)
    loss, right = torch.stack([total, hits.double().sum()]).tolist()
    return loss / n, 100.0 * right / n, hits


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from the host to a GPU through pinned memory, without waiting."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextlib.contextmanager
def refreshed_bn_stats(
    model: nn.Module, batches: Callable[[], Iterator[Tensor]] | None
) -> Iterator[None]:
    """Evaluate with BatchNorm statistics re-estimated on ``batches`` (paper: 100 training
    batches), then restore the training statistics bitwise. No-op if ``batches`` is None or
    the model has no BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if batches is None or not bns:
        yield
        return
    saved = [(m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the refresh batches
        model.train()
        with torch.no_grad():
            for x in batches():
                model(x)
        model.train(was_training)
        yield
    finally:
        model.train(was_training)
        for m, (momentum, buffers) in zip(bns, saved):
            m.momentum = momentum
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


def _fisher_trace(model: nn.Module, x: Tensor, labels: str, seed: int) -> float:
    from fisher_optim.curvature.fisher import fisher_trace

    g = torch.Generator(device=x.device).manual_seed(seed)
    return float(fisher_trace(model, x, labels=labels, chunk_size=256, generator=g))


def _minibatch_trace(model: nn.Module, x: Tensor, seed: int) -> float:
    from fisher_optim.curvature.fisher import minibatch_fisher_trace

    g = torch.Generator(device=x.device).manual_seed(seed)
    was_training = model.training
    model.train()
    try:
        return float(minibatch_fisher_trace(model, x, generator=g))
    finally:
        model.train(was_training)


def _group_stats(model: nn.Module, x: Tensor, y: Tensor, noisy: Tensor) -> dict[str, Any]:
    """Per-example gradient norms and mean-gradient norms on clean vs noisy examples."""
    from fisher_optim.curvature.per_example import (
        group_gradient_stats,
        per_example_grad_norms,
    )

    out: dict[str, Any] = {}
    norms = per_example_grad_norms(model, x, y)
    for name, mask in (("clean", ~noisy), ("noisy", noisy)):
        out[f"grad_norm_{name}"] = float(norms[mask].mean()) if bool(mask.any()) else None
    if bool(noisy.any()) and bool((~noisy).any()):
        stats = group_gradient_stats(model, x, y, noisy)
        out["mean_grad_norm_clean"] = stats["grad_norm"][False]
        out["mean_grad_norm_noisy"] = stats["grad_norm"][True]
        out["grad_cosine_clean_noisy"] = stats.get("cosine")
    return out


def _finite(v: Any) -> Any:
    """JSON-safe number: NaN/Inf -> None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------------------
# Summary and selection
# --------------------------------------------------------------------------------------


def _tr_f_i(records: Sequence[dict[str, Any]], key: str, eps: float) -> tuple[Any, Any]:
    for r in records:
        loss = r.get(key)
        if loss is not None and r.get("trace") is not None and loss < eps:
            return r["trace"], r["epoch"]
    return None, None


def summarize(
    spec: RunSpec,
    logs: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    status: str = "complete",
) -> dict[str, Any]:
    """The run summary: accuracies, model selection on validation, Tr(F) statistics.

    ``status`` is "complete" or "diverged" (see ``_Run.train``); a diverged run's best
    validation epoch still selects among the epochs it finished (early stopping).
    """
    trained = [r for r in logs if r["epoch"] >= 1]
    last = trained[-1] if trained else logs[-1]
    s: dict[str, Any] = {
        "name": spec.name,
        "spec": spec.to_dict(),
        "status": status,
        "epochs_done": len(trained),
    }
    with_val = [r for r in trained if r.get("val_acc") is not None]
    if with_val:
        best = max(with_val, key=lambda r: (r["val_acc"], -r["epoch"]))
        s.update(
            best_val_acc=best["val_acc"],
            best_val_epoch=best["epoch"],
            test_acc_at_best_val=best["test_acc"],
        )
    else:
        s.update(best_val_acc=None, best_val_epoch=None, test_acc_at_best_val=None)
    s.update(
        final_test_acc=last.get("test_acc"),
        final_val_acc=last.get("val_acc"),
        final_train_acc=last.get("train_acc"),
        final_train_loss=last.get("train_loss"),
    )
    points = [(r["trace"], r["epoch"]) for r in [*trained, *traces] if r.get("trace") is not None]
    if points:
        s["max_trace"], s["max_trace_epoch"] = max(points, key=lambda p: p[0])
    else:
        s["max_trace"] = s["max_trace_epoch"] = None
    if traces:
        s["tr_f_i"], s["tr_f_i_epoch"] = _tr_f_i(traces, "window_loss", spec.loss_threshold)
    else:
        s["tr_f_i"], s["tr_f_i_epoch"] = _tr_f_i(trained, "train_loss", spec.loss_threshold)
    s["loss_threshold"] = spec.loss_threshold
    times = [r["epoch_time"] for r in trained if r.get("epoch_time") is not None]
    s["sec_per_epoch"] = sum(times) / len(times) if times else None
    ips = [r["images_per_s"] for r in trained if r.get("images_per_s")]
    s["images_per_s"] = sum(ips) / len(ips) if ips else None
    s["train_time"] = sum(r.get("train_time") or 0.0 for r in trained)
    walls = [r["wall_time"] for r in trained if r.get("wall_time") is not None]
    #: (wall time − time in training steps) / time in training steps, over the run's epochs
    s["overhead"] = (
        sum(walls) / s["train_time"] - 1.0
        if walls and len(walls) == len(trained) and s["train_time"] > 0
        else None
    )
    for key in ("train_acc_clean", "train_acc_noisy", "train_eval_acc"):
        if key in last:
            s[f"final_{key}"] = last[key]
    if "noisy_count" in last:
        s["noisy_count"] = last["noisy_count"]
    return s


def schedule_change_error(old: dict[str, Any], new: dict[str, Any], epochs_done: int) -> str | None:
    """Why a run checkpointed after ``epochs_done`` epochs of spec ``old`` cannot continue
    as spec ``new`` (``--extend``), or None if it can.

    It can when the specs differ only in ``epochs`` and ``milestones``, ``new`` has at least
    ``epochs_done`` epochs, and both schedules gave the same learning rate to every epoch
    done (the same milestones up to ``epochs_done``): the continued run then trains step for
    step as ``new`` would have. (A finished run keeps the evaluation of its old last epoch,
    which model selection also sees.)
    """
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    other = [k for k in changed if k not in ("epochs", "milestones")]
    if other:
        return f"it differs in {', '.join(other)}"
    if new["epochs"] < epochs_done:
        return f"it has already trained {epochs_done} epochs, more than --epochs {new['epochs']}"
    past_old = sorted(m for m in old["milestones"] if m <= epochs_done)
    past_new = sorted(m for m in new["milestones"] if m <= epochs_done)
    if past_old != past_new:
        return (
            f"its first {epochs_done} epochs ran with LR milestones {past_old}, the new "
            f"schedule has {past_new} there"
        )
    return None


def select_best(summaries: Sequence[dict[str, Any]], key: str = "best_val_acc") -> dict[str, Any]:
    """The run with the highest validation accuracy (ties: the smaller α).

    Raises ``ValueError`` if a run has no validation accuracy: α is never chosen on test.
    """
    if not summaries:
        raise ValueError("no runs to select from")
    missing = [s["name"] for s in summaries if s.get(key) is None]
    if missing:
        raise ValueError(
            f"runs {missing} have no {key}: selecting α needs a validation split "
            "(--val-size > 0); it is never chosen on test accuracy"
        )
    return max(summaries, key=lambda s: (s[key], -s["spec"]["alpha"]))


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def build_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``: SGD, or the Fisher-noise or penalty wrapper around
    it, as ``spec`` says."""
    kw = {"lr": spec.lr, "momentum": spec.momentum, "weight_decay": spec.weight_decay}
    if spec.noise_covariance is not None:
        return FisherNoiseSGD(
            model,
            torch.optim.SGD,
            small_batch_size=spec.small_batch_size,
            covariance=spec.noise_covariance,
            fisher=spec.noise_fisher,
            every=1 if spec.noise_covariance == "full" else spec.noise_every,
            seed=spec.seed + 10_007,
            **kw,
        )
    if spec.penalty is None:
        return torch.optim.SGD(model.parameters(), **kw)
    return FisherPenaltySGD(
        model,
        torch.optim.SGD,
        alpha=spec.alpha,
        every=spec.every,
        mode=spec.fd_mode,
        penalty=spec.penalty,
        penalty_batch_size=spec.penalty_batch_size,
        seed=spec.seed + 10_007,
        spike_factor=spec.spike_factor,
        guard_early=spec.guard_early,
        **kw,
    )


#: The training statistics a step adds up on the device (read at log points, see
#: :class:`_Run`): loss · b, hits, the loss (for the window of ``trace_every_steps``), the
#: noise norm and how many steps had one, and the first step whose loss was not finite.
SUMS = ("loss", "correct", "win_loss", "noise_norm", "noise_steps", "first_nonfinite")
_LOSS, _CORRECT, _WIN, _NOISE, _NOISE_N, _BAD = range(len(SUMS))


class _Run:
    """State of one training run (kept in one object so it checkpoints as a whole), a
    :class:`~benchmarks.common.runner.Trainable`.

    An ordinary training step reads nothing back from the device: its loss, hits and noise
    norm are added to a float64 tensor on the device (:data:`SUMS`), read at the log
    points - the end of an epoch, a ``trace_every_steps`` measurement - together with the
    first step whose loss was not finite (divergence is seen there). ``forward`` is the
    model, or its ``torch.compile`` (``compile=True``); ``spec.amp`` trains under
    ``torch.autocast`` (``"fp16"`` with a ``GradScaler``, whose inf check reads one value
    per step)."""

    def __init__(
        self,
        spec: RunSpec,
        data: DataBundle,
        out: Path,
        device: torch.device,
        *,
        extend: bool = False,
        progress: bool = False,
        compile: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.data, self.out, self.device = spec, data, out, device
        #: ``--extend`` (continue a checkpoint on a longer schedule), the tqdm bar, the log.
        self.extend, self.progress, self.log = extend, progress, log
        torch.manual_seed(spec.seed)
        ds = data.train
        #: where the data set lives (the device, or the host: its batches are moved)
        self.data_device = ds.images.device
        self.model = build_model(spec.model, ds.num_classes, spec.init).to(device)
        if spec.ghost:
            convert_to_ghost_batchnorm(self.model, spec.ghost_batch_size)
        self.forward: Callable[[Tensor], Tensor] = (
            torch.compile(self.model) if compile else self.model
        )
        # on the module the step calls: the compiled one sees its own forwards
        self.opt = build_optimizer(spec, self.forward)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, list(spec.milestones), gamma=spec.gamma
        )
        self.precision = runner.Precision(spec.amp, device)
        self.gen = torch.Generator(device=self.data_device).manual_seed(spec.seed)
        self.mix_rng = np.random.default_rng(spec.seed + 20_011)
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.perm: Tensor | None = None
        #: host-side sums of the epoch (examples, window steps, seconds)
        self.sums = {"count": 0, "win_n": 0, "time": 0.0, "wall": 0.0}
        #: the device-side sums of the epoch (:data:`SUMS`)
        self.acc = self._zeros()
        self.global_step = 0
        self.logs: list[dict[str, Any]] = []
        self.traces: list[dict[str, Any]] = []
        #: Per-update records (``log_every_update``): read at the end of the epoch from
        #: ``pending`` (host fields, device values).
        self.updates: list[dict[str, Any]] = []
        self.pending: list[tuple[dict[str, Any], Tensor]] = []
        n_probe = min(spec.probe_size, len(ds))
        self.probe_x = to_device(ds.batch(slice(0, n_probe)), device)
        self.group_idx = torch.arange(min(spec.group_probe_size, len(ds)), device=self.data_device)
        #: One record per FisherPenaltySGD refresh (``refreshes.jsonl``).
        self.refresh_log: list[dict[str, Any]] = []
        #: ``(epoch, weights)`` of the best validation epoch so far (``test_every=0``).
        self.best_state: tuple[int, dict[str, Tensor]] | None = None

    def _zeros(self) -> Tensor:
        return torch.zeros(len(SUMS), dtype=torch.float64, device=self.device)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        self._flush_updates()
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "gen": self.gen.get_state(),
            "mix_rng": self.mix_rng.bit_generator.state,
            **runner.random_state(),
            **self.precision.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "perm": self.perm,
            "sums": dict(self.sums),
            "acc": self.acc,
            "global_step": self.global_step,
            "logs": self.logs,
            "traces": self.traces,
            "best_state": self.best_state,
            "refresh_log": self.refresh_log,
            **({"updates": self.updates} if self.spec.log_every_update else {}),
        }

    def resume_error(self, saved: dict[str, Any]) -> str | None:
        why = schedule_change_error(saved["spec"], self.spec.to_dict(), saved["epoch"])
        if why is None and not self.extend:
            why = "only its schedule differs: continue it on the new one with --extend"
        return why

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step_in_epoch}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.sched.milestones = Counter(self.spec.milestones)  # the new schedule (--extend)
        self.gen.set_state(st["gen"].cpu())
        self.mix_rng.bit_generator.state = st["mix_rng"]
        runner.set_random_state(st)
        self.precision.load_state_dict(st)
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.perm = None if st["perm"] is None else st["perm"].to(self.data_device)
        sums = dict(st["sums"])
        if "acc" in st:
            self.acc = st["acc"].to(self.device)
        else:  # a checkpoint of the loop that read its sums every step
            self.acc = self._zeros()
            norms = st.get("noise_norms", [])
            self.acc[:_BAD] = torch.tensor(
                [
                    sums.get("loss", 0.0),
                    sums.get("correct", 0.0),
                    sums.get("win_loss", 0.0),
                    sum(norms),
                    len(norms),
                ],
                dtype=torch.float64,
            )
        self.sums = {k: sums.get(k, 0) for k in ("count", "win_n", "time", "wall")}
        self.global_step = st["global_step"]
        self.logs, self.traces = st["logs"], st["traces"]
        self.best_state = st.get("best_state")
        self.refresh_log = list(st.get("refresh_log", []))
        self.updates = list(st.get("updates", []))

    # ---------------------------------------------------------------- measurement
    def _refresh_batches(self) -> Callable[[], Iterator[Tensor]] | None:
        k = self.spec.bn_refresh_batches
        if k <= 0:
            return None
        ds, bs = self.data.train, self.spec.batch_size

        def batches() -> Iterator[Tensor]:
            g = torch.Generator(device=self.data_device).manual_seed(self.spec.seed + 30_011)
            perm = shuffled_order(len(ds), g)
            for i in range(min(k, math.ceil(len(ds) / bs))):
                idx = perm[i * bs : (i + 1) * bs]
                yield to_device(ds.batch(idx, self.spec.augment, g), self.device)

        return batches

    def _new_best(self, val_acc: float | None) -> bool:
        best = max(
            (r["val_acc"] for r in self.logs if r["epoch"] >= 1 and r.get("val_acc") is not None),
            default=None,
        )
        return val_acc is not None and (best is None or val_acc > best)

    def _wants_test(self, epoch: int, val_acc: float | None, final: bool) -> bool:
        """Whether epoch ``epoch`` evaluates the test (and noisy-train) set: see
        ``RunSpec.test_every``."""
        k = self.spec.test_every
        if final or epoch == 0 or val_acc is None or (k > 0 and epoch % k == 0):
            return True
        return k > 0 and self._new_best(val_acc)

    def _wants_val(self, epoch: int, final: bool) -> bool:
        """Whether epoch ``epoch`` measures validation accuracy and Tr(F) (``val_every``)."""
        return final or epoch == 0 or epoch % self.spec.val_every == 0

    def test_best(self) -> None:
        """With ``test_every=0``: evaluate the kept best-validation weights on the test set
        and write the result into that epoch's record (test@best-val, as if measured then)."""
        if self.best_state is None:
            return
        epoch, state = self.best_state
        rec = next(r for r in self.logs if r["epoch"] == epoch)
        if rec.get("test_acc") is None:
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(state)
            rec["test_loss"], rec["test_acc"], _ = evaluate(
                self.model, self.data.test, self.spec.eval_batch_size
            )
            self.model.load_state_dict(current)
        self.best_state = None

    def measure(self, epoch: int = 0, final: bool = True) -> dict[str, Any]:
        """The measurements logged after ``epoch`` (``final``: the run's last record)."""
        spec, data, model = self.spec, self.data, self.model
        t0 = time.perf_counter()
        rec: dict[str, Any] = {}
        if not self._wants_val(epoch, final):
            return {"eval_time": time.perf_counter() - t0}
        with refreshed_bn_stats(model, self._refresh_batches()):
            if data.val is not None:
                rec["val_loss"], rec["val_acc"], _ = evaluate(model, data.val, spec.eval_batch_size)
            else:
                rec["val_loss"] = rec["val_acc"] = None
            if self._wants_test(epoch, rec["val_acc"], final):
                rec["test_loss"], rec["test_acc"], _ = evaluate(
                    model, data.test, spec.eval_batch_size
                )
            else:
                rec["test_loss"] = rec["test_acc"] = None
            if spec.test_every == 0 and epoch >= 1 and self._new_best(rec["val_acc"]):
                self.best_state = (
                    epoch,
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                )
            if rec["test_acc"] is not None and (spec.eval_train or data.noisy is not None):
                loss, acc, hits = evaluate(model, data.train, spec.eval_batch_size)
                rec["train_eval_loss"], rec["train_eval_acc"] = loss, acc
                if data.noisy is not None:
                    noisy = to_device(data.noisy, hits.device)
                    rec["noisy_count"] = int(noisy.sum())
                    for name, mask in (("clean", ~noisy), ("noisy", noisy)):
                        rec[f"train_acc_{name}"] = (
                            100.0 * float(hits[mask].float().mean()) if bool(mask.any()) else None
                        )
        rec["trace"] = _finite(self.trace())
        rec["trace_fb"] = _finite(
            _minibatch_trace(model, self.probe_x[: spec.batch_size], spec.seed + 40_009)
        )
        pv = getattr(self.opt, "penalty_value", None)
        rec["penalty_value"] = None if pv is None else _finite(float(pv))
        rec["refreshes"] = getattr(self.opt, "refreshes", None)
        rec["spikes"] = getattr(self.opt, "spikes", None)
        if spec.noise_covariance is not None:
            nn_ = getattr(self.opt, "noise_norm", None)
            rec["noise_norm"] = None if nn_ is None else _finite(float(nn_))
            total, steps = self.epoch_noise
            rec["noise_norm_mean"] = _finite(total / steps) if steps else None
            ft = getattr(self.opt, "fisher_trace", None)
            rec["fisher_trace"] = None if ft is None else _finite(float(ft))
            rec["noise_refreshes"] = getattr(self.opt, "refreshes", None)
        if spec.track_groups and data.noisy is not None:
            idx = self.group_idx
            x, y = self._batch(idx, "none")
            rec.update(_group_stats(model, x, y, to_device(data.noisy[idx], self.device)))
        rec["eval_time"] = time.perf_counter() - t0
        return rec

    def trace(self) -> float:
        return _fisher_trace(
            self.model, self.probe_x, self.spec.trace_labels, self.spec.seed + 50_021
        )

    # ---------------------------------------------------------------- training
    def _set_alpha(self, epoch: int) -> None:
        if self.spec.penalty is None:
            return
        alpha = self.spec.alpha if epoch >= self.spec.fp_start_epoch else 0.0
        for group in self.opt.param_groups:
            group[WEIGHT_KEY] = alpha

    def _batch(self, idx: Tensor | slice, augment: str) -> tuple[Tensor, Tensor]:
        """The inputs and labels of the training examples ``idx``, on the device (a data set
        on the host is augmented there, then moved)."""
        ds = self.data.train
        x = ds.batch(idx, augment, self.gen)
        return to_device(x, self.device), to_device(ds.labels[idx], self.device)

    def _step(self, idx: Tensor) -> None:
        """One training step on the examples ``idx``; reads nothing back (see the class
        doc): its statistics are added to ``self.acc``."""
        spec, model = self.spec, self.model
        x, y = self._batch(idx, spec.augment)
        model.train()
        loss_fn = None  # cross-entropy
        if spec.method == "mixup":
            lam = float(self.mix_rng.beta(spec.alpha, spec.alpha))
            other = torch.randperm(len(idx), generator=self.gen, device=self.gen.device)
            other = other.to(x.device)
            x = lam * x + (1 - lam) * x[other]

            def loss_fn(out: Tensor, labels: Tensor) -> Tensor:  # the mixed pair's loss
                return lam * F.cross_entropy(out, labels) + (1 - lam) * F.cross_entropy(
                    out, labels[other]
                )

        needs_targets = (
            isinstance(self.opt, FisherPenaltySGD) and self.opt.penalty.needs_targets
        ) or (spec.noise_covariance is not None and spec.noise_fisher == "empirical")
        lr = self.opt.param_groups[0]["lr"]
        refreshes = self.opt.refreshes if isinstance(self.opt, FisherPenaltySGD) else None
        out, loss = runner.train_step(
            self.forward,
            self.opt,
            self.precision,
            x,
            y,
            loss_fn,
            (lambda: self.opt.set_targets(y)) if needs_targets else None,
        )
        if refreshes is not None and self.opt.refreshes != refreshes:
            self._log_refresh()
        b = len(idx)
        lv = loss.detach().double()
        hits = (out.detach().argmax(1) == y).sum().double()
        noise = _noise_norm(self.opt, lv.device) if spec.noise_covariance is not None else None
        step = torch.stack(
            [
                lv * b,
                hits,
                lv,
                lv.new_zeros(()) if noise is None else noise.double(),
                lv.new_full((), float(noise is not None)),
            ]
        )
        self.acc[:_BAD] += step
        first = self.acc[_BAD]
        self.acc[_BAD] = torch.where(
            (first == 0) & ~torch.isfinite(lv), float(self.global_step + 1), first
        )
        if spec.log_every_update:
            rec: dict[str, Any] = {
                "step": self.global_step + 1,
                "epoch": self.epoch + (self.step_in_epoch + 1) / self._steps_per_epoch(),
                "lr": lr,
                "batch": b,
            }
            values = torch.stack(
                [lv, hits, lv.new_full((), math.nan) if noise is None else noise.double()]
            )
            self.pending.append((rec, values))
        self.sums["count"] += b
        self.sums["win_n"] += 1
        self.global_step += 1

    def _flush_updates(self) -> None:
        """The per-update records of ``log_every_update``, read from the device at once."""
        if not self.pending:
            return
        values = torch.stack([v for _, v in self.pending]).tolist()
        for (rec, _), (loss, hits, noise) in zip(self.pending, values):
            b = rec.pop("batch")
            rec.update(loss=_finite(loss), train_err=100.0 * (1.0 - hits / b))
            if self.spec.noise_covariance is not None:
                rec["noise_norm"] = _finite(noise)
            self.updates.append(rec)
        self.pending = []

    def _log_refresh(self) -> None:
        """One record per penalty refresh: its Tr(F_B), ``||∇P||`` and the safeguard's call."""
        opt = self.opt
        guard = getattr(opt, "guard", None)
        self.refresh_log.append(
            {
                "step": self.global_step,
                "epoch": self.epoch + self.step_in_epoch / self._steps_per_epoch(),
                "value": _finite(opt.penalty_value) if opt.penalty_value is not None else None,
                "grad_norm": (
                    None if opt.penalty_grad_norm is None else _finite(opt.penalty_grad_norm)
                ),
                "skipped": opt.skipped_refreshes,
                "scale": None if guard is None else guard.last_scale,
            }
        )

    def _steps_per_epoch(self) -> int:
        n, bs = len(self.data.train), self.spec.batch_size
        if self.spec.noise_covariance is not None and 0 < n % bs <= self.spec.small_batch_size:
            return n // bs  # FisherNoiseSGD needs M_L > M_S: drop the small final batch
        return math.ceil(n / bs)

    def train(self, deadline: float | None, checkpoint: Callable[[], None]) -> str:
        """Train to the end, checkpointing after every epoch. Returns the run's status:
        "complete", "interrupted" (``deadline`` passed, even mid-epoch; resumable) or
        "diverged" (a non-finite training loss, seen at the next log point: the epoch is
        logged and training stops, since the weights cannot recover)."""
        spec, ds = self.spec, self.data.train
        n, bs = len(ds), spec.batch_size
        if not self.logs:  # epoch 0: the measurement at initialisation
            self.epoch_noise = (0.0, 0)
            self.logs.append(
                {
                    "epoch": 0,
                    "lr": spec.lr,
                    "alpha": spec.alpha,
                    "train_loss": None,
                    "train_acc": None,
                    **self.measure(),
                }
            )
        write_jsonl(self.out / METRICS, self.logs)
        steps = self._steps_per_epoch()
        while self.epoch < spec.epochs:
            e = self.epoch + 1
            self._set_alpha(e)
            if self.perm is None:
                self.perm = shuffled_order(n, self.gen, self.data_device)
                self.step_in_epoch = 0
                self.sums = {"count": 0, "win_n": 0, "time": 0.0, "wall": 0.0}
                self.acc = self._zeros()
            wall0 = time.perf_counter() - self.sums["wall"]
            bar = runner.progress_bar(
                steps, self.step_in_epoch, f"{spec.name} ep {e}/{spec.epochs}", self.progress
            )
            diverged = False
            t0 = time.perf_counter()
            while self.step_in_epoch < steps:
                s = self.step_in_epoch
                self._step(self.perm[s * bs : (s + 1) * bs])
                self.step_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                k = spec.trace_every_steps
                if k > 0 and self.global_step % k == 0:  # a log point
                    win, bad = self.acc[[_WIN, _BAD]].tolist()
                    self.sums["time"] += time.perf_counter() - t0
                    self.traces.append(
                        {
                            "step": self.global_step,
                            "epoch": self.global_step / steps,
                            "window_loss": win / max(self.sums["win_n"], 1),
                            "trace": _finite(self.trace()),
                        }
                    )
                    self.acc[_WIN] = 0.0
                    self.sums["win_n"] = 0
                    t0 = time.perf_counter()
                    if bad:
                        diverged = True
                        break
                if runner.past(deadline) and self.step_in_epoch < steps:
                    if bar is not None:
                        bar.close()
                    self.sums["time"] += time.perf_counter() - t0
                    self.sums["wall"] = time.perf_counter() - wall0
                    return INTERRUPTED
            # the epoch's log point: one read of the training statistics
            loss, correct, _, noise, noise_steps, bad = self.acc.tolist()
            self.sums["time"] += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            diverged = diverged or bad > 0
            self.epoch_noise = (noise, int(noise_steps))
            self._flush_updates()
            train_time = self.sums["time"]
            count = max(self.sums["count"], 1)
            rec = {
                "epoch": e,
                "lr": self.opt.param_groups[0]["lr"],
                "alpha": self.opt.param_groups[0].get(WEIGHT_KEY, spec.alpha),
                "train_loss": _finite(loss / count),
                "train_acc": 100.0 * correct / count,
                **self.measure(e, final=diverged or e == spec.epochs),
                "train_time": train_time,
                "images_per_s": self.sums["count"] / train_time if train_time > 0 else None,
            }
            rec["epoch_time"] = train_time + rec["eval_time"]
            # everything the epoch took (steps, Tr(F) probes, evaluation), for the overhead
            rec["wall_time"] = time.perf_counter() - wall0
            if diverged:
                rec["diverged_at_step"] = int(bad)
            self.sched.step()
            self.logs.append(rec)
            self.epoch, self.perm, self.step_in_epoch = e, None, 0
            self.write_logs()
            if diverged:
                checkpoint()
                return DIVERGED
            if runner.past(deadline) and self.epoch < spec.epochs:
                return INTERRUPTED
            checkpoint()
        return COMPLETE

    def write_logs(self) -> None:
        """Write the log files and print the last epoch's line."""
        spec, out = self.spec, self.out
        write_jsonl(out / METRICS, self.logs)
        if self.traces:
            write_jsonl(out / TRACE, self.traces)
        if self.refresh_log:
            write_jsonl(out / REFRESHES, self.refresh_log)
        if spec.log_every_update:
            write_jsonl(out / TRAIN_CURVE, self.updates)
        if self.log:
            r = self.logs[-1]
            self.log(
                f"[{spec.name}] epoch {r['epoch']}/{spec.epochs} "
                f"loss {_fmt(r['train_loss'], '.4f')} train {r['train_acc']:.2f} "
                f"val {_fmt(r.get('val_acc'))} test {_fmt(r.get('test_acc'))} "
                f"Tr(F) {_fmt(r.get('trace'), '.3g')} "
                f"{r['epoch_time']:.1f}s {r.get('images_per_s') or 0:.0f} img/s"
            )

    def summary(self, status: str) -> dict[str, Any]:
        """Evaluate the kept best-validation weights (``test_every=0``) and summarize."""
        self.test_best()
        write_jsonl(self.out / METRICS, self.logs)
        if status == DIVERGED and self.log:
            self.log(
                f"[{self.spec.name}] diverged (non-finite training loss) at step "
                f"{self.logs[-1]['diverged_at_step']}; stopped"
            )
        return summarize(self.spec, self.logs, self.traces, status)


def _noise_norm(opt: torch.optim.Optimizer, device: torch.device) -> Tensor | None:
    """FisherNoiseSGD's last noise norm as the tensor it keeps on the device (its public
    ``noise_norm`` is a float: reading it waits for the device)."""
    value = vars(opt).get("_noise_norm")
    if value is None or isinstance(value, Tensor):
        return value
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def train_run(
    spec: RunSpec,
    data: DataBundle,
    out_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    extend: bool = False,
    progress: bool = True,
    deadline: float | None = None,
    log: Callable[[str], None] | None = print,
    compile: bool = False,
    data_on_device: str = "auto",
) -> dict[str, Any]:
    """Train one run and write its files in ``out_dir`` (see the module doc), by
    :func:`benchmarks.common.runner.execute`.

    Args:
        spec: the run.
        data: its data, placed by :func:`place_data` with ``data_on_device``.
        resume: continue from ``out_dir/checkpoint.pt`` if present, and return the existing
            summary if the run already finished; without it an existing run is restarted.
        extend: as ``resume``, and a checkpoint whose spec differs only in its schedule
            (``epochs``, ``milestones``; see :func:`schedule_change_error`) continues on
            ``spec``'s, finished or not: a run is lengthened without retraining its epochs.
        progress: a tqdm bar per epoch (only when stderr is a terminal).
        deadline: a :func:`benchmarks.common.runner.clock` value; past it the run
            checkpoints (even mid-epoch) and returns ``{"status": "interrupted", ...}``:
            rerun with ``resume=True``.
        log: where one line per epoch is printed (None: silent).
        compile: train through ``torch.compile(model)``.

    Returns:
        The summary (also written to ``summary.json``), :func:`summarize`.
    """
    device = torch.device(device)
    folder = RunFolder(out_dir, spec.to_dict(), key="spec")
    data = place_data(data, device, data_on_device)

    def start() -> _Run:
        run = _Run(
            spec,
            data,
            folder.path,
            device,
            extend=extend,
            progress=progress,
            compile=compile,
            log=log,
        )
        if data.noisy is not None:
            torch.save(
                {
                    "noisy": data.noisy.cpu(),
                    "clean_labels": data.clean_labels.cpu(),
                    "labels": data.train.labels.cpu(),
                },
                folder.path / "noise.pt",
            )
        return run

    out = runner.execute(
        folder,
        start,
        resume=resume or extend,
        deadline=deadline,
        map_location=device,
        name=spec.name,
        log=log,
    )
    if out["status"] == INTERRUPTED:
        out["epochs_done"] = out["epoch"]
    return out


def run_many(
    specs: Sequence[RunSpec],
    data: DataBundle,
    root: str | os.PathLike,
    *,
    pack: int = 1,
    deadline: float | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Train ``specs`` into ``root/<spec.name>`` by :func:`benchmarks.common.runner.sweep`,
    one after the other, stopping at the first interrupted run (time limit); uses the
    module-level :func:`train_run` (patchable).

    With ``pack > 1``, ``pack`` processes train at once on the same device (see ``sweep``):
    the data travel on the host and each run places it on the device, and a process prints
    its own lines (no progress bar: :func:`benchmarks.common.runner.progress_bar`).
    """
    root = Path(root)
    if pack > 1 and len(specs) > 1:
        data = data.to("cpu")
        kwargs = dict(kwargs, device=str(kwargs.get("device", "cpu")))
        kwargs.pop("log", None)
    jobs = [runner.Job(train_run, spec, data, root / spec.name, **kwargs) for spec in specs]
    results, _ = runner.sweep(jobs, deadline=deadline, pack=pack, folder=root)
    return results

"""Experiment and run configurations for the benchmark scripts.

An :class:`ExperimentConfig` is what a script declares (the paper's setting: dataset, model,
schedule, weight decay, the guessed η*, which methods and learning rates the table row uses):
only the values that differ from the defaults of :class:`RunSpec`'s fields and
:class:`SweepOptions`' options, which declare every setting once.
The command line (:mod:`benchmarks.common.cli`) turns it into a list of :class:`RunSpec` -
one fully specified training run each - which :mod:`benchmarks.common.harness` trains.

Conventions (all configurable from the command line):

* Epochs are counted from 1; epoch 0 in the logs is the measurement at initialisation.
* ``--epochs E`` shortens a run: LR milestones ``m`` (given for the paper's ``epochs``) become
  ``max(1, round(m * E / epochs))`` (:func:`scale_milestones`), so a 30-epoch run of a
  300-epoch setting decays at epochs 15 and 22 instead of 150 and 225.
* η* (``lr_star``): the paper tunes it on a grid of 5 learning rates log-spaced in
  [1e-2, 1] but does not report the chosen values; each script carries a guess (0.1 unless
  noted), overridable with ``--lr-star`` or an explicit ``--lrs``. Table 1 uses η*/10
  (η*/30 for TinyImageNet) and η*; Table 2 (``--augment``) uses η*.
* α grid (``--alpha-grid``): 10 (TinyImageNet: 5) values log-spaced in ``[0.1 v, 10 v]``
  with ``v = 0.01`` for FP, GP and GPr and ``v = gpx_center`` for GPx; a script may give
  explicit grids instead (the label-noise experiment does). For ``mixup`` the "alpha" of a
  run is the Beta(β, β) parameter β.
* Large-batch noise experiments (Wen et al., AISTATS 2020; ``benchmarks/large_batch_noise.py``):
  methods ``noise_trace``/``noise_diag``/``noise_full`` train with ``FisherNoiseSGD``
  (``small_batch_size`` = M_S, ``noise_fisher``, ``noise_every``); ``ghost_batch_size > 0``
  converts the BatchNorm layers of runs with a larger batch to Ghost BatchNorm; with
  ``lr_scaling`` ("linear"/"sqrt") the learning rate of a run with batch size ``B`` is
  ``lr · (B / lr_base_batch)`` (or its square root), capped at ``lr_cap``. Every new field
  has a default that leaves the other experiments (and their run names / config.json)
  exactly as before.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

from benchmarks.common import runner
from benchmarks.common.data import AUGMENTATIONS as AUGMENT_MODES
from benchmarks.common.models import INITS, MODELS
from fisher_optim import MODES
from fisher_optim.cli import (
    add_options,
    fraction,
    nonnegative_float,
    nonnegative_int,
    option,
    option_fields,
    positive_float,
    positive_int,
)
from fisher_optim.curvature import LABEL_MODES

#: Training methods: name -> FisherPenaltySGD ``penalty`` (None: plain SGD).
PENALTY_OF_METHOD: dict[str, str | None] = {
    "baseline": None,
    "mixup": None,
    "fp": "fisher",
    "gp": "gradient",
    "gpr": "random_label",
    "gpx": "input_gradient",
    "noise_trace": None,
    "noise_diag": None,
    "noise_full": None,
}
#: Large-batch noise methods (Wen et al., 2020): name -> FisherNoiseSGD ``covariance``.
NOISE_OF_METHOD: dict[str, str] = {
    "noise_trace": "trace",
    "noise_diag": "diagonal",
    "noise_full": "full",
}
METHODS = tuple(PENALTY_OF_METHOD)
#: Methods whose hyper-parameter ``alpha`` is tuned (mixup's is the Beta parameter β).
TUNED_METHODS = ("fp", "gp", "gpr", "gpx", "mixup")
#: The paper's loss thresholds ε for Tr(F_i) (ImageNet's value is used for TinyImageNet).
LOSS_THRESHOLDS = {"cifar10": 1.2, "cifar100": 3.5, "tinyimagenet": 3.5}
LR_SCALINGS = ("none", "linear", "sqrt")
#: ``--amp``: the precisions of mixed-precision training.
AMP_MODES = ("bf16", "fp16")
NOISE_FISHERS = ("true", "empirical")


#: The paper's SimpleCNN / CIFAR-10 setting (App. I.2), shared by the scripts that use it: the
#: rest is the RunSpec defaults (300 epochs, ×0.1 at 150 and 225, batch 128, momentum 0.9; the
#: weight decay is not stated in the paper: 0) and η* = 0.1, a guess (see the module docstring).
SIMPLECNN_CIFAR10: dict[str, Any] = {"dataset": "cifar10", "model": "simplecnn"}


def log_grid(low: float, high: float, n: int) -> tuple[float, ...]:
    """``n`` values log-spaced in ``[low, high]`` (rounded to 4 significant digits)."""
    if n == 1:
        return (float(f"{math.sqrt(low * high):.4g}"),)
    step = (math.log10(high) - math.log10(low)) / (n - 1)
    return tuple(float(f"{10 ** (math.log10(low) + i * step):.4g}") for i in range(n))


def scale_milestones(milestones: tuple[int, ...] | list[int], full: int, epochs: int) -> list[int]:
    """Milestones given for a ``full``-epoch run, scaled proportionally to ``epochs``.

    ``max(1, round(m * epochs / full))``; milestones that land at or beyond ``epochs`` are
    dropped (they would never fire), duplicates are merged.
    """
    if epochs == full:
        return [m for m in milestones if m < epochs]
    out = sorted({max(1, round(m * epochs / full)) for m in milestones})
    return [m for m in out if m < epochs]


def vgg_milestones(epochs: int = 300, start: int = 80, every: int = 40) -> tuple[int, ...]:
    """The VGG-11 schedule: ×0.1 every ``every`` epochs from epoch ``start``."""
    return tuple(range(start, epochs, every))


#: The ``--help`` sections of the experiments' options.
WHAT, SETTING, NOISE, MEASURE = (
    "what to run",
    "training setting",
    "large-batch noise (Wen et al., AISTATS 2020)",
    "measurements",
)


def spike_factor_value(text: str) -> float | None:
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


@dataclass
class RunSpec:
    """Everything that defines one training run (saved in its ``config.json``).

    The fields made by :func:`~fisher_optim.cli.option` are also the command
    line's options (:mod:`benchmarks.common.cli`; an experiment's ``ExperimentConfig``
    field of the same name gives the default of its script)."""

    experiment: str
    dataset: str = option(
        help="train on another data set than the paper's setting (its loss "
        "threshold ε follows unless --loss-threshold is given)",
        choices=("cifar10", "cifar100", "tinyimagenet"),
        group=SETTING,
    )
    model: str = option(
        help=f"network, of: {', '.join(sorted(MODELS))} (see benchmarks/common/models.py)",
        choices=sorted(MODELS),
        metavar="MODEL",
        group=SETTING,
    )
    method: str
    lr: float
    alpha: float = 0.0
    seed: int = 0
    epochs: int = option(
        300,
        lambda cfg: (
            f"epochs; the setting's LR milestones "
            f"{list(cfg.milestones)} (for {cfg.epochs} epochs) are scaled to it"
        ),
        type=positive_int,
        group=SETTING,
    )
    milestones: tuple[int, ...] = (150, 225)
    gamma: float = 0.1
    weight_decay: float = option(
        0.0, "L2 weight decay of SGD", type=nonnegative_float, group=SETTING
    )
    momentum: float = 0.9
    batch_size: int = option(128, "mini-batch size", type=positive_int, group=SETTING)
    augment: str = "none"
    every: int = option(
        10,
        "recompute the penalty gradient every N steps",
        type=positive_int,
        metavar="N",
        group=SETTING,
    )
    penalty_batch_size: int | None = option(
        None,
        "compute the penalty on the first N examples of the batch",
        unset="the whole batch",
        type=positive_int,
        metavar="N",
        group=SETTING,
    )
    fd_mode: str = option(
        "exact", "how FisherPenaltySGD computes the penalty gradient", choices=MODES, group=SETTING
    )
    fp_start_epoch: int = 1
    label_noise: float = option(
        0.0,
        "fraction of training labels replaced by random labels, in [0, 1]",
        flag="--noise",
        type=fraction,
        metavar="FRACTION",
        group=WHAT,
    )
    probe_size: int = option(
        128,
        "Tr(F) on the first N training examples",
        unset="the batch size",
        type=positive_int,
        metavar="N",
        group=MEASURE,
    )
    trace_labels: str = option(
        "sample",
        "Tr(F) with sampled labels (fixed generator) or summed over classes",
        choices=LABEL_MODES,
        group=MEASURE,
    )
    trace_every_steps: int = option(
        0,
        "also measure Tr(F) every N steps (finer Tr(F_i)); 0: per epoch",
        type=nonnegative_int,
        metavar="N",
        group=MEASURE,
    )
    loss_threshold: float = option(
        1.2,
        "ε of Tr(F_i): the Tr(F) of the first measurement whose training loss is below ε",
        type=positive_float,
        group=MEASURE,
    )
    bn_refresh_batches: int = option(
        0,
        "re-estimate BatchNorm statistics on N train batches "
        "before evaluating (0: keep the running statistics)",
        type=nonnegative_int,
        metavar="N",
        group=SETTING,
    )
    eval_batch_size: int = 500
    eval_train: bool = option(
        False,
        lambda cfg: (
            "also evaluate the whole training set every "
            "epoch (eval mode)" + (" (default: on in this setting)" if cfg.eval_train else "")
        ),
        action="store_true",
        group=MEASURE,
    )
    track_groups: bool = False
    group_probe_size: int = option(
        1000,
        "examples for clean/noisy gradient norms (label-noise runs)",
        type=positive_int,
        metavar="N",
        group=MEASURE,
    )
    # Noise experiments (defaults: absent from to_dict(), so older runs keep their config).
    small_batch_size: int = option(
        128,
        "M_S: the small batch whose gradient noise the noise_* "
        "methods imitate (they run only at batch sizes above it)",
        type=positive_int,
        group=NOISE,
    )
    noise_fisher: str = option(
        "empirical",
        "noise_*: empirical Fisher (true labels, the paper) "
        "or true Fisher (labels sampled from the model)",
        flag="--fisher",
        choices=NOISE_FISHERS,
        group=NOISE,
    )
    noise_every: int = option(
        1,
        "noise_trace/noise_diag: re-estimate the Fisher every N steps "
        "(1: every step, the paper; noise_full always uses 1)",
        type=positive_int,
        metavar="N",
        group=NOISE,
    )
    ghost_batch_size: int = option(
        0,
        "Ghost BatchNorm with this virtual batch for runs with a larger batch (0: plain BatchNorm)",
        type=nonnegative_int,
        group=NOISE,
    )
    log_every_update: bool = option(
        False,
        "write train_curve.jsonl: loss and error of every update's batch",
        action=argparse.BooleanOptionalAction,
        group=NOISE,
    )
    #: Evaluate the test set (and, with label noise, the training set) every N epochs, at
    #: the last epoch and at every new best validation accuracy, so test@best-val is exact;
    #: 0: at the last epoch only, and once more at the end on a copy of the weights of the
    #: best validation epoch (kept in memory and in the checkpoint): the same numbers, with
    #: one test pass instead of one per new best.
    test_every: int = option(
        1,
        "evaluate test (and noisy-train) accuracy every N epochs, at "
        "the last epoch and at each new best validation accuracy; 0: at "
        "the last epoch, plus once at the end on the kept best-validation "
        "weights (the same test@best-val, one test pass per run)",
        type=nonnegative_int,
        metavar="N",
        group=MEASURE,
    )
    #: Measure validation accuracy and the epoch's Tr(F) probe every N epochs (and at the
    #: last epoch); 1: every epoch. Model selection sees only the measured epochs.
    val_every: int = option(
        1,
        "measure validation accuracy and the epoch's Tr(F) every N "
        "epochs and at the last epoch (model selection sees only those "
        "epochs)",
        type=positive_int,
        metavar="N",
        group=MEASURE,
    )
    #: FisherPenaltySGD's spike safeguard factor (None: off, the paper's algorithm; runs
    #: made before the safeguard existed read as None; the command line's default is 4).
    spike_factor: float | None = option(
        None,
        "FisherPenaltySGD's spike safeguard: a refreshed penalty gradient over this many "
        "times the running median norm is scaled down to that bound and used for one step "
        "only; 'none' turns it off (the paper's FP)",
        type=spike_factor_value,
        metavar="F",
        group=MEASURE,
    )
    #: FisherPenaltySGD's ``guard_early``: the first refreshes (no median yet) are used once.
    guard_early: bool = option(
        False,
        "FisherPenaltySGD(guard_early=True): the first 5 "
        "refreshes, before a median exists, are each used for one step "
        "only",
        action="store_true",
        group=MEASURE,
    )
    #: Initialisation of the model's conv and linear layers (one of ``models.INITS``).
    init: str = option(
        "kaiming",
        "initialisation of the conv and linear layers: kaiming (the "
        "models' own), torch (PyTorch's layer default) or glorot (Keras's "
        "default); the paper does not state its own, and the scale of Tr(F) "
        "depends on it",
        choices=INITS,
        group=SETTING,
    )
    #: Mixed precision of the training forward (None: float32): ``torch.autocast`` with
    #: bfloat16, or float16 with a ``GradScaler``.
    amp: str | None = option(
        None,
        "train under torch.autocast in this precision (fp16 with a "
        "GradScaler, which reads its inf check back every step; bf16 "
        "reads nothing); evaluation and the curvature measurements (Tr(F), "
        "eigenvalues) stay in float32",
        unset="float32",
        choices=AMP_MODES,
        group=SETTING,
    )

    def __post_init__(self) -> None:
        if self.method not in PENALTY_OF_METHOD:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}")
        for f in option_fields(RunSpec):  # the options' choices hold for any RunSpec
            choices, value = f.metadata["argparse"].get("choices"), getattr(self, f.name)
            if (
                choices is not None
                and value not in choices
                and not (value is None and f.default is None)
            ):
                raise ValueError(f"{f.name} must be one of {tuple(choices)}, got {value!r}")
        if self.guard_early and self.spike_factor is None:
            raise ValueError("--guard-early needs the spike safeguard: drop --spike-factor none")
        if self.test_every < 0:
            raise ValueError(
                f"test_every must be >= 0 (0: only at new best validation "
                f"accuracy and the last epoch), got {self.test_every}"
            )
        if self.val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {self.val_every}")
        self.milestones = tuple(int(m) for m in self.milestones)

    @property
    def noise_covariance(self) -> str | None:
        """The FisherNoiseSGD covariance of this run's method (None: not a noise method)."""
        return NOISE_OF_METHOD.get(self.method)

    @property
    def ghost(self) -> bool:
        """Whether this run converts its BatchNorm layers to Ghost BatchNorm."""
        return 0 < self.ghost_batch_size < self.batch_size

    @property
    def penalty(self) -> str | None:
        """The FisherPenaltySGD penalty of this run's method (None: plain SGD / mixup)."""
        return PENALTY_OF_METHOD[self.method]

    @property
    def name(self) -> str:
        """Directory name: ``<method>_lr<lr>_a<alpha>_s<seed>`` plus variant suffixes."""
        parts = [f"{self.method}", f"lr{self.lr:g}"]
        if self.method != "baseline" and self.method not in NOISE_OF_METHOD:
            parts.append(f"a{self.alpha:g}")
        parts.append(f"s{self.seed}")
        if self.fp_start_epoch != 1:
            parts.append(f"start{self.fp_start_epoch}")
        if self.batch_size != 128:
            parts.append(f"bs{self.batch_size}")
        if self.augment != "none":
            parts.append(f"aug-{self.augment}")
        if self.label_noise:
            parts.append(f"noise{self.label_noise:g}")
        if self.init != "kaiming":
            parts.append(f"init-{self.init}")
        if self.amp is not None:
            parts.append(f"amp-{self.amp}")
        if self.spike_factor is not None and self.penalty is not None:
            parts.append(f"guard{self.spike_factor:g}" + ("e" if self.guard_early else ""))
        if self.noise_covariance is not None:
            if self.small_batch_size != 128:
                parts.append(f"ms{self.small_batch_size}")
            if self.noise_fisher != "empirical":
                parts.append(f"F{self.noise_fisher}")
            if self.noise_every != 1:
                parts.append(f"ev{self.noise_every}")
        if self.ghost and self.ghost_batch_size != 128:
            parts.append(f"gbn{self.ghost_batch_size}")
        return "_".join(parts)

    @property
    def group_key(self) -> tuple[Any, ...]:
        """Runs that differ only in ``alpha`` and ``seed`` share this key (one table cell)."""
        d = asdict(self)
        for k in ("alpha", "seed"):
            d.pop(k)
        return tuple(sorted((k, str(v)) for k, v in d.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        for f in fields(self):
            if f.name not in FIRST_SPEC_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: The RunSpec fields of the first experiments' ``config.json``. A field added since is left
#: out of ``to_dict()`` at its default: the ``config.json`` / checkpoint spec of every other
#: run stays as before, so ``--resume`` keeps recognising runs started by older code.
FIRST_SPEC_FIELDS = frozenset(
    (
        "experiment",
        "dataset",
        "model",
        "method",
        "lr",
        "alpha",
        "seed",
        "epochs",
        "milestones",
        "gamma",
        "weight_decay",
        "momentum",
        "batch_size",
        "augment",
        "every",
        "penalty_batch_size",
        "fd_mode",
        "fp_start_epoch",
        "label_noise",
        "probe_size",
        "trace_labels",
        "trace_every_steps",
        "loss_threshold",
        "bn_refresh_batches",
        "eval_batch_size",
        "eval_train",
        "track_groups",
        "group_probe_size",
    )
)


#: The options every script takes: where and how it computes (``--device``, ``--compile``,
#: ``--pack``: :class:`~benchmarks.common.runner.DeviceOptions`) and its precision
#: (``--amp``: :class:`RunSpec`'s).
SHARED_OPTIONS = ("device", "compile", "amp", "pack")


def add_shared_options(
    parser: argparse.ArgumentParser,
    *,
    refused: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add :data:`SHARED_OPTIONS` to a script's ``parser``; ``refused``: those the script
    declares but cannot honour, each with why (see :func:`fisher_optim.cli.add_options`).
    Returns the ``--help`` sections, as :func:`~fisher_optim.cli.add_options` does."""
    groups = add_options(parser, RunSpec, only=("amp",), refused=refused, groups=groups)
    only = [n for n in SHARED_OPTIONS if n != "amp"]
    return add_options(
        parser, runner.DeviceOptions, only=only, refused=refused, defaults=defaults, groups=groups
    )


#: What ``--quick`` sets (unless given explicitly).
QUICK = {
    "train_subset": 1000,
    "val_size": 500,
    "test_subset": 500,
    "epochs": 3,
    "probe_size": 32,
    "group_probe_size": 200,
    "bn_refresh_batches": 4,
}


def _default_lrs_text(cfg: ExperimentConfig) -> str:
    """What a plain run's learning rates are (mirrors :func:`_run_pairs`)."""
    if cfg.lr_factors:
        return "every method at " + ", ".join(
            "η*" if f == 1 else f"{f:g}·η*" for f in cfg.lr_factors
        )
    if cfg.lrs:
        return "every method at " + " ".join(f"{lr:g}" for lr in cfg.lrs)
    return f"the table's: baseline at η*, the others at η*/{cfg.small_lr_divisor:g}"


def _default_alphas_text(cfg: ExperimentConfig) -> str:
    methods = [
        m
        for m in dict.fromkeys((*cfg.default_methods, *cfg.augment_methods))
        if m not in ("baseline", "mixup") and m not in NOISE_OF_METHOD
    ]
    if not methods:
        return "none of this setting's methods is penalised"
    return "each method's own: " + ", ".join(f"{m} {cfg.default_alpha(m):g}" for m in methods)


def _augment_runs_text(cfg: ExperimentConfig) -> str:
    lrs = ", ".join("η*" if f == 1 else f"{f:g}·η*" for f in cfg.augment_lr_factors)
    return f"{' '.join(cfg.augment_methods)} at {lrs}"


#: The ``--help`` section of the data options.
DATA = "data"


@dataclass
class SweepOptions:
    """The options that choose an invocation's runs and how they are made (each run's own
    settings are :class:`RunSpec`'s option fields). One field per option; the script's
    :class:`ExperimentConfig` field of the same name is its default (except for ``resolved``
    ones: their None means the setting's own field of that name, resolved by
    :func:`~benchmarks.common.cli.make_specs`), and a help text that is a function is given
    that config."""

    methods: list[str] | None = option(
        None,
        lambda cfg: (
            f"training methods, of: {', '.join(METHODS)} (default: "
            f"{' '.join(cfg.default_methods)}, each at the table's learning rate)"
        ),
        nargs="+",
        choices=METHODS,
        metavar="METHOD",
        group=WHAT,
    )
    lrs: list[float] | None = option(
        None,
        lambda cfg: (
            f"learning rates, each crossed with every method (default: {_default_lrs_text(cfg)})"
        ),
        nargs="+",
        type=positive_float,
        metavar="LR",
        group=WHAT,
        tags=("resolved",),
    )
    lr_star: float = option(
        0.1,
        "η*, the paper's tuned large learning rate (a guess; see config)",
        type=positive_float,
        group=WHAT,
    )
    alpha: float | None = option(
        None,
        lambda cfg: f"single α for every penalised method (default: {_default_alphas_text(cfg)})",
        type=nonnegative_float,
        group=WHAT,
    )
    alpha_grid: bool = option(
        False,
        "search α on the paper's grid and choose it by validation accuracy",
        action="store_true",
        group=WHAT,
    )
    alphas: list[float] | None = option(
        None,
        "with --alpha-grid: search these α (one grid for every penalised method; "
        "default: the paper's 10 log-spaced values per method)",
        nargs="+",
        type=nonnegative_float,
        metavar="ALPHA",
        group=WHAT,
    )
    alpha_center: float = option(
        0.01, "v of the α grid [0.1v, 10v] for FP, GP, GPr", type=positive_float, group=WHAT
    )
    gpx_center: float = option(
        100.0, "v of the α grid [0.1v, 10v] for GPx", type=positive_float, group=WHAT
    )
    mixup_beta: float | None = option(
        None,
        lambda cfg: f"mixup's Beta(β, β) parameter (default: {cfg.default_alpha('mixup'):g})",
        type=positive_float,
        group=WHAT,
    )
    seeds: list[int] | None = option(
        None,
        "seeds, one run each (default: --seed)",
        nargs="+",
        type=nonnegative_int,
        metavar="SEED",
        group=WHAT,
    )
    seed: int = option(0, "seed of a single-seed run", type=nonnegative_int, group=WHAT)
    augment: str | None = option(
        None,
        lambda cfg: (
            "augmentation (standard: random crop + flip; the bare flag means "
            f"standard); giving it makes Table 2's runs: {_augment_runs_text(cfg)} (default: "
            f"{cfg.augment}, the plain run's methods)"
        ),
        nargs="?",
        const="standard",
        choices=AUGMENT_MODES,
        group=WHAT,
        tags=("resolved",),
    )
    fp_start_epochs: list[int] | None = option(
        None,
        lambda cfg: (
            "switch FP on at these epochs, one run each (Fig. 3; default: "
            + (
                " ".join(map(str, cfg.fp_start_epochs))
                if cfg.fp_start_epochs
                else "from the first epoch"
            )
            + ")"
        ),
        nargs="+",
        type=positive_int,
        metavar="EPOCH",
        group=WHAT,
        tags=("resolved",),
    )
    batch_sizes: list[int] | None = option(
        None,
        lambda cfg: (
            "sweep batch sizes, one run each (default: "
            + (" ".join(map(str, cfg.batch_sizes)) if cfg.batch_sizes else "--batch-size")
            + ")"
        ),
        nargs="+",
        type=positive_int,
        metavar="B",
        group=WHAT,
        tags=("resolved",),
    )
    milestones: list[int] | None = option(
        None,
        lambda cfg: (
            f"multiply the LR by {cfg.gamma:g} at these epochs of this run (each "
            "in 1..EPOCHS-1); the bare flag keeps the LR constant (default: the setting's "
            "milestones, scaled to --epochs)"
        ),
        nargs="*",
        type=positive_int,
        metavar="EPOCH",
        group=SETTING,
        tags=("resolved",),
    )
    lr_scaling: str = option(
        "none",
        "scale each run's learning rate by (B / --lr-base-batch) "
        "(linear) or its square root (sqrt), B the run's batch size",
        choices=LR_SCALINGS,
        group=NOISE,
    )
    lr_base_batch: int = option(
        128, "batch size at which the learning rate is not scaled", type=positive_int, group=NOISE
    )
    lr_cap: float | None = option(
        None,
        "upper bound of the scaled learning rate",
        unset="no cap",
        type=positive_float,
        group=NOISE,
    )
    batch_lrs: list[float] | None = option(
        None,
        "explicit learning rate per batch size (aligned with --batch-sizes; overrides "
        "--lrs/--lr-star and --lr-scaling; default: not used)",
        nargs="+",
        type=positive_float,
        metavar="LR",
        group=NOISE,
    )
    data_root: str | None = option(
        None,
        "dataset directory/archive",
        unset="$FISHER_OPTIM_DATA, else ~/.cache/fisher_optim/data",
        group=DATA,
    )
    download: bool = option(
        False,
        "download the data set into --data-root if it is not there "
        "(CIFAR-10/100, TinyImageNet; the checksum is verified)",
        action="store_true",
        group=DATA,
    )
    train_subset: int | None = option(
        None,
        "use N training examples (after holding out validation)",
        unset="all",
        type=positive_int,
        metavar="N",
        group=DATA,
    )
    val_size: int = option(
        5000,
        "validation examples held out of the training set (0: none)",
        type=nonnegative_int,
        group=DATA,
    )
    test_subset: int | None = option(
        None, "evaluate on N test examples", unset="all", type=positive_int, metavar="N", group=DATA
    )
    split_seed: int = option(
        0, "seed of the validation split, subsets and label noise", type=nonnegative_int, group=DATA
    )
    extend: bool = option(
        False,
        "as --resume, and lengthen runs trained on a shorter "
        "schedule: a run whose checkpoint differs only in "
        "--epochs/--milestones, with the same milestones over the epochs it "
        "has done, continues on the new schedule",
        action="store_true",
        group=runner.RUNNING,
    )
    quick: bool = option(
        False,
        "CPU smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
        action="store_true",
        group=runner.RUNNING,
    )
    dry_run: bool = option(
        False, "list the runs and exit", action="store_true", group=runner.RUNNING
    )


#: Command-line (and setting) defaults that differ from the RunSpec field's default, which
#: is what a ``config.json`` of a run made before the option existed means; a None
#: ``loss_threshold`` is the data set's ε (:data:`LOSS_THRESHOLDS`).
CLI_DEFAULTS = {"spike_factor": 4.0, "probe_size": None, "loss_threshold": None}
#: RunSpec fields that :func:`~benchmarks.common.cli.make_specs` sets per run (not a setting).
PER_RUN = ("experiment", "method", "lr", "alpha", "seed", "fp_start_epoch")


def _setting_fields() -> list[tuple[str, Any, Any]]:
    """The fields of a setting: RunSpec's (but :data:`PER_RUN`), then SweepOptions' option
    fields (but those resolved from the setting's own fields), each with the field's default
    (or its :data:`CLI_DEFAULTS` one), for :func:`dataclasses.make_dataclass`."""
    declared = [f for f in fields(RunSpec) if f.name not in PER_RUN] + [
        f for f in option_fields(SweepOptions) if "resolved" not in f.metadata["tags"]
    ]
    out: dict[str, tuple[str, Any, Any]] = {}
    for f in declared:
        if f.name in CLI_DEFAULTS:
            default = field(default=CLI_DEFAULTS[f.name])
        elif f.default_factory is not MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=f.default)  # MISSING: required (dataset, model)
        out.setdefault(f.name, (f.name, f.type, default))
    return list(out.values())


#: An experiment's setting: one field per RunSpec field and per SweepOptions option, with
#: their defaults (declared there, once); a script gives only the values its setting changes.
Setting = make_dataclass("Setting", _setting_fields(), kw_only=True)


@dataclass(kw_only=True)
class ExperimentConfig(Setting):
    """One experiment of the paper, as a script declares it.

    The setting's fields (:data:`Setting`: ``dataset``, ``model``, ``epochs``,
    ``batch_size``, ``lr_star``, ...; every :class:`RunSpec` field and every
    :class:`SweepOptions` option) are declared by those classes, with their defaults; a
    script gives the values the paper's setting changes, and each is the default of the
    option of its name (``milestones`` are for ``epochs`` epochs and scaled to ``--epochs``).
    The fields below say what a plain ``python benchmarks/<script>.py`` runs (the table row).
    """

    name: str
    description: str = ""
    #: Table 1's small learning rate is ``lr_star / small_lr_divisor`` (30 for TinyImageNet).
    small_lr_divisor: float = 10.0
    #: Methods of a plain run: the baseline at η*, these at η*/``small_lr_divisor``...
    default_methods: tuple[str, ...] = ("baseline", "fp", "gp", "gpr", "gpx")
    #: ...unless learning rates are given as multiples of η* (every method at each)...
    lr_factors: tuple[float, ...] = ()
    #: ...or as absolute values (Fig. 2).
    lrs: tuple[float, ...] = ()
    #: Which runs ``--augment`` (Table 2) makes: η* with and without FP.
    augment_methods: tuple[str, ...] = ("baseline", "fp")
    augment_lr_factors: tuple[float, ...] = (1.0,)
    alpha_grid_size: int = 10
    #: Explicit α grids per method (override the log-spaced ones).
    alpha_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Single α per method when no grid is searched (default: the grid's center).
    alpha_defaults: dict[str, float] = field(default_factory=dict)
    #: FP switched on from these epochs (Fig. 3); empty: not a start-epoch experiment.
    fp_start_epochs: tuple[int, ...] = ()
    #: Batch sizes to sweep (Fig. 2); empty: just ``batch_size``.
    batch_sizes: tuple[int, ...] = ()
    #: "curves" (val acc / Tr(F) vs epoch) or "scatter" (Tr(F_i) vs final test accuracy).
    figure: str = "curves"

    @property
    def threshold(self) -> float:
        """ε for Tr(F_i): ``loss_threshold`` or the paper's value for the dataset."""
        if self.loss_threshold is not None:
            return self.loss_threshold
        return LOSS_THRESHOLDS.get(self.dataset, 1.2)

    def default_alpha(self, method: str) -> float:
        """The single α (β for mixup) of ``method`` when no grid is searched."""
        if method in self.alpha_defaults:
            return self.alpha_defaults[method]
        if method == "mixup":
            return 1.0
        if method == "gpx":
            return self.gpx_center
        if method in PENALTY_OF_METHOD and PENALTY_OF_METHOD[method] is not None:
            return self.alpha_center
        return 0.0

    def alpha_values(self, method: str) -> tuple[float, ...]:
        """The α values searched for ``method`` by ``--alpha-grid`` (``(0.0,)`` if untuned)."""
        if method in self.alpha_grids:
            return tuple(self.alpha_grids[method])
        if method not in TUNED_METHODS:
            return (0.0,)
        center = (
            self.default_alpha(method)
            if method == "mixup"
            else (self.gpx_center if method == "gpx" else self.alpha_center)
        )
        return log_grid(0.1 * center, 10.0 * center, self.alpha_grid_size)

    def with_overrides(self, **kwargs: Any) -> ExperimentConfig:
        """A copy with some fields replaced (unknown names raise ``TypeError``)."""
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown ExperimentConfig fields: {sorted(unknown)}")
        return replace(self, **kwargs)

"""A byte-level causal language model on the Python standard library's sources, with and
without the Fisher penalty.

The corpus (:mod:`benchmarks.common.text`) is every top-level ``*.py`` file of this Python's
standard library, split by file (every ``--val-every-file``-th file, in name order, is
validation). Each method trains the same :class:`~benchmarks.common.text.ByteTransformerLM`
from the same initialisation (``--seed``) on the same sequence of batches (a generator seeded
by ``--seed``): ``baseline`` with the base optimizer alone, ``fp`` with ``FisherPenaltySGD``
wrapping the same base optimizer (one run per ``--alphas`` value). Every ``--eval-every`` steps it records the validation loss
(mean next-byte cross-entropy, nats), perplexity ``exp(loss)``, bits per byte and Tr(F) on a
fixed probe of training windows (``fisher_trace``, one label per position sampled from the
model by a generator re-seeded identically at every measurement).

Writes ``OUT/<method>_s<seed>/metrics.jsonl`` and ``summary.json`` per run, and
``OUT/results.json``, ``OUT/results.md`` and ``OUT/figure.png``. ``--time-limit MINUTES``
checkpoints and stops (exit code 3); rerun the same command with ``--resume`` to continue
(on CPU the result is bitwise that of an uninterrupted run).

``--device`` (the corpus, a few MB, lives there; the data order is drawn on the host, so a
run sees the same batches on every device), ``--compile`` (the training forward through
``torch.compile``; the penalty and the measurements use the eager model, which shares its
parameters), ``--amp bf16|fp16`` (the training step under ``torch.autocast``; part of the
run, whose folder gets an ``_amp-<precision>`` suffix; validation loss and Tr(F) are
measured in float32) and ``--pack N`` (N runs at once, one process each) are the shared
runner's (``benchmarks/common/runner.py``). An ordinary training step reads nothing back
from the device: its loss is summed there and read at the log points.

    python benchmarks/lm_stdlib.py --threads 1
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import runner  # noqa: E402
from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.runner import COMPLETE, DIVERGED, INTERRUPTED  # noqa: E402
from fisher_optim import MODES  # noqa: E402
from fisher_optim.cli import (  # noqa: E402
    HelpFormatter,
    add_options,
    integer,
    nonnegative_float,
    nonnegative_int,
    option,
    positive_float,
    positive_int,
    real,
    tagged,
)

NAME = "lm_stdlib"
METHODS = ("baseline", "fp")
OPTIMIZERS = ("adamw", "sgd")
METRICS = "metrics.jsonl"


_WHAT, _MODEL, _DATA = "what to run", "model (ByteTransformerLM)", "data and measurements"


@dataclass
class LMOptions:
    """The command line: one field per option. ``run``-tagged options determine every run's
    numbers, ``fp``-tagged ones those of the fp runs (a checkpoint of another configuration
    is refused)."""

    methods: list[str] = option(
        list(METHODS),
        "baseline: the base optimizer; fp: FisherPenaltySGD around it",
        nargs="+",
        choices=METHODS,
        group=_WHAT,
    )
    seed: int = option(
        0,
        "seed of the initialisation, the data order and the penalty's labels",
        type=nonnegative_int,
        group=_WHAT,
        tags=("run",),
    )
    steps: int = option(1500, "optimizer steps", type=positive_int, group=_WHAT, tags=("run",))
    batch_size: int = option(
        32, "sequences per step", type=positive_int, group=_WHAT, tags=("run",)
    )
    optimizer: str = option(
        "adamw",
        "base optimizer: AdamW (betas 0.9, 0.99) or SGD with momentum 0.9",
        choices=OPTIMIZERS,
        group=_WHAT,
        tags=("run",),
    )
    lr: float = option(1e-3, "learning rate", type=positive_float, group=_WHAT, tags=("run",))
    weight_decay: float = option(
        0.0,
        "weight decay of the base optimizer",
        type=nonnegative_float,
        group=_WHAT,
        tags=("run",),
    )
    alphas: list[float] = option(
        [0.1],
        "fp: the penalty weight α, one fp run per value",
        nargs="+",
        type=positive_float,
        group=_WHAT,
    )
    every: int = option(
        10,
        "fp: recompute the penalty gradient every N steps",
        type=positive_int,
        group=_WHAT,
        tags=("fp",),
    )
    fd_mode: str = option(
        "exact",
        "fp: how the penalty gradient is computed",
        choices=MODES,
        group=_WHAT,
        tags=("fp",),
    )
    spike_factor: float | None = option(
        None,
        "fp: FisherPenaltySGD's spike safeguard (scale down a refresh whose Tr(F_B) "
        "exceeds this many times the recent median), a number > 1 (default: off, the paper's "
        "algorithm)",
        type=real(1.0, low_open=True),
        group=_WHAT,
        tags=("fp",),
    )

    context: int = option(64, "bytes per sequence", type=positive_int, group=_MODEL, tags=("run",))
    dim: int = option(128, "embedding width", type=positive_int, group=_MODEL, tags=("run",))
    layers: int = option(2, "transformer blocks", type=positive_int, group=_MODEL, tags=("run",))
    heads: int = option(
        4, "attention heads (divide --dim)", type=positive_int, group=_MODEL, tags=("run",)
    )

    val_every_file: int = option(
        10,
        "every N-th stdlib file (name order) is validation (N ≥ 2)",
        type=integer(2),
        group=_DATA,
        tags=("run",),
    )
    max_bytes: int | None = option(
        None,
        "cut the training and the validation text at N bytes each (default: all of it)",
        type=positive_int,
        group=_DATA,
        tags=("run",),
    )
    eval_every: int = option(
        100,
        "measure validation loss and Tr(F) every N steps (and at steps 0 and --steps)",
        type=positive_int,
        group=_DATA,
        tags=("run",),
    )
    val_windows: int = option(
        256,
        "validation windows, evenly spaced over the validation text",
        type=positive_int,
        group=_DATA,
        tags=("run",),
    )
    probe_size: int = option(
        64,
        "Tr(F) probe: this many training windows, evenly spaced",
        type=positive_int,
        group=_DATA,
        tags=("run",),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line (every default shown by ``--help``)."""
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{NAME}.py",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=HelpFormatter,
    )
    groups = add_options(p, LMOptions, runner.RunningOptions, defaults={"out": f"runs/{NAME}"})
    add_shared_options(p, groups=groups)  # (no --data-on-device: the corpus lives there)
    return p


# ------------------------------------------------------------------------------ training
def _run_config(args: argparse.Namespace, method: str, alpha: float = 0.0) -> dict[str, Any]:
    """What determines a run's numbers (a checkpoint of another configuration is refused)."""
    config = {"method": method, **{k: getattr(args, k) for k in tagged(LMOptions, "run")}}
    if method == "fp":
        config.update(alpha=alpha, **{k: getattr(args, k) for k in tagged(LMOptions, "fp")})
    if args.amp is not None:  # (left out in float32: the runs made before --amp resume)
        config["amp"] = args.amp
    return config


def run_name(config: dict[str, Any]) -> str:
    """``baseline_s<seed>`` or ``fp_a<alpha>_s<seed>``, then ``_amp-<precision>`` with
    ``--amp``."""
    alpha = f"_a{config['alpha']:g}" if config["method"] == "fp" else ""
    amp = f"_amp-{config['amp']}" if config.get("amp") else ""
    return f"{config['method']}{alpha}_s{config['seed']}{amp}"


def _base_optimizer(args: argparse.Namespace) -> tuple[type, dict[str, Any]]:
    import torch

    if args.optimizer == "adamw":
        return torch.optim.AdamW, {
            "lr": args.lr,
            "betas": (0.9, 0.99),
            "weight_decay": args.weight_decay,
        }
    return torch.optim.SGD, {"lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay}


class LMRun:
    """One training run: model, optimizer, data generator, logs (checkpointed as a whole), a
    :class:`~benchmarks.common.runner.Trainable`, on ``device``; ``compile``: the training
    forward through ``torch.compile`` (the optimizer's penalty and the measurements use the
    eager model, which shares its parameters)."""

    def __init__(
        self,
        config: dict[str, Any],
        corpus: Any,
        out: Path,
        progress: bool = True,
        device: str = "cpu",
        compile: bool = False,
    ) -> None:
        self.progress = progress
        import torch

        from benchmarks.common.text import ByteTransformerLM
        from fisher_optim import FisherPenaltySGD

        device = torch.device(device)
        self.config, self.corpus, self.out = config, corpus.to(device), out
        torch.manual_seed(config["seed"])
        self.model = ByteTransformerLM(
            config["context"], config["dim"], config["layers"], config["heads"]
        ).to(device)
        self.forward = torch.compile(self.model) if compile else self.model
        self.precision = runner.Precision(config.get("amp"), device)
        base, kwargs = _base_optimizer(argparse.Namespace(**config))
        if config["method"] == "fp":  # on the module the step calls (it sees its forwards)
            self.opt = FisherPenaltySGD(
                self.forward,
                base,
                alpha=config["alpha"],
                every=config["every"],
                mode=config["fd_mode"],
                spike_factor=config["spike_factor"],
                seed=config["seed"],
                **kwargs,
            )
        else:
            self.opt = base(self.model.parameters(), **kwargs)
        self.data_gen = torch.Generator().manual_seed(config["seed"])
        self.val = self.corpus.val_windows(config["val_windows"], config["context"])
        self.probe = self.corpus.probe_windows(config["probe_size"], config["context"])[:, :-1]
        self.step = 0
        self.window = {"loss": 0.0, "count": 0, "time": 0.0}
        self.logs: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:

        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "data_gen": self.data_gen.get_state(),
            **runner.random_state(),
            **self.precision.state_dict(),
            "step": self.step,
            "window": dict(self.window),
            "logs": self.logs,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:

        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.data_gen.set_state(st["data_gen"])
        runner.set_random_state(st)
        self.precision.load_state_dict(st)
        self.step, self.window, self.logs = st["step"], dict(st["window"]), st["logs"]

    def resume_error(self, saved: dict[str, Any]) -> str:
        return f"it was made with {saved['config']}"

    def position(self) -> dict[str, int]:
        return {"step": self.step}

    def val_loss(self) -> float:
        """Mean next-byte cross-entropy (nats) over every position of the validation windows."""
        import torch

        from benchmarks.common.text import token_cross_entropy

        total, count = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for chunk in self.val.split(64):
                logits = self.model(chunk[:, :-1])
                total += float(token_cross_entropy(logits, chunk[:, 1:], reduction="sum"))
                count += chunk[:, 1:].numel()
        self.model.train(was_training)
        return total / count

    def measure(self) -> dict[str, Any]:
        import torch

        from fisher_optim.curvature import fisher_trace
        from fisher_optim.integrations.tracking import optimizer_metrics

        loss = self.val_loss()
        trace = fisher_trace(
            self.model, self.probe, labels="sample", generator=torch.Generator().manual_seed(0)
        )
        w = self.window
        row = {
            "step": self.step,
            "train_loss": float(w["loss"]) / w["count"] if w["count"] else None,
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "val_bpb": loss / math.log(2),
            "trace": trace,
            "train_time": w["time"],
        }
        row.update(optimizer_metrics([self.opt], prefix=""))  # FisherPenaltySGD's counters
        self.window = {"loss": 0.0, "count": 0, "time": 0.0}
        return row

    def train(self, deadline: float | None, checkpoint: Callable[[], None]) -> str:
        """Train to ``config["steps"]``; ``"complete"``, ``"diverged"`` or ``"interrupted"``
        (the checkpoint is the runner's, at the end)."""
        try:
            return self._train(deadline)
        finally:
            runner.write_jsonl(self.out / METRICS, self.logs)

    def _train(self, deadline: float | None) -> str:
        from benchmarks.common.text import token_cross_entropy

        cfg = self.config
        if not self.logs:
            self.logs.append(self.measure())
        self.model.train()
        bar = None
        while self.step < cfg["steps"]:
            if bar is None:  # one bar per stretch between log points
                every = cfg["eval_every"]
                end = min(cfg["steps"], (self.step // every + 1) * every)
                bar = runner.progress_bar(
                    end - self.step // every * every,
                    self.step % every,
                    f"{cfg['method']} to step {end}",
                    self.progress,
                )
            if runner.past(deadline):
                if bar is not None:
                    bar.close()
                return INTERRUPTED
            begin = time.perf_counter()
            batch = self.corpus.train_batch(cfg["batch_size"], cfg["context"], self.data_gen)
            _, loss = runner.train_step(
                self.forward,
                self.opt,
                self.precision,
                batch[:, :-1],
                batch[:, 1:],
                token_cross_entropy,
            )
            self.step += 1
            # summed on the device, read at the log point: a step reads nothing back
            self.window["loss"] = self.window["loss"] + loss.detach().double()
            self.window["count"] += 1
            self.window["time"] += time.perf_counter() - begin
            if bar is not None:
                bar.update(1)
            if self.step % cfg["eval_every"] == 0 or self.step == cfg["steps"]:
                if bar is not None:
                    bar.close()
                bar = None
                value = float(self.window["loss"]) / self.window["count"]
                if runner.diverged(value):  # seen at the log point
                    self.logs.append({"step": self.step, "train_loss": value, "diverged": True})
                    return DIVERGED
                self.logs.append(self.measure())
                r = self.logs[-1]
                print(
                    f"[{cfg['method']}] step {r['step']}/{cfg['steps']} train "
                    f"{r['train_loss']:.4f} val {r['val_loss']:.4f} (ppl {r['val_ppl']:.3f}) "
                    f"Tr(F) {r['trace']:.4g}",
                    flush=True,
                )
                runner.write_jsonl(self.out / METRICS, self.logs)
        return COMPLETE

    def summary(self, status: str) -> dict[str, Any]:
        rows = [r for r in self.logs if "val_loss" in r]
        best = min(rows, key=lambda r: r["val_loss"])
        return {
            "status": status,
            "config": self.config,
            "final": rows[-1],
            "best_val_loss": best["val_loss"],
            "best_val_ppl": best["val_ppl"],
            "best_step": best["step"],
            "max_trace": max(r["trace"] for r in rows),
            "train_seconds": sum(r["train_time"] for r in rows),
        }


def run_one(
    config: dict[str, Any],
    corpus: Any,
    out: Path,
    *,
    resume: bool,
    deadline: float | None,
    progress: bool = True,
    device: str = "cpu",
    compile: bool = False,
) -> dict[str, Any]:
    """Train one run into ``out`` (:func:`benchmarks.common.runner.execute`) and return its
    summary, or ``{"status": "interrupted", ...}``."""
    return runner.execute(
        runner.RunFolder(out, config),
        lambda: LMRun(config, corpus, out, progress, device, compile),
        resume=resume,
        deadline=deadline,
        keep_checkpoint=False,
        name=config["method"],
    )


# ------------------------------------------------------------------------------ report
def results_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per run, final and best validation numbers and Tr(F)."""
    lines = [
        "| method | final val loss | final val ppl | best val loss (step) | final Tr(F) | "
        "max Tr(F) | train s (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        f = s["final"]
        lines.append(
            f"| {run_name(s['config'])} | {f['val_loss']:.4f} | {f['val_ppl']:.3f} | "
            f"{s['best_val_loss']:.4f} ({s['best_step']}) | {f['trace']:.4g} | "
            f"{s['max_trace']:.4g} | {s['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(run_dirs: Sequence[Path], labels: Sequence[str], out_png: Path) -> Path:
    """Validation loss and Tr(F) against steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common.plots import save_figure

    fig, (ax_loss, ax_tr) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in zip(run_dirs, labels):
        rows = [r for r in runner.read_jsonl(run_dir / METRICS) if "val_loss" in r]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["val_loss"] for r in rows], marker=".", label=label)
        ax_tr.plot(steps, [r["trace"] for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="step", ylabel="validation loss (nats / byte)")
    ax_tr.set(xlabel="step", ylabel="Tr(F) on the probe windows", yscale="log")
    for ax in (ax_loss, ax_tr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every method, write the results and the figure. Exit code 0, or 3 when
    ``--time-limit`` stopped it (rerun with ``--resume``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error(f"--heads ({args.heads}) must divide --dim ({args.dim})")
    import torch

    from benchmarks.common.harness import resolve_device
    from benchmarks.common.text import load_stdlib_corpus

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    start = time.perf_counter()
    deadline = runner.deadline_after(args.time_limit)
    corpus = load_stdlib_corpus(args.val_every_file, args.max_bytes)
    info = corpus.describe()
    print(
        f"corpus: {info['train_files']} train files ({info['train_bytes']} bytes), "
        f"{info['val_files']} validation files ({info['val_bytes']} bytes) from "
        f"{info['source']} (Python {info['python']})"
    )
    root = Path(args.out)
    configs = [_run_config(args, "baseline")] if "baseline" in args.methods else []
    if "fp" in args.methods:
        configs += [_run_config(args, "fp", alpha) for alpha in args.alphas]
    jobs = [
        runner.Job(
            run_one,
            config,
            corpus,
            root / run_name(config),
            resume=args.resume,
            progress=not args.no_progress,
            device=device,
            compile=args.compile,
        )
        for config in configs
    ]
    summaries, complete = runner.sweep(jobs, deadline=deadline, pack=args.pack, folder=root)
    if not complete:
        print(runner.STOPPED)
        return runner.EXIT_INTERRUPTED
    table = results_table(summaries)
    runner.write_json(
        root / "results.json",
        {"experiment": NAME, "corpus": info, "args": vars(args), "runs": summaries},
    )
    (root / "results.md").write_text(table + "\n")
    print(table)
    if not args.no_plot:
        dirs = [root / run_name(s["config"]) for s in summaries]
        labels = [
            s["config"]["method"]
            if s["config"]["method"] == "baseline"
            else f"fp (α={s['config']['alpha']:g}, every={s['config']['every']})"
            for s in summaries
        ]
        print(f"figure: {plot(dirs, labels, root / 'figure.png')}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU campaign: one prepared command that proves the CUDA paths and trains the paper's
budget, in at most ``--budget-s`` seconds (default 540, 9 minutes) on one GPU.

Parts, in order (``--parts`` picks some; each gets a share of the budget and hands what it
does not use to the next):

* ``tests`` - ``pytest tests/test_device.py tests/test_host_syncs.py`` with
  ``FISHER_OPTIM_TEST_DEVICES=cpu,cuda`` (the CUDA test subset); pass/fail counts from its
  JUnit XML.
* ``overhead`` - Table 5's comparison: step time of FP at every=10 and every=1 (exact and
  finite difference) over plain SGD on the paper's five networks, by
  ``benchmarks/overhead.py``'s interleaved timer (median of rounds, CUDA-synchronised), plus
  the host syncs of 20 FP steps (``benchmarks/common/syncs.py``).
* ``curvature`` - ``fisher_trace`` against a per-example loop and one batched
  forward+backward (``benchmarks/curvature_speed.py``).
* ``table1`` - the SimpleCNN / CIFAR-10 row of Table 1 at the paper's budget (45,000
  training images, 300 epochs, batch 128, ×0.1 at epochs 150 and 225; η* = 0.1 and the rest at
  η*/10; α at the centre of the paper's grid), as many runs as ``--workers`` processes packed
  on the GPU at once, each with the whole dataset resident on the GPU and no host sync in a
  training step other than the optimizer's one per penalty refresh. Every run checkpoints
  (every ``--checkpoint-every`` epochs and when the deadline comes) and resumes: run the
  command again (``--parts table1``) to continue where it stopped.

Everything lands in ``--out`` (default ``runs/gpu_campaign``); ``campaign.json`` is rewritten
after every part, so a command killed at its time limit still leaves what it measured.

    PYTHONPATH=$PWD python3 benchmarks/gpu_campaign.py --data-root data/cifar10-jpg.tar.xz \
        --pack $OUT                                      # on the GPU machine
    python benchmarks/gpu_campaign.py --dry-run          # CPU smoke test, tiny sizes
    python benchmarks/gpu_campaign.py --sizing           # FLOPs per step and the plan

``--pack DIR`` copies ``campaign.json`` to ``DIR`` and packs the table's runs into
``table1-N.tar`` files of at most 15 MiB; ``--unpack`` them on a fresh machine to resume.

Sizing (``--sizing``, docs/gpu-campaign.md): the FLOPs of one training step are counted on
the CPU (``torch.utils.flop_counter``), the GPU time per run is steps × FLOPs / the assumed
sustained throughput ``--tflops``, and the runs that fit are the table's time budget over it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import curvature_speed, overhead  # noqa: E402
from benchmarks.cifar10_simplecnn import CONFIG as SIMPLECNN  # noqa: E402
from benchmarks.common.config import RunSpec  # noqa: E402
from benchmarks.common.data import ImageDataset, iterate_batches  # noqa: E402
from benchmarks.common.harness import (  # noqa: E402
    DataBundle,
    build_optimizer,
    evaluate,
    prepare_data,
    resolve_device,
    summarize,
)
from benchmarks.common.models import build_model  # noqa: E402
from benchmarks.common.syncs import SyncCounter  # noqa: E402
from fisher_optim._cli import (  # noqa: E402
    HelpFormatter,
    nonnegative_int,
    positive_float,
    positive_int,
)
from fisher_optim.curvature import fisher_trace  # noqa: E402

PARTS = ("tests", "overhead", "curvature", "table1")
#: Share of the budget each part may use (what it leaves passes on; table1 takes the rest).
SHARES = {"tests": 120.0, "overhead": 80.0, "curvature": 40.0}
#: The least the table part is left by the others.
TABLE1_MIN_S = 240.0
#: Seconds kept back at the end for writing the summary.
MARGIN_S = 15.0
TEST_FILES = ("tests/test_device.py", "tests/test_host_syncs.py")
#: Table 5's networks (WResNet with BatchNorm for TinyImageNet, without for CIFAR-100).
OVERHEAD_MODELS = ("simplecnn", "vgg11", "wresnet44_3", "wresnet44_3_nobn", "densenet40_12")
OVERHEAD_VARIANTS = ("fp_fd_k10", "fp_exact_k10", "fp_fd_k1", "fp_exact_k1")
#: Table 1's columns as ``(method, η* divided by)``, most wanted first: the η*/10 baseline
#: and FP (the paper's claim), GPr, η*, GP, GPx.
TABLE1_RUNS = (("baseline", 10), ("fp", 10), ("gpr", 10), ("baseline", 1), ("gp", 10), ("gpx", 10))
#: Sustained training throughput assumed for the sizing (TFLOP/s, see the docs page).
DEFAULT_TFLOPS = 15.0
CAMPAIGN_JSON = "campaign.json"
#: Largest file ``--pack`` writes (the device tool brings back files of at most 16 MiB).
PACK_LIMIT = 15 * 2**20
RUN_STATE = "state.json"

#: What ``--dry-run`` sets: tiny sizes on the CPU, a few seconds per part.
DRY = {
    "tests": ["tests/test_device.py::test_per_example_grad_norms_match_a_loop"],
    "overhead_models": ["tiny"],
    "window": 1,
    "rounds": 1,
    "warmup": 0,
    "curvature_models": ["tiny"],
    "curvature_n": 8,
    "model": "tiny",
    "train": 96,
    "val": 32,
    "test": 64,
    "epochs": 2,
    "batch_size": 32,
}


# ----------------------------------------------------------------------------- sizing
def step_flops(model_name: str, variant: str, batch_size: int = 128) -> float:
    """FLOPs of one training step of ``variant`` (a key of ``overhead.VARIANTS``) on a
    CIFAR-shaped batch, counted on the CPU by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(model_name, 10)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(10, (batch_size,))
    step = overhead.make_step(model, overhead.VARIANTS[variant], x, y)
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def table1_sizing(
    tflops: float,
    budget_s: float,
    epochs: int = 300,
    train: int = 45_000,
    batch_size: int = 128,
    every: int = 10,
) -> dict[str, Any]:
    """Steps per run, GPU seconds per run at ``tflops`` and how many runs fit in the time
    the table part gets of ``budget_s``."""
    sgd = step_flops("simplecnn", "sgd", batch_size)
    refresh = step_flops("simplecnn", "fp_exact_k1", batch_size) - sgd  # exact, as the paper
    steps = epochs * math.ceil(train / batch_size)
    eval_flops = epochs * (5_000 + 10_000) * sgd / (3 * batch_size)  # forward ≈ step / 3
    per_run = {
        "baseline": (steps * sgd + eval_flops) / (tflops * 1e12),
        "penalised": (steps * (sgd + refresh / every) + eval_flops) / (tflops * 1e12),
    }
    table_s = budget_s - sum(SHARES.values()) - MARGIN_S  # if the others use all theirs
    row = 2 * per_run["baseline"] + 4 * per_run["penalised"]
    return {
        "model": "simplecnn",
        "batch_size": batch_size,
        "tflops_assumed": tflops,
        "gflop_per_sgd_step": sgd / 1e9,
        "gflop_per_exact_refresh": refresh / 1e9,
        "steps_per_run": steps,
        "gpu_s_per_run": per_run,
        "gpu_s_table1_row": row,
        "table_part_s": table_s,
        "runs_fitting": table_s / statistics.mean(per_run.values()),
        "row_fraction_fitting": table_s / row,
    }


# ----------------------------------------------------------------------------- parts
def run_tests(targets: Sequence[str], out: Path, timeout: float) -> dict[str, Any]:
    """The CUDA test subset in a subprocess; counts from its JUnit XML."""
    xml = out / "tests.xml"
    env = {**os.environ, "FISHER_OPTIM_TEST_DEVICES": "cpu,cuda", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *targets,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "-rs",
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1.0)
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc, tail = None, f"timed out after {timeout:.0f} s: {str(err.stdout)[-2000:]}"
    result: dict[str, Any] = {
        "command": " ".join(cmd),
        "returncode": rc,
        "output_tail": tail,
        "seconds": time.perf_counter() - start,
    }
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["cuda_ran"] = sum(
            1
            for case in suite.iter("testcase")
            if "cuda" in case.get("name", "") and case.find("skipped") is None
        )
    return result


def _sync_count(model_name: str, device: torch.device, steps: int = 20) -> dict[str, Any]:
    """Host syncs inside 20 FP (every=10) optimizer steps, and the training loop's whole."""
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(10, (128,), device=device)
    from fisher_optim import FisherPenaltySGD

    opt = FisherPenaltySGD(model, lr=1e-3, momentum=0.9, alpha=0.01, every=10)
    in_step = in_loop = cuda_step = cuda_loop = 0
    for _ in range(steps):
        with SyncCounter() as loop:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with SyncCounter() as step:
                opt.step()
        in_step += step.count
        in_loop += loop.count
        cuda_step += step.cuda_warnings  # the inner counter holds the step's CUDA warnings
        cuda_loop += loop.cuda_warnings + step.cuda_warnings
    return {
        "steps": steps,
        "every": 10,
        "syncs_in_opt_step": in_step,
        "syncs_in_training_loop": in_loop,
        "cuda_sync_warnings_in_opt_step": cuda_step,
        "cuda_sync_warnings_in_training_loop": cuda_loop,
    }


def run_overhead(
    models: Sequence[str],
    device: torch.device,
    deadline: float,
    *,
    window: int,
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    """``overhead.time_model`` per network while time is left; ratios to plain SGD."""
    results: dict[str, Any] = {
        "window": window,
        "rounds": rounds,
        "warmup": warmup,
        "models": {},
        "skipped": [],
    }
    for name in models:
        if time.monotonic() > deadline:
            results["skipped"].append(name)
            continue
        start = time.perf_counter()
        times = overhead.time_model(
            name, device, 128, window, rounds, warmup, list(OVERHEAD_VARIANTS)
        )
        results["models"][name] = {
            "ms_per_step": {v: 1e3 * t for v, t in times.items()},
            "ratio": {v: t / times["sgd"] for v, t in times.items()},
            "seconds": time.perf_counter() - start,
        }
        print(
            f"overhead {name}: "
            + ", ".join(f"{v} {t / times['sgd']:.2f}x" for v, t in times.items()),
            flush=True,
        )
    results["syncs"] = _sync_count(models[0], device)
    return results


def run_curvature(models: Sequence[str], device: torch.device, n: int, out: Path) -> dict:
    """``benchmarks/curvature_speed.py`` (loop, vmap, fisher_trace, batched), JSON back."""
    path = out / "curvature_speed.json"
    argv = [
        "--device",
        device.type,
        "--models",
        *models,
        "--n",
        str(n),
        "--repeats",
        "3",
        "--json",
        str(path),
    ]
    curvature_speed.main(argv)
    return {"argv": argv, **json.loads(path.read_text())}


# ----------------------------------------------------------------------------- table 1
def table1_specs(
    seeds: Sequence[int], *, model: str = "simplecnn", epochs: int = 300, batch_size: int = 128
) -> list[RunSpec]:
    """The row's runs (``TABLE1_RUNS`` × seeds, seed-major), SimpleCNN's paper settings."""
    cfg = SIMPLECNN
    milestones = tuple(m * epochs // cfg.epochs for m in cfg.milestones)
    specs = []
    for seed in seeds:
        for method, divisor in TABLE1_RUNS:
            specs.append(
                RunSpec(
                    experiment="gpu_campaign",
                    dataset=cfg.dataset,
                    model=model,
                    method=method,
                    lr=cfg.lr_star / divisor,
                    alpha=cfg.default_alpha(method),
                    seed=seed,
                    epochs=epochs,
                    milestones=milestones,
                    gamma=cfg.gamma,
                    weight_decay=cfg.weight_decay,
                    momentum=cfg.momentum,
                    batch_size=batch_size,
                    every=cfg.every,
                    fd_mode=cfg.fd_mode,
                    loss_threshold=cfg.threshold,
                )
            )
    return specs


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (RUN_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run_dir / RUN_STATE)


def train_sync_free(
    spec: RunSpec,
    data: DataBundle,
    run_dir: Path,
    device: torch.device,
    deadline: float,
    checkpoint_every: int = 10,
) -> dict[str, Any]:
    """Train ``spec`` to its last epoch or to ``deadline`` (checked between epochs),
    resuming from ``run_dir/checkpoint.pt``. A training step reads nothing back: the loss
    and the hits are summed on the device and read once per epoch, with the validation
    accuracy, Tr(F) on the first 128 training images, and the test accuracy at every new
    best validation accuracy (so test at best validation is exact) and at the last epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    ds = data.train
    model = build_model(spec.model, ds.num_classes, spec.init).to(device)
    opt = build_optimizer(spec, model)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.milestones), gamma=spec.gamma)
    gen = torch.Generator(device).manual_seed(spec.seed)
    logs: list[dict[str, Any]] = []
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"].cpu())
        logs = st["logs"]
    probe = iterate_batches(
        ds.images[:128], ds.labels[:128], 128, shuffle=False, mean=ds.mean, std=ds.std
    )
    probe_x = next(probe)[0]
    targets = spec.penalty in ("gradient", "input_gradient")

    def save() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "logs": logs,
            },
            ckpt,
        )

    status = "running"
    best_val = max((r["val_acc"] for r in logs), default=-1.0)
    while len(logs) < spec.epochs:
        times = [r["epoch_time"] for r in logs[-3:]]
        if times and time.monotonic() + statistics.mean(times) > deadline:
            status = "interrupted"
            break
        start = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss · b, hits
        model.train()
        for x, y in iterate_batches(
            ds.images, ds.labels, spec.batch_size, generator=gen, mean=ds.mean, std=ds.std
        ):
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if targets:
                opt.set_targets(y)
            opt.step()
            hits = (out.argmax(1) == y).sum().double()
            sums += torch.stack([loss.detach().double() * len(y), hits])
        sched.step()
        loss_sum, hits = sums.tolist()  # the epoch's one read of the training statistics
        train_time = time.perf_counter() - start
        val_loss, val_acc, _ = evaluate(model, data.val)
        rec: dict[str, Any] = {
            "epoch": len(logs) + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": loss_sum / len(ds) if math.isfinite(loss_sum) else None,
            "train_acc": 100.0 * hits / len(ds),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "trace": fisher_trace(model, probe_x, generator=torch.Generator(device).manual_seed(0)),
            "test_acc": None,
            "train_time": train_time,
            "images_per_s": len(ds) / train_time,
        }
        last = rec["epoch"] == spec.epochs or rec["train_loss"] is None
        if val_acc > best_val or last:
            rec["test_loss"], rec["test_acc"], _ = evaluate(model, data.test)
            best_val = max(best_val, val_acc)
        rec["epoch_time"] = time.perf_counter() - start
        logs.append(rec)
        if rec["train_loss"] is None:
            status = "diverged"
            break
        if rec["epoch"] % checkpoint_every == 0:
            save()
        _save_state(
            run_dir, {"name": spec.name, "epochs_done": len(logs), "status": status, "last": rec}
        )
    if status == "running":
        status = "complete"
    save()
    summary = summarize(spec, logs, [], "complete" if status == "complete" else status)
    summary["status"] = status
    summary["refreshes"] = getattr(opt, "refreshes", None)
    _save_state(
        run_dir, {"name": spec.name, "epochs_done": len(logs), "status": status, "summary": summary}
    )
    return summary


def _worker(
    rank: int,
    workers: int,
    specs: list[RunSpec],
    data: DataBundle | str,
    root: str,
    device: str,
    deadline_wall: float,
    checkpoint_every: int,
) -> None:
    """Train ``specs[rank::workers]`` one after the other. ``data``: the bundle, or the file
    it was saved to (processes do not share it through shared memory, which sandboxes keep
    small); ``deadline_wall``: a ``time.time()`` value (``time.monotonic`` is per process)."""
    deadline = time.monotonic() + (deadline_wall - time.time())
    dev = torch.device(device)
    torch.set_num_threads(1)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if isinstance(data, str):
        data = torch.load(data, weights_only=False)
    data = data.to(dev)
    for spec in specs[rank::workers]:
        run_dir = Path(root) / spec.name
        state = _read_state(run_dir)
        if state is not None and state.get("status") in ("complete", "diverged"):
            continue
        if time.monotonic() > deadline:
            break
        train_sync_free(spec, data, run_dir, dev, deadline, checkpoint_every)


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def run_table1(
    specs: list[RunSpec],
    data: DataBundle,
    root: Path,
    device: torch.device,
    deadline: float,
    workers: int,
    checkpoint_every: int,
) -> dict[str, Any]:
    """``workers`` processes train the runs at once; the row's state read back from disk."""
    import torch.multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline_wall = time.time() + (deadline - time.monotonic())
    workers = max(1, min(workers, len(specs)))
    if workers == 1:  # no process to start: train here
        threads = torch.get_num_threads()
        try:
            _worker(0, 1, specs, data, str(root), str(device), deadline_wall, checkpoint_every)
        finally:
            torch.set_num_threads(threads)
    else:
        shared = root.parent / "table1-data.pt"  # beside the runs, not packed with them
        torch.save(data, shared)
        try:
            mp.spawn(
                _worker,
                nprocs=workers,
                join=True,
                args=(
                    workers,
                    specs,
                    str(shared),
                    str(root),
                    str(device),
                    deadline_wall,
                    checkpoint_every,
                ),
            )
        finally:
            shared.unlink(missing_ok=True)
    runs = {s.name: _read_state(root / s.name) or {"status": "not started"} for s in specs}
    return {
        "workers": workers,
        "seconds": time.perf_counter() - start,
        "runs": runs,
        "row": table1_row(specs, runs),
    }


def table1_row(specs: Sequence[RunSpec], runs: dict[str, dict[str, Any]]) -> list[dict]:
    """Per column: test accuracy at the best validation epoch, mean ± sd over the finished
    seeds, and the epochs done by the unfinished ones."""
    rows = []
    for method, divisor in TABLE1_RUNS:
        lr = SIMPLECNN.lr_star / divisor
        mine = [s for s in specs if s.method == method and s.lr == lr]
        done = [runs[s.name]["summary"] for s in mine if runs[s.name].get("status") == "complete"]
        accs = [d["test_acc_at_best_val"] for d in done]
        rows.append(
            {
                "column": "η*" if divisor == 1 else method,
                "lr": lr,
                "seeds_complete": len(done),
                "test_acc_mean": statistics.mean(accs) if accs else None,
                "test_acc_sd": statistics.stdev(accs) if len(accs) > 1 else None,
                "epochs_done": {s.name: runs[s.name].get("epochs_done", 0) for s in mine},
            }
        )
    return rows


# ----------------------------------------------------------------------------- main
def _synthetic_data(train: int, val: int, test: int) -> tuple[ImageDataset, ImageDataset]:
    """Random CIFAR-shaped images (``--dry-run`` without ``--data-root``)."""
    g = torch.Generator().manual_seed(0)

    def make(n: int, name: str) -> ImageDataset:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return ImageDataset(images, torch.randint(10, (n,), generator=g), 10, name=name)

    return make(train + val, "synthetic-train"), make(test, "synthetic-test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_campaign.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        metavar="PART",
        help=f"what to run, of: {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--budget-s",
        type=positive_float,
        default=540.0,
        metavar="S",
        help="wall-clock budget of the whole command, in seconds",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="CIFAR-10 in any layout benchmarks/common/data.py reads, a folder or the "
        "cifar10-jpg.tar.xz archive (default: $FISHER_OPTIM_DATA, else "
        "~/.cache/fisher_optim/data; with --dry-run: synthetic images)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / "gpu_campaign",
        help="output folder (campaign.json, tests.xml, the table1 runs)",
    )
    parser.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=6,
        help="training processes packed on the GPU at once (table1)",
    )
    parser.add_argument(
        "--seeds",
        type=nonnegative_int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of the table1 runs (seed-major: every column of seed 0 first)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=10,
        metavar="EPOCHS",
        help="table1 checkpoints every this many epochs (and at the deadline)",
    )
    parser.add_argument(
        "--tflops",
        type=positive_float,
        default=DEFAULT_TFLOPS,
        help="sustained TFLOP/s assumed by --sizing",
    )
    parser.add_argument(
        "--sizing",
        action="store_true",
        help="print the FLOPs per step and the table1 plan, then stop",
    )
    parser.add_argument(
        "--sizing-models",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="with --sizing: also count the FLOPs of an SGD step and of an exact and a "
        "finite-difference refresh (every=1 steps) of these networks (default: none)",
    )
    parser.add_argument(
        "--pack",
        type=Path,
        default=None,
        metavar="DIR",
        help="at the end, copy campaign.json to DIR and pack the table's runs (checkpoints "
        "included) into table1-N.tar files of at most 15 MiB, e.g. --pack $OUT (default: "
        "nothing is packed)",
    )
    parser.add_argument(
        "--unpack",
        type=Path,
        nargs="+",
        default=[],
        metavar="TAR",
        help="first extract these table1-N.tar files (from --pack) into --out: the runs "
        "resume on a fresh machine (default: none)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU smoke test: tiny models, data and budgets (synthetic data without --data-root)",
    )
    return parser


def _write(out: Path, campaign: dict[str, Any]) -> None:
    tmp = out / (CAMPAIGN_JSON + ".tmp")
    tmp.write_text(json.dumps(campaign, indent=2, default=str) + "\n")
    os.replace(tmp, out / CAMPAIGN_JSON)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.sizing:
        plan = table1_sizing(args.tflops, args.budget_s)
        plan["gflop_per_step"] = {
            name: {v: step_flops(name, v) / 1e9 for v in ("sgd", "fp_exact_k1", "fp_fd_k1")}
            for name in args.sizing_models
        }
        print(json.dumps(plan, indent=2))
        return plan
    start = time.monotonic()
    end = start + args.budget_s - MARGIN_S
    device = resolve_device(args.device or "auto")
    dry = args.dry_run
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    unpack(args.unpack, out)
    campaign: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "dry_run": dry,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "budget_s": args.budget_s,
        "parts": {},
    }
    if (out / CAMPAIGN_JSON).is_file():  # a rerun keeps what earlier parts measured
        campaign["parts"] = json.loads((out / CAMPAIGN_JSON).read_text()).get("parts", {})

    def deadline(part: str) -> float:
        """Now + the part's share; when the time left is short of the shares of this part
        and those to come, each gets its proportion of it."""
        now = time.monotonic()
        later = [p for p in PARTS[PARTS.index(part) + 1 :] if p in args.parts]
        own = SHARES.get(part, math.inf)
        weights = SHARES.get(part, TABLE1_MIN_S) + sum(SHARES.get(p, TABLE1_MIN_S) for p in later)
        return now + min(own, (end - now) * SHARES.get(part, TABLE1_MIN_S) / weights)

    data = _DataLoad(args) if "table1" in args.parts else None  # decodes while tests run
    for part in PARTS:
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        print(f"== {part} ({end - time.monotonic():.0f} s left)", flush=True)
        try:
            result = _run_part(part, args, device, deadline, end, out, data)
        except Exception:  # noqa: BLE001 - one failing part must not cost the others
            result = {"error": traceback.format_exc()}
            print(result["error"], flush=True)
        result["part_seconds"] = time.perf_counter() - t0
        campaign["parts"][part] = result
        campaign["wall_s"] = time.monotonic() - start
        _write(out, campaign)
    print(f"campaign written to {out / CAMPAIGN_JSON} ({time.monotonic() - start:.0f} s)")
    if args.pack is not None:
        print("packed into", args.pack, ":", ", ".join(pack(out, args.pack)))
    return campaign


def _run_part(
    part: str,
    args: argparse.Namespace,
    device: torch.device,
    deadline: Callable[[str], float],
    end: float,
    out: Path,
    data: _DataLoad | None,
) -> dict[str, Any]:
    """One part of the campaign (see the module doc); its result for ``campaign.json``."""
    dry = args.dry_run
    if part == "tests":
        targets = DRY["tests"] if dry else list(TEST_FILES)
        return run_tests(targets, out, deadline(part) - time.monotonic())
    if part == "overhead":
        return run_overhead(
            DRY["overhead_models"] if dry else OVERHEAD_MODELS,
            device,
            deadline(part),
            window=DRY["window"] if dry else 5,
            rounds=DRY["rounds"] if dry else 3,
            warmup=DRY["warmup"] if dry else 3,
        )
    if part == "curvature":
        models = DRY["curvature_models"] if dry else ["simplecnn", "vgg11"]
        return run_curvature(models, device, DRY["curvature_n"] if dry else 256, out)
    return _table1(args, device, end, out, data)


def pack(out: Path, dest: Path, limit: int = PACK_LIMIT) -> list[str]:
    """Copy ``campaign.json`` to ``dest`` and the table's run folders (checkpoints included)
    into ``table1-N.tar`` files of at most ``limit`` bytes each (a run is never split), flat
    files the device tool brings back; ``--unpack`` them to resume on a fresh machine."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    if (out / CAMPAIGN_JSON).is_file():
        shutil.copy(out / CAMPAIGN_JSON, dest / CAMPAIGN_JSON)
        names.append(CAMPAIGN_JSON)
    table = out / "table1"
    runs = sorted(p for p in table.iterdir() if p.is_dir()) if table.is_dir() else []
    chunks: list[list[Path]] = []
    size = 0
    for run in runs:
        run_size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        if not chunks or size + run_size > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(run)
        size += run_size
    for i, chunk in enumerate(chunks):
        name = f"table1-{i}.tar"
        with tarfile.open(dest / name, "w") as tar:
            for run in chunk:
                tar.add(run, arcname=f"table1/{run.name}")
        names.append(name)
    return names


def unpack(archives: Sequence[Path], out: Path) -> None:
    """Extract ``table1-N.tar`` files written by :func:`pack` into ``out``."""
    for archive in archives:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            if any(not n.startswith("table1/") or ".." in Path(n).parts for n in names):
                raise ValueError(f"{archive} is not a table1 archive written by --pack")
            tar.extractall(out)


class _DataLoad:
    """The table's data, prepared in a background thread (the JPEG decode takes about half
    a minute, while the tests run in their own process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.result: list[DataBundle] = []
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._load, args=(args,), daemon=True)
        self.thread.start()

    def _load(self, args: argparse.Namespace) -> None:
        try:
            if args.dry_run:
                pair = (
                    None
                    if args.data_root
                    else _synthetic_data(DRY["train"], DRY["val"], DRY["test"])
                )
                self.result.append(
                    prepare_data(
                        pair or "cifar10",
                        args.data_root,
                        val_size=DRY["val"],
                        train_subset=DRY["train"],
                        test_subset=DRY["test"],
                    )
                )
            else:
                self.result.append(prepare_data("cifar10", args.data_root, val_size=5000))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error.append(err)

    def get(self) -> DataBundle:
        self.thread.join()
        if self.error:
            raise self.error[0]
        return self.result[0]


def _table1(
    args: argparse.Namespace, device: torch.device, end: float, out: Path, data: _DataLoad
) -> dict[str, Any]:
    if args.dry_run:
        specs = table1_specs(args.seeds[:1], epochs=DRY["epochs"], batch_size=DRY["batch_size"])
        specs = [replace(s, model=DRY["model"]) for s in specs[:2]]
    else:
        specs = table1_specs(args.seeds)
    bundle = data.get()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the earlier parts' cached blocks, for the workers
    result = run_table1(
        specs, bundle, out / "table1", device, end, args.workers, args.checkpoint_every
    )
    result["train_images"] = len(bundle.train)
    return result


if __name__ == "__main__":
    main()

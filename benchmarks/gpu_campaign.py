"""The GPU campaign: one command that checks the CUDA paths and trains Table 1's
SimpleCNN row, in at most ``--budget-s`` seconds on one GPU.

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
  training images, 300 epochs, batch 128, ×0.1 at epochs 150 and 225; η* = 0.1 and the rest
  at η*/10; α at the centre of the paper's grid), trained by the benchmarks' one training
  loop (``benchmarks/common/harness.py``): ``--pack`` runs at once on the GPU, the data set
  resident there, no host read in an ordinary training step (``--amp bf16``: under
  ``torch.autocast``; the runs' names then end in ``_amp-bf16``). Every run checkpoints after
  every epoch and when the budget ends; the same command continues it.

Everything lands in ``--out`` (default ``runs/gpu_campaign``); ``campaign.json`` is rewritten
after every part, so a command stopped at its time limit still leaves what it measured.

    python benchmarks/gpu_campaign.py --data-root DATA --out OUT --pack 6
    python benchmarks/gpu_campaign.py --dry-run          # CPU smoke test, tiny sizes
    python benchmarks/gpu_campaign.py --sizing           # FLOPs per step and the plan

``--archive DIR`` copies ``campaign.json`` to ``DIR`` and packs the table's runs
(checkpoints included) into ``table1-N.tar`` files (of at most ``--archive-max-mib`` MiB
each, if given); ``--unarchive`` them into ``--out`` on another machine to continue there.

Sizing (``--sizing``, docs/gpu.md): the FLOPs of one training step are counted on the CPU
(``torch.utils.flop_counter``), the GPU time per run is steps × FLOPs / the assumed sustained
throughput ``--tflops``, and the runs that fit are the table's time budget over it.
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import curvature_speed, overhead  # noqa: E402
from benchmarks.cifar10_simplecnn import CONFIG as SIMPLECNN  # noqa: E402
from benchmarks.common import harness  # noqa: E402
from benchmarks.common.config import RunSpec, SweepOptions, add_shared_options  # noqa: E402
from benchmarks.common.data import ImageDataset, MissingData  # noqa: E402
from benchmarks.common.harness import DataBundle, prepare_data, resolve_device  # noqa: E402
from benchmarks.common.models import build_model  # noqa: E402
from benchmarks.common.runner import RUNNING, DeviceOptions, RunningOptions  # noqa: E402
from benchmarks.common.syncs import SyncCounter  # noqa: E402
from benchmarks.common.timing import medians  # noqa: E402
from fisher_optim.cli import add_options, nonnegative_int, option, parser, positive_float  # noqa: E402

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
#: Runs trained at once on one GPU by default (docs/gpu.md: SimpleCNN leaves most of a
#: GPU idle; six such runs take about as long per epoch as one).
DEFAULT_PACK = 6

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
    step = overhead.make_step(model, overhead.VARIANTS[variant], [(x, y)])
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


#: (training images, images evaluated per epoch) of a run: CIFAR (45,000 after holding out
#: 5,000 for validation; validation + test) and TinyImageNet (no validation split; test).
RUN_SIZES = {"cifar": (45_000, 15_000), "tinyimagenet": (100_000, 10_000)}


def run_seconds(
    sgd: float,
    refresh: float,
    tflops: float,
    train: int,
    evaluated: int,
    epochs: int = 300,
    batch_size: int = 128,
    every: int = 10,
) -> float:
    """GPU seconds of one run at ``tflops`` sustained: every step's ``sgd`` FLOPs, a
    ``refresh`` (the penalty's extra FLOPs) every ``every`` steps, and a forward (a third of
    a step) of ``evaluated`` images per epoch."""
    steps = epochs * math.ceil(train / batch_size)
    eval_flops = epochs * evaluated * sgd / (3 * batch_size)
    return (steps * (sgd + refresh / every) + eval_flops) / (tflops * 1e12)


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
    per_run = {
        kind: run_seconds(sgd, extra, tflops, train, 15_000, epochs, batch_size, every)
        for kind, extra in (("baseline", 0.0), ("penalised", refresh))
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
    """Host syncs inside 20 FP (every=10) optimizer steps, and the training loop's whole.
    The step is written out (not ``runner.train_step``) so that a counter holds
    ``opt.step()`` alone."""
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
        windows = overhead.time_model(
            name, device, 128, window, rounds, warmup, list(OVERHEAD_VARIANTS)
        )
        times = medians(windows)
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
    seeds: Sequence[int],
    *,
    model: str = "simplecnn",
    epochs: int = 300,
    batch_size: int = 128,
    amp: str | None = None,
) -> list[RunSpec]:
    """The row's runs (``TABLE1_RUNS`` × seeds, seed-major), SimpleCNN's paper settings;
    ``amp`` (``--amp``): trained under ``torch.autocast`` in that precision."""
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
                    test_every=0,  # test@best-val on the kept weights: one test pass
                    amp=amp,
                )
            )
    return specs


def run_table1(
    specs: list[RunSpec],
    data: DataBundle,
    root: Path,
    device: torch.device,
    deadline: float,
    *,
    pack: int = DEFAULT_PACK,
    compile: bool = False,
    data_on_device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the runs by the benchmarks' training loop (``harness.run_many``, ``pack`` at
    once, resuming what an earlier command left); each run's state read back from disk.
    ``progress``: a bar per epoch on a terminal when one run trains at a time (one line per
    epoch is printed either way)."""
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = harness.run_many(
        specs,
        data,
        root,
        pack=pack,
        device=device,
        resume=True,
        progress=progress,
        deadline=deadline,
        compile=compile,
        data_on_device=data_on_device,
    )
    runs = {}
    for spec, result in zip(specs, results):
        state = {"status": result["status"], "epochs_done": result.get("epochs_done", 0)}
        if result["status"] != harness.INTERRUPTED:
            state["summary"] = result
        runs[spec.name] = state
    for spec in specs[len(results) :]:  # not reached before the deadline
        runs[spec.name] = {"status": "not started", "epochs_done": 0}
    return {
        "pack": min(pack, len(specs)),
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
        done = [runs[s.name]["summary"] for s in mine if runs[s.name]["status"] == "complete"]
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


@dataclass
class CampaignOptions:
    """The campaign's own options (the data and device options are the scripts' shared)."""

    parts: list[str] = option(
        list(PARTS),
        f"what to run, of: {', '.join(PARTS)}",
        nargs="+",
        choices=PARTS,
        metavar="PART",
    )
    budget_s: float = option(
        540.0,
        "wall-clock budget of the whole command, in seconds",
        type=positive_float,
        metavar="S",
    )
    out: Path = option(
        Path("runs") / "gpu_campaign",
        "output folder (campaign.json, tests.xml, the table1 runs)",
        type=Path,
        group=RUNNING,
    )
    seeds: list[int] = option(
        [0, 1, 2],
        "seeds of the table1 runs (seed-major: every column of seed 0 first)",
        type=nonnegative_int,
        nargs="+",
        metavar="SEED",
    )
    tflops: float = option(
        DEFAULT_TFLOPS, "sustained TFLOP/s assumed by --sizing", type=positive_float
    )
    sizing: bool = option(
        False, "print the FLOPs per step and the table1 plan, then stop", action="store_true"
    )
    sizing_models: list[str] = option(
        [],
        "with --sizing: also count the FLOPs of an SGD step and of an exact and a "
        "finite-difference refresh (every=1 steps) of these networks (default: none)",
        nargs="*",
        metavar="MODEL",
    )
    archive: Path | None = option(
        None,
        "at the end, copy campaign.json to DIR and put the table's runs (checkpoints "
        "included) into table1-N.tar files there, to carry them to another machine",
        unset="nothing is archived",
        type=Path,
        metavar="DIR",
        group=RUNNING,
    )
    archive_max_mib: float | None = option(
        None,
        "with --archive: split the runs into archives of at most this many MiB (a run "
        "is never split), for a transfer that limits file sizes",
        unset="one archive",
        type=positive_float,
        metavar="MIB",
        group=RUNNING,
    )
    unarchive: list[Path] = option(
        [],
        "first extract these table1-N.tar files (from --archive) into --out: the runs "
        "continue where they stopped (default: none)",
        type=Path,
        nargs="+",
        metavar="TAR",
        group=RUNNING,
    )
    dry_run: bool = option(
        False,
        "CPU smoke test: tiny models, data and budgets (synthetic data without --data-root)",
        action="store_true",
        group=RUNNING,
    )


def build_parser() -> argparse.ArgumentParser:
    """The campaign's options, then the data set's and the device's (shared)."""
    p = parser("benchmarks/gpu_campaign.py", __doc__.split("\n\n")[0], CampaignOptions)
    add_options(p, SweepOptions, only=("data_root", "download"))
    groups = add_shared_options(p, defaults={"pack": DEFAULT_PACK})
    add_options(p, DeviceOptions, only=("data_on_device",), groups=groups)
    add_options(p, RunningOptions, only=("no_progress",), groups=groups)
    return p


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
        plan["hours_per_run"] = {
            f"{name} {data}": {
                kind: run_seconds(flops["sgd"] * 1e9, refresh * 1e9, args.tflops, *sizes) / 3600
                for kind, refresh in (
                    ("baseline", 0.0),
                    ("penalised", flops["fp_exact_k1"] - flops["sgd"]),
                )
            }
            for name, flops in plan["gflop_per_step"].items()
            for data, sizes in RUN_SIZES.items()
            if data == "cifar" or name.startswith("wresnet")
        }
        print(json.dumps(plan, indent=2))
        return plan
    start = time.monotonic()
    end = start + args.budget_s - MARGIN_S
    device = resolve_device(args.device)
    dry = args.dry_run
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    unarchive(args.unarchive, out)
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
        except MissingData as missing:
            missing.exit()
            result = {"error": str(missing)}
        except Exception:  # noqa: BLE001 - one failing part must not cost the others
            result = {"error": traceback.format_exc()}
            print(result["error"], flush=True)
        result["part_seconds"] = time.perf_counter() - t0
        campaign["parts"][part] = result
        campaign["wall_s"] = time.monotonic() - start
        _write(out, campaign)
    print(f"campaign written to {out / CAMPAIGN_JSON} ({time.monotonic() - start:.0f} s)")
    if args.archive is not None:
        limit = None if args.archive_max_mib is None else int(args.archive_max_mib * 2**20)
        print("archived into", args.archive, ":", ", ".join(archive(out, args.archive, limit)))
    return campaign


def _run_part(
    part: str,
    args: argparse.Namespace,
    device: torch.device,
    deadline: Callable[[str], float],
    end: float,
    out: Path,
    data: "_DataLoad | None",
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


def archive(out: Path, dest: Path, limit: int | None = None) -> list[str]:
    """Copy ``campaign.json`` to ``dest`` and the table's run folders (checkpoints included)
    into ``table1-N.tar`` files there, each of at most ``limit`` bytes if given (a run is
    never split); :func:`unarchive` them to continue the runs on another machine."""
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
        if not chunks or (limit is not None and size + run_size > limit):
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


def unarchive(archives: Sequence[Path], out: Path) -> None:
    """Extract ``table1-N.tar`` files written by :func:`archive` into ``out``."""
    for path in archives:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            if any(not n.startswith("table1/") or ".." in Path(n).parts for n in names):
                raise ValueError(f"{path} is not a table1 archive written by --archive")
            tar.extractall(out, filter="data")


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
                        download=args.download,
                    )
                )
            else:
                self.result.append(
                    prepare_data("cifar10", args.data_root, val_size=5000, download=args.download)
                )
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            self.error.append(err)

    def get(self) -> DataBundle:
        self.thread.join()
        if self.error:
            raise self.error[0]
        return self.result[0]


def _table1(
    args: argparse.Namespace, device: torch.device, end: float, out: Path, data: "_DataLoad"
) -> dict[str, Any]:
    if args.dry_run:
        dry = {"epochs": DRY["epochs"], "batch_size": DRY["batch_size"]}
        specs = table1_specs(args.seeds[:1], **dry, amp=args.amp)
        specs = [replace(s, model=DRY["model"]) for s in specs[:2]]
    else:
        specs = table1_specs(args.seeds, amp=args.amp)
    bundle = data.get()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the earlier parts' cached blocks, for the runs
    result = run_table1(
        specs,
        bundle,
        out / "table1",
        device,
        end,
        pack=args.pack,
        compile=args.compile,
        data_on_device=args.data_on_device,
        progress=not args.no_progress,
    )
    result["train_images"] = len(bundle.train)
    return result


if __name__ == "__main__":
    main()

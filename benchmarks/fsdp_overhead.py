"""Step time and peak memory of the Fisher penalty under FSDP2, against plain FSDP2 training.

Two ranks (gloo, CPU) train a small causal transformer (``ByteTransformerLM`` of
``benchmarks/common/text.py``: GELU MLPs, LayerNorm) sharded with ``fully_shard`` per block
and at the root, with SGD (momentum 0.9). Every variant trains its own copy of the same
initial model on the same batch (each rank its half); the variants are timed side by side in
one pair of processes (``--warmup`` untimed steps, then ``--rounds`` interleaved windows of
``--window`` steps; the median, the slower rank's). Memory, per variant and rank: what is held
between steps (parameter shards, momentum, the cached penalty gradient) and the peak of the
tensor memory allocated during a refresh step above that (the torch profiler's memory
timeline: activations, gradients, all-gathered blocks, the finite difference's copies).

The penalty runs in both modes: the finite difference on the sharded passes, and the exact
mode (double backprop) on the gathered full parameters, freed after the refresh. Fisher noise
runs with each covariance: diagonal and trace (per-example gradients on the gathered
parameters, their sums all-reduced at each refresh) and full (one extra forward and backward
per step, and an all-reduce of the parameters' size).

``--mp-error`` also measures what the finite difference does under
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: its relative error
against the float32 exact penalty gradient of the unsharded model on the whole batch, with
the same labels, at several steps and schemes.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_overhead.py --mp-error --output docs/fsdp_overhead_measured.md
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.runner import Precision, RunningOptions, train_step  # noqa: E402
from benchmarks.common.text import (  # noqa: E402
    VOCAB_SIZE,
    ByteTransformerLM,
    token_cross_entropy,
)
from benchmarks.common.timing import (  # noqa: E402
    PACK_REFUSED,
    TimingOptions,
    interleaved_windows,
    medians,
)
from benchmarks.lm_stdlib import LMOptions  # noqa: E402
from fisher_optim import FisherNoiseSGD, FisherPenaltySGD  # noqa: E402
from fisher_optim.batch import Batch  # noqa: E402
from fisher_optim.cli import add_options, option, parser  # noqa: E402
from fisher_optim.differentiation import (  # noqa: E402
    exact_penalty_gradient,
    finite_difference_penalty_gradient,
)
from fisher_optim.penalty import PenaltyObjective  # noqa: E402

WORLD = 2
#: An optimizer to time: ("penalty", FisherPenaltySGD keywords) or ("noise", FisherNoiseSGD
#: keywords); None: plain SGD.
Spec = tuple[str, dict[str, Any]] | None
FD = {"mode": "finite_difference"}
NOISE = {"small_batch_size": 4}
#: name -> optimizer on the sharded model.
VARIANTS: dict[str, Spec] = {
    "fsdp_sgd": None,
    "fp_fd_k10": ("penalty", {**FD, "every": 10}),
    "fp_fd_k10_forward": ("penalty", {**FD, "every": 10, "fd_scheme": "forward"}),
    "fp_fd_k1": ("penalty", {**FD, "every": 1}),
    "fp_fd_k1_forward": ("penalty", {**FD, "every": 1, "fd_scheme": "forward"}),
    "fp_exact_k10": ("penalty", {"every": 10, "mode": "exact"}),
    "fp_exact_k1": ("penalty", {"every": 1, "mode": "exact"}),
    "noise_diag_k10": ("noise", {**NOISE, "every": 10}),
    "noise_diag_k1": ("noise", {**NOISE, "every": 1}),
    "noise_trace_k1": ("noise", {**NOISE, "every": 1, "covariance": "trace"}),
    "noise_full_k1": ("noise", {**NOISE, "every": 1, "covariance": "full"}),
}
#: ``--ddp``: name -> optimizer on the DDP-wrapped, unsharded model.
DDP_VARIANTS: dict[str, Spec] = {
    "ddp_sgd": None,
    "ddp_fp_fd_k1": ("penalty", {**FD, "every": 1}),
    "ddp_fp_exact_k1": ("penalty", {"every": 1, "mode": "exact"}),
    "ddp_noise_diag_k1": ("noise", {**NOISE, "every": 1}),
    "ddp_noise_trace_k1": ("noise", {**NOISE, "every": 1, "covariance": "trace"}),
}
MP_STEPS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
MP_SCHEMES = ("forward", "central")


def build(args: argparse.Namespace, mp_policy: Any = None) -> nn.Module:
    """The transformer, seeded, ``fully_shard``-ed per block and at the root."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = ByteTransformerLM(args.context, args.dim, args.layers, args.heads)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


def local_batch(args: argparse.Namespace, rank: int) -> torch.Tensor:
    """This rank's half of the global batch of byte ids ``[2 · batch, context]``."""
    ids = torch.randint(
        VOCAB_SIZE,
        (WORLD * args.batch_size, args.context),
        generator=torch.Generator().manual_seed(1),
    )
    return ids[rank * args.batch_size : (rank + 1) * args.batch_size]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The next-byte loss of the logits of ``ids``: position t predicts byte t + 1."""
    return token_cross_entropy(logits[:, :-1], ids[:, 1:])


#: The steps train in float32 (FSDP2's mixed precision is its ``mp_policy``).
FLOAT32 = Precision(None, "cpu")


def make_optimizer(model: nn.Module, spec: Spec, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, on ``model``, with SGD's lr 1e-3 and momentum 0.9;
    Fisher noise's small batch is kept below the global batch ``M_L``."""
    common = {"lr": 1e-3, "momentum": 0.9}
    if spec is None:
        return torch.optim.SGD(model.parameters(), **common)
    kind, kwargs = spec
    if kind == "penalty":
        return FisherPenaltySGD(model, alpha=0.01, **common, **kwargs)
    small = min(kwargs["small_batch_size"], global_batch // 2)
    return FisherNoiseSGD(model, **common, **{**kwargs, "small_batch_size": small})


def make_step(
    model: nn.Module, spec: Spec, ids: torch.Tensor
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    opt = make_optimizer(model, spec, WORLD * len(ids))

    def step() -> None:
        train_step(model, opt, FLOAT32, ids, ids, lm_loss)

    return step, opt


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a sharded parameter); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def held_mib(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """This rank's parameter shards, optimizer state and cached penalty gradient, in MiB."""
    tensors = [local_shard(p) for p in model.parameters()]
    tensors += [
        local_shard(t)
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    tensors += [local_shard(c) for c in getattr(opt, "_cache", None) or [] if c is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def step_peak_mib(step: Callable[[], None]) -> float:
    """Peak of the tensor memory allocated during one call of ``step``, above the level at
    its start: the running sum of the profiler's allocation (+) and free (−) events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(nodes: list[Any]) -> Any:
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (n for n in walk(tree) if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns
    )
    level = peak = 0
    for node in allocations:
        level += node.extra_fields.alloc_size
        peak = max(peak, level)
    return peak / 2**20


def measure_overhead(args: argparse.Namespace, rank: int) -> dict[str, dict[str, float]]:
    ids = local_batch(args, rank)
    memory = {}
    for name, spec in VARIANTS.items():  # step 0 refreshes the penalty gradient
        model = build(args)  # the same initial model (FSDP modules cannot be deep-copied)
        step, opt = make_step(model, spec, ids)
        peak = step_peak_mib(step)
        memory[name] = {"peak_mib": peak, "held_mib": held_mib(model, opt)}
    steps = {v: make_step(build(args), spec, ids)[0] for v, spec in VARIANTS.items()}
    times = medians(interleaved_windows(steps, args.window, args.rounds, args.warmup))
    slowest = torch.tensor([times[v] for v in VARIANTS], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {v: {"s_per_step": float(t), **memory[v]} for v, t in zip(VARIANTS, slowest)}


def measure_ddp(args: argparse.Namespace, rank: int) -> dict[str, dict[str, float]]:
    """Step time of each :data:`DDP_VARIANTS` entry, and the time spent per step in the
    optimizer's own all-reduces (those of the penalty of the global batch: every gradient of
    a refresh averaged over the ranks; DDP's reducer runs in C++ and is not counted)."""
    ids = local_batch(args, rank)
    spent = {name: 0.0 for name in DDP_VARIANTS}
    counted = {name: 0 for name in DDP_VARIANTS}
    current = {"name": ""}
    real_all_reduce = dist.all_reduce

    def timed_all_reduce(*a: Any, **kw: Any) -> Any:
        begin = time.perf_counter()
        try:
            return real_all_reduce(*a, **kw)
        finally:
            spent[current["name"]] += time.perf_counter() - begin

    def make(name: str, spec: Spec) -> Callable[[], None]:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            ByteTransformerLM(args.context, args.dim, args.layers, args.heads)
        )
        opt = make_optimizer(model, spec, WORLD * len(ids))

        def step() -> None:
            current["name"] = name
            counted[name] += 1
            train_step(model, opt, FLOAT32, ids, ids, lm_loss)

        return step

    steps = {name: make(name, spec) for name, spec in DDP_VARIANTS.items()}
    dist.all_reduce = timed_all_reduce
    try:
        times = medians(interleaved_windows(steps, args.window, args.rounds, args.warmup))
    finally:
        dist.all_reduce = real_all_reduce
    per_step = [spent[v] / max(counted[v], 1) for v in DDP_VARIANTS]
    values = torch.tensor([*(times[v] for v in DDP_VARIANTS), *per_step], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    n = len(DDP_VARIANTS)
    return {
        v: {"s_per_step": float(values[i]), "all_reduce_s_per_step": float(values[n + i])}
        for i, v in enumerate(DDP_VARIANTS)
    }


def measure_mp_error(args: argparse.Namespace, rank: int) -> dict[str, float]:
    """``{"<scheme> <c>": relative error}`` of the bf16-compute finite difference against the
    float32 exact gradient of the unsharded model (and the float32 default, for reference)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    ids = local_batch(args, rank)
    whole = torch.cat([local_batch(args, r) for r in range(WORLD)])
    torch.manual_seed(0)  # the initialisation of build()
    reference = ByteTransformerLM(args.context, args.dim, args.layers, args.heads)
    with torch.no_grad():  # labels drawn once from the float32 model, shared by every run
        logits = reference(whole).reshape(-1, VOCAB_SIZE)
        labels = torch.multinomial(
            logits.softmax(-1), 1, generator=torch.Generator().manual_seed(2)
        )
    labels = labels.squeeze(1)
    rows = args.batch_size * args.context

    def objective(model: nn.Module, inputs: torch.Tensor, lab: torch.Tensor) -> PenaltyObjective:
        obj = PenaltyObjective(model, Batch((inputs,)))
        obj.labels = lab
        return obj

    exact = exact_penalty_gradient(objective(reference, whole, labels)).grads
    exact_flat = torch.cat([g.flatten() for g in exact]).double()
    mine = labels[rank * rows : (rank + 1) * rows]
    out = {}
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    runs = [("float32 default", None, None, None)]
    runs += [(f"bf16 {s} {c:g}", bf16, s, c) for s in MP_SCHEMES for c in MP_STEPS]
    for key, policy, scheme, c in runs:
        model = build(args, policy)
        params = list(model.parameters())
        theta = sum(float(local_shard(p).detach().double().pow(2).sum()) for p in params)
        theta_t = torch.tensor(theta, dtype=torch.float64)
        dist.all_reduce(theta_t)
        step = None if c is None else c * max(1.0, float(theta_t.sqrt()))
        with mock.patch("fisher_optim.differentiation.compute_dtypes", lambda m: set()):
            grads = finite_difference_penalty_gradient(objective(model, ids, mine), step, scheme)
        fd = torch.cat([g.full_tensor().flatten() for g in grads.grads]).double()
        out[key] = float((fd - exact_flat).norm() / exact_flat.norm())
    return out


def worker(rank: int, init_file: str, out_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {"overhead": measure_overhead(args, rank)}
        if args.ddp:
            results["ddp"] = measure_ddp(args, rank)
        if args.mp_error:
            results["mp_error"] = measure_mp_error(args, rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def tables(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    rows = results["overhead"]
    plain = rows["fsdp_sgd"]
    lines = [
        f"FSDP2, 2 ranks (gloo, CPU, {args.threads} thread(s) each), ByteTransformerLM "
        f"(layers {args.layers}, dim {args.dim}, heads {args.heads}, context {args.context}), "
        f"batch {args.batch_size} per rank; median of {args.rounds} interleaved windows of "
        f"{args.window} steps. Memory per rank: held between steps, and the peak allocated "
        "during a refresh step above it.",
        "",
        "| variant | ms/step | × FSDP2 SGD | held MiB | step peak MiB | × FSDP2 SGD |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {1e3 * r['s_per_step']:.1f} | {r['s_per_step'] / plain['s_per_step']:.2f} "
            f"| {r['held_mib']:.2f} | {r['peak_mib']:.2f} | {r['peak_mib'] / plain['peak_mib']:.2f} |"
        )
    if "ddp" in results:
        base = results["ddp"]["ddp_sgd"]["s_per_step"]
        lines += [
            "",
            "The same model and batch under DDP (unsharded); "
            "`all-reduce ms/step`: the time per step spent in "
            "the optimizer's own all-reduces (every gradient of a refresh averaged over the "
            "ranks, for the penalty of the global batch; DDP's own gradient reduction is not "
            "counted).",
            "",
            "| variant | ms/step | × DDP SGD | all-reduce ms/step | share of the step |",
            "|---|---|---|---|---|",
        ]
        for name, r in results["ddp"].items():
            t, ar = r["s_per_step"], r["all_reduce_s_per_step"]
            lines.append(
                f"| {name} | {1e3 * t:.1f} | {t / base:.2f} | {1e3 * ar:.2f} | {ar / t:.1%} |"
            )
    if "mp_error" in results:
        lines += [
            "",
            "Relative error of the finite-difference penalty gradient against the "
            "float32 exact one (unsharded, same labels):",
            "",
            "| passes | scheme | relative step c | relative error |",
            "|---|---|---|---|",
        ]
        for key, err in results["mp_error"].items():
            parts = key.split()
            if parts[0] == "float32":
                lines.append(f"| float32 (no policy) | default | default | {err:.2e} |")
            else:
                lines.append(f"| bf16 params, fp32 reduce | {parts[1]} | {parts[2]} | {err:.2e} |")
    lines += ["", f"Produced by `{command}` (torch {torch.__version__})."]
    return "\n".join(lines)


@dataclass
class FSDPOptions:
    """What ``benchmarks/fsdp_overhead.py`` measures besides the step times."""

    mp_error: bool = option(
        False,
        "also measure the finite difference under a bf16 MixedPrecisionPolicy",
        action="store_true",
    )
    ddp: bool = option(
        False,
        "also time the same model under DDP: exact mode, Fisher noise and the penalty's "
        "all-reduces",
        action="store_true",
    )
    output: Path | None = option(
        None,
        "also write the tables (Markdown) to FILE",
        unset="print only",
        type=Path,
        metavar="FILE",
    )


#: The model's options, LMOptions' (``benchmarks/lm_stdlib.py``), with this script's defaults;
#: ``--batch-size`` is per rank.
MODEL_DEFAULTS = {"layers": 4, "dim": 128, "heads": 4, "context": 64, "batch_size": 8}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every value is range-checked (a bad one is an argparse error)."""
    p = parser("benchmarks/fsdp_overhead.py", __doc__.split("\n\n")[0], FSDPOptions, TimingOptions)
    add_options(p, LMOptions, only=MODEL_DEFAULTS, defaults=MODEL_DEFAULTS)
    add_options(p, RunningOptions, only=("threads",), defaults={"threads": 1})
    add_shared_options(p, refused=REFUSED, defaults={"device": "cpu"})
    return p


#: The shared options this script declares but does not take, and why.
REFUSED = {
    "device": "its two ranks run on the CPU (gloo); one GPU per rank needs NCCL and torchrun",
    "compile": "it times the optimizers' steps on the eager FSDP2 and DDP models",
    "amp": "FSDP2's mixed precision is a MixedPrecisionPolicy, not autocast: --mp-error "
    "measures the finite difference under one",
    "pack": PACK_REFUSED,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.dim % args.heads:
        build_parser().error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(str(Path(tmp) / "init"), tmp, args), nprocs=WORLD, join=True)
        results = torch.load(Path(tmp) / "results.pt", weights_only=False)
    command = " ".join(
        ["python benchmarks/fsdp_overhead.py", *(sys.argv[1:] if argv is None else argv)]
    )
    text = tables(results, args, command)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()

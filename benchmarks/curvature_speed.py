"""Speed of Tr(F) with sampled labels: ghost norms vs. the per-example alternatives.

Times, side by side in one process, with warm-up and interleaved repeats (median), on
SimpleCNN and VGG-11 at CIFAR shape ``[n, 3, 32, 32]``:

* ``loop``      - batch size 1, one forward+backward per example (the naive reference);
* ``vmap``      - ``torch.func.vmap(grad)`` over examples, in chunks;
* ``fisher_trace`` - :func:`fisher_optim.curvature.fisher_trace` (ghost norms, one batched
  forward+backward per chunk, labels sampled inside);
* ``backpack``  - BackPACK's ``BatchL2Grad`` (skipped with a note when not installed);
* ``batched``   - one ordinary batched forward+backward of the summed loss (the floor);
* ``lambda_K``  - with ``--covariance``: λ_K^1, the top eigenvalue of the gradient covariance
  (:func:`fisher_optim.curvature.gradient_covariance_eigenvalues`, N×N Gram matrix of all n
  examples; its value is not comparable with Tr(F)).

The per-example methods use the same sampled labels, so their Tr(F) values must agree to
float precision; ``per_example_grad_norms`` (the same engine as ``fisher_trace``) is checked
with those labels too. Run, e.g.::

    OMP_NUM_THREADS=2 python benchmarks/curvature_speed.py --n 512 --repeats 3

It takes the options every script takes, and refuses three of them (``--help`` says why):
``--pack`` (a timing runs alone), ``--compile`` and ``--amp`` (it only measures, and
measurements run on the eager model in float32).
"""

# (no ``from __future__ import annotations``: dataclasses then look the script up in
# sys.modules, where a script loaded by path, as the tests do, need not be)

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from benchmarks.common.config import add_shared_options  # noqa: E402
from benchmarks.common.harness import resolve_device  # noqa: E402
from benchmarks.common.models import MODELS, build_model  # noqa: E402
from benchmarks.common.runner import MEASURED_EAGER  # noqa: E402
from benchmarks.common.timing import PACK_REFUSED, TimingOptions  # noqa: E402
from fisher_optim.cli import (  # noqa: E402
    add_options,
    option,
    parser,
    positive_int,  # noqa: E402
)

MODEL_NAMES = tuple(sorted(MODELS))
# imported after the repository root is on sys.path
sample_labels = importlib.import_module("fisher_optim.likelihoods").sample_labels
curvature = importlib.import_module("fisher_optim.curvature")
#: The timed methods (``backpack`` only when BackPACK is installed).
METHODS = ("loop", "vmap", "fisher_trace", "backpack", "batched")


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def loop_trace(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Naive: one backward per example."""
    total = 0.0
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, _params(model))
        total += float(sum(g.square().sum() for g in grads))
    return total / len(x)


def vmap_trace(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 64) -> float:
    """torch.func.vmap(grad) over examples, ``chunk`` at a time."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = 0.0
    for s in range(0, len(x), chunk):
        grads = per_example(params, x[s : s + chunk], y[s : s + chunk])
        total += float(sum(g.flatten(1).square().sum() for g in grads.values()))
    return total / len(x)


def batched_backward(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """One ordinary batched forward+backward (no per-example information)."""
    grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), _params(model))
    return float(sum(g.square().sum() for g in grads))


def backpack_trace(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """BackPACK BatchL2Grad (per-example squared gradient norms)."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    ext_model = extend(model)
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(ext_model(x), y)
    with backpack(BatchL2Grad()):
        loss.backward()
    total = float(sum(p.batch_l2.sum() for p in _params(model)))
    model.zero_grad(set_to_none=True)
    return total / len(x)


def make_methods(
    model: nn.Module,
    device: torch.device,
    chunk_size: int,
    has_backpack: bool,
    covariance: bool = False,
) -> dict[str, Callable[[Tensor, Tensor], float]]:
    """The timed methods, each ``(x, y) -> Tr(F)`` (``batched``: a squared norm)."""
    gen = torch.Generator(device).manual_seed(1)
    methods: dict[str, Callable[[Tensor, Tensor], float]] = {
        "loop": lambda x, y: loop_trace(model, x, y),
        "vmap": lambda x, y: vmap_trace(model, x, y),
        "fisher_trace": lambda x, y: curvature.fisher_trace(
            model, x, chunk_size=chunk_size, generator=gen
        ),
        "batched": lambda x, y: batched_backward(model, x, y),
    }
    if has_backpack:
        methods["backpack"] = lambda x, y: backpack_trace(model, x, y)
    if covariance:
        methods["lambda_K"] = lambda x, y: float(
            curvature.gradient_covariance_eigenvalues(model, (x, y))[0]
        )
    return methods


@dataclass
class SpeedOptions:
    """What ``benchmarks/curvature_speed.py`` times."""

    models: list[str] = option(
        ["simplecnn", "vgg11"],
        f"networks, of: {', '.join(MODEL_NAMES)}",
        nargs="+",
        choices=MODEL_NAMES,
        metavar="MODEL",
    )
    n: int = option(
        512,
        "examples of the random CIFAR-shaped batch Tr(F) is measured on",
        type=positive_int,
    )
    repeats: int = option(
        3,
        "interleaved timed repeats of each method; the median is reported",
        type=positive_int,
    )
    chunk_size: int = option(
        256,
        "chunk_size of fisher_trace and per_example_grad_norms",
        type=positive_int,
        metavar="N",
    )
    skip: list[str] = option(
        [],
        f"methods to leave out, of: {', '.join(METHODS)} (default: none)",
        nargs="*",
        choices=METHODS,
        metavar="METHOD",
    )
    covariance: bool = option(
        False,
        "also time λ_K^1 (gradient_covariance_eigenvalues, the "
        "N×N Gram matrix of the n examples) next to fisher_trace",
        action="store_true",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every value is range-checked (a bad one is an argparse error)."""
    p = parser("benchmarks/curvature_speed.py", __doc__.split("\n")[0], SpeedOptions)
    add_options(p, TimingOptions, only=("json",))
    add_shared_options(p, refused=REFUSED, defaults={"device": "cpu"})
    return p


#: The shared options this script declares but does not take, and why.
REFUSED = {"compile": MEASURED_EAGER, "amp": MEASURED_EAGER, "pack": PACK_REFUSED}


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        import backpack  # noqa: F401

        has_backpack = True
    except ImportError:
        has_backpack = False
        print("note: BackPACK not installed (pip install backpack-for-pytorch); skipped")

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"n={args.n}, repeats={args.repeats} (median)")  # fmt: skip
    results: dict = {"device": str(device), "n": args.n, "threads": torch.get_num_threads()}
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name).to(device).eval()
        x = torch.randn(args.n, 3, 32, 32, device=device)
        with torch.no_grad():
            y = sample_labels(model(x), generator=torch.Generator(device).manual_seed(0))
        methods = make_methods(model, device, args.chunk_size, has_backpack, args.covariance)
        methods = {k: v for k, v in methods.items() if k not in args.skip}
        # warm-up (the loop on a few examples only)
        for key, fn in methods.items():
            k = 8 if key == "loop" else args.n
            fn(x[:k], y[:k])
        times: dict[str, list[float]] = {k: [] for k in methods}
        values: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved
            for key, fn in methods.items():
                sync()
                t0 = time.perf_counter()
                values[key] = fn(x, y)
                sync()
                times[key].append(time.perf_counter() - t0)
        ghost = float(curvature.per_example_grad_norms(model, x, y, chunk_size=args.chunk_size)
                      .double().square().mean())  # fmt: skip
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med.get("batched")
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters")
        print(f"{'method':>14} {'seconds':>9} {'x batched':>10} {'loop / it':>10} {'Tr(F)':>12}")
        for key in methods:
            rel = f"{med[key] / ref:10.2f}" if ref else f"{'-':>10}"
            speedup = f"{med['loop'] / med[key]:10.1f}" if "loop" in med else f"{'-':>10}"
            value = "" if key == "batched" else f"{values[key]:12.5g}"
            print(f"{key:>14} {med[key]:9.3f} {rel} {speedup} {value}")
        if "lambda_K" in med and "fisher_trace" in med:
            print(f"lambda_K / fisher_trace time: {med['lambda_K'] / med['fisher_trace']:.2f}")
        refs = {k: values[k] for k in ("loop", "vmap", "backpack") if k in values}
        agree = {k: abs(v - ghost) / abs(v) for k, v in refs.items()}
        print(f"ghost-norm Tr(F) with the same labels: {ghost:.6g}; relative difference to "
              + ", ".join(f"{k} {d:.1e}" for k, d in agree.items()))  # fmt: skip
        print("(fisher_trace draws its own labels: its value differs by sampling noise)")
        results[name] = {
            "seconds": med, "all_seconds": times, "values": values,
            "ghost_same_labels": ghost, "relative_difference": agree,
        }  # fmt: skip
        if agree and max(agree.values()) > 1e-3:
            print(f"WARNING: {name}: per-example methods disagree: {agree}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

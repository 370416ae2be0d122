"""Interleaved timing, shared by the overhead benchmarks: every variant's step runs one
timed window per round, in turn, so a slow phase of a shared machine hits all variants
alike, and the median window of each is reported (the speed claims' protocol: warm-up,
interleaved repeats, median)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fisher_optim.cli import nonnegative_int, option, positive_int

__all__ = [
    "PACK_REFUSED",
    "TimingOptions",
    "interleaved_windows",
    "medians",
    "round_ratio_range",
]

#: Why a timing script refuses ``--pack N`` (N > 1).
PACK_REFUSED = (
    "a timing runs alone. Runs packed side by side on one device share its cores, memory "
    "bandwidth and caches, and slow each other by amounts that differ from variant to "
    "variant and from round to round, so the times and their ratios would be wrong. Run "
    "one timing command at a time"
)


@dataclass
class TimingOptions:
    """The options of an interleaved timing (:func:`interleaved_windows`), shared by the
    overhead benchmarks."""

    window: int = option(10, "steps per timed window", type=positive_int, metavar="STEPS")
    rounds: int = option(5, "interleaved rounds; the median window is reported", type=positive_int)
    warmup: int = option(
        3, "untimed steps of each variant before the rounds", type=nonnegative_int, metavar="STEPS"
    )
    json: Path | None = option(
        None,
        "also write the results to this JSON file",
        unset="print only",
        type=Path,
        metavar="PATH",
    )


def interleaved_windows(
    steps: dict[str, Callable[[], None]],
    window: int,
    rounds: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of each step function in each round: ``warmup`` untimed steps each,
    then ``rounds`` rounds in which every function runs one timed window of ``window``
    steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        for v, step in steps.items():
            sync()
            start = clock()
            for _ in range(window):
                step()
            sync()
            samples[v].append((clock() - start) / window)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median window of each step function of :func:`interleaved_windows`."""
    return {v: statistics.median(s) for v, s in samples.items()}


def round_ratio_range(samples: list[float], reference: list[float]) -> tuple[float, float]:
    """``(lowest, highest)`` of the per-round ratios ``samples[i] / reference[i]``: each
    round's windows ran back to back, so their ratio cancels a slow phase of the machine
    that the ratio of the two medians would not."""
    ratios = [s / r for s, r in zip(samples, reference, strict=True)]
    return min(ratios), max(ratios)

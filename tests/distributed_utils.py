"""Running a test module's scenarios on several gloo ranks with torch.multiprocessing.spawn."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: ``scenarios(rank, work_dir) -> results``: a module-level function (the ranks import it).
Scenarios = Callable[[int, str], dict[str, Any]]


def _worker(rank: int, world: int, work_dir: str, scenarios: Scenarios) -> None:
    torch.set_num_threads(1)
    init = f"file://{Path(work_dir) / 'init'}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(scenarios(rank, work_dir), os.path.join(work_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(scenarios: Scenarios, world: int = 2) -> list[dict[str, Any]]:
    """Every rank's results of ``scenarios``, run once in a fresh process group."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, scenarios), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]

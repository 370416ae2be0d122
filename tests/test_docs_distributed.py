"""The distributed guide: every ```python block of docs/guides/distributed.md is a whole
script that runs as written under ``torchrun --standalone --nproc-per-node 2`` on the CPU
(gloo), each in its own temporary working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from .test_docs import DOCS, ROOT, python_blocks

PAGE = DOCS / "guides" / "distributed.md"
BLOCKS = python_blocks(PAGE.read_text(encoding="utf-8"))

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def test_the_guide_has_its_scripts() -> None:
    assert len(BLOCKS) >= 3
    for _, source in BLOCKS:
        assert '"nccl"' not in source and ".cuda()" not in source  # the CPU version, as run


def _marks(index: int) -> list[pytest.MarkDecorator]:
    """The first script (DDP) runs in the default suite; the others (~15 s each) are slow."""
    return [] if index == 0 else [pytest.mark.slow]


@pytest.mark.parametrize(
    "line",
    [pytest.param(line, marks=_marks(i), id=f"line{line}") for i, (line, _) in enumerate(BLOCKS)],
)
def test_block_runs_under_torchrun(line: int, tmp_path: Path) -> None:
    source = dict(BLOCKS)[line]
    script = tmp_path / "script.py"
    script.write_text(source, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*command, "--nproc-per-node", "2", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"{PAGE.name}:{line}\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.count("rank ") == 2

"""benchmarks/step_time_across_commits.py: each timed process imports the fisher_optim of
the checkout it times, and the command reports one row per optimizer."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

script = importlib.import_module("benchmarks.step_time_across_commits")


def test_a_baseline_without_the_package_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no fisher_optim/ package"):
        script.main(["--baseline", str(tmp_path)])


@pytest.mark.slow
def test_one_round_against_this_checkout(capsys):
    argv = ["--baseline", str(ROOT), "--variants", "fp_fd", "noise_diagonal"]
    script.main([*argv, "--repeats", "1", "--steps", "1", "--warmup", "0", "--batch-size", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fp_fd")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 9

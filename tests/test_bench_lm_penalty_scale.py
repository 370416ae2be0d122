"""benchmarks/lm_penalty_scale.py: --amp computes the penalty under autocast, --pack measures
the sequence lengths in processes with the same numbers, --compile is refused."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")
scale = importlib.import_module("benchmarks.lm_penalty_scale")


def test_packed_lengths_see_the_same_batches_and_amp_changes_the_values():
    argv = ["--draws", "2"]
    alone = scale.main(argv)
    assert [line.split()[0] for line in alone] == ["8", "16", "32", "64"]
    assert scale.main([*argv, "--pack", "2"]) == alone
    # one length measured alone draws the batches the whole sweep drew for it
    args = scale.build_parser().parse_args(argv)
    assert scale.measure_length(32, args)["line"] == alone[2]
    bf16 = scale.measure_length(8, scale.build_parser().parse_args([*argv, "--amp", "bf16"]))
    assert bf16["line"] != alone[0]  # the penalty under CPU autocast
    assert bf16["line"].split()[:2] == alone[0].split()[:2]


def test_compile_is_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        scale.main(["--compile"])
    assert exc.value.code == 2
    assert "double backward" in capsys.readouterr().err

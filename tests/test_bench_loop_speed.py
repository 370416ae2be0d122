"""benchmarks/loop_speed.py: the harness's training step and the bare hand-written loop it
is timed against train the same model on the same batches (bitwise, on the CPU), and the
command reports both throughputs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

loop_speed = importlib.import_module("benchmarks.loop_speed")


def _trained(extra: list[str]) -> tuple[dict, dict, list[torch.dtype]]:
    """Both loops' state after 5 steps each, and the dtypes of the models' outputs."""
    args = loop_speed.build_parser().parse_args(
        ["--model", "tiny", "--images", "64", "--batch-size", "16", *extra]
    )
    steps = loop_speed.steps(args, torch.device("cpu"))
    seen: list[torch.dtype] = []
    for step in steps.values():
        step.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    for _ in range(5):
        steps["harness"]()
        steps["bare"]()
    return steps["harness"].model.state_dict(), steps["bare"].model.state_dict(), seen


@pytest.mark.parametrize(
    ("amp", "dtype"), [([], torch.float32), (["--amp", "bf16"], torch.bfloat16)]
)
def test_the_two_loops_train_the_same_model_bitwise(amp, dtype):
    a, b, seen = _trained(amp)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(seen) == {dtype}  # --amp bf16: both under CPU autocast


@pytest.mark.slow
def test_compile_trains_both_loops_through_torch_compile():
    torch._dynamo.reset()
    a, b, _ = _trained(["--compile"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_the_command_reports_both_throughputs(tmp_path):
    out = tmp_path / "loop.json"
    result = loop_speed.main(
        [
            "--model",
            "tiny",
            "--images",
            "64",
            "--batch-size",
            "16",
            "--window",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert set(result["images_per_s"]) == {"harness", "bare"}
    assert result["harness_time_over_bare"] > 0 and out.is_file()

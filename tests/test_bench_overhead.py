"""Smoke tests of benchmarks/overhead.py and benchmarks/fd_step.py on small settings."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_times_variants_side_by_side(tmp_path):
    overhead = load("overhead")
    out = tmp_path / "o.json"
    results = overhead.main(
        [
            "--models",
            "tiny",
            "--variants",
            "fp_fd_k1",
            "gpx_exact_k10",
            "--batch-size",
            "8",
            "--rounds",
            "2",
            "--window",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = results["tiny"]
    assert set(rows) == {"sgd", "fp_fd_k1", "gpx_exact_k10"}
    assert rows["sgd"]["ratio"] == 1.0 and rows["fp_fd_k1"]["target"] == 3.15
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert rows["sgd"]["round_ratio_range"] == [1.0, 1.0]
    low, high = rows["fp_fd_k1"]["round_ratio_range"]
    assert 0 < low <= high
    assert json.loads(out.read_text())["results"]["tiny"].keys() == rows.keys()


def test_fd_step_table_on_a_small_setting(tmp_path, monkeypatch):
    """The table: one row per network and state, every difference a median (worst) pair."""
    fd_step = load("fd_step")
    monkeypatch.setitem(fd_step.NETWORKS, "simplecnn", 4)

    def images(net, args):
        g, batch = torch.Generator().manual_seed(0), fd_step.NETWORKS[net]
        xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(args.batches)]
        return xs, [
            (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(10, (batch,)))
            for _ in range(args.train_steps)
        ]

    monkeypatch.setattr(fd_step, "network_batches", images)
    out = tmp_path / "fd.md"
    table = fd_step.main(
        ["--networks", "simplecnn", "--batches", "2", "--train-steps", "1", "--output", str(out)]
    )
    assert out.read_text() == table + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| simplecnn")]
    assert [r.split(" | ")[1] for r in rows] == ["init", "trained"]
    cells = rows[0].split(" | ")
    old, central, forward = (float(c.split()[0]) for c in cells[3:6])
    assert central < 0.01 and forward < 0.01 < old  # the old default crosses kinks here
    assert "Produced by `python benchmarks/fd_step.py" in table


def test_fd_step_rejects_invalid_options(capsys):
    fd_step = load("fd_step")
    for bad in (["--batches", "0"], ["--train-steps", "x"], ["--networks", "resnet"]):
        with pytest.raises(SystemExit) as exc:
            fd_step.main(bad)
        assert exc.value.code == 2
        assert "error: argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fd_step.main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--data-root",
        "--networks",
        "--batches",
        "--train-steps",
        "--threads",
        "--output",
    ):
        assert option in text


def _output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtypes of the last layer's outputs, one per forward (hooked)."""
    seen: list[torch.dtype] = []
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize(("amp", "dtype"), [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_overhead_steps_train_under_amp(amp, dtype):
    """``--amp bf16`` runs the training forward under CPU autocast; the finite difference's
    forwards (inside ``step()``) stay float32."""
    overhead = load("overhead")
    torch.manual_seed(0)
    model = overhead.build_model("tiny", 10)
    seen = _output_dtypes(model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    step = overhead.make_step(model, overhead.VARIANTS["fp_fd_k1"], [(x, y)], amp=amp)
    step()
    assert seen[0] == dtype and set(seen[1:]) == {torch.float32}  # training, then the penalty
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overhead_and_loop_speed_refuse_pack(capsys):
    for name in ("overhead", "loop_speed", "curvature_speed"):
        with pytest.raises(SystemExit) as exc:
            load(name).main(["--pack", "2"])
        assert exc.value.code == 2
        assert "a timing runs alone" in capsys.readouterr().err


@pytest.mark.slow
def test_overhead_compile_trains_through_torch_compile():
    overhead = load("overhead")
    torch._dynamo.reset()
    model = overhead.build_model("tiny", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    step = overhead.make_step(model, overhead.VARIANTS["fp_fd_k10"], [(x, y)], compile=True)
    step()
    step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_fd_step_trains_under_amp_and_measures_in_float32():
    fd_step = load("fd_step")
    torch.manual_seed(0)
    model = fd_step.build_model("tiny", 10)
    seen = _output_dtypes(model)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(10, (4,)))]
    fd_step.train(model, data, amp="bf16")
    assert seen == [torch.bfloat16]
    out = fd_step.measure(model, torch.randn(4, 3, 32, 32), 0, False, ["central"])
    assert seen[1:] and set(seen[1:]) == {torch.float32} and out["central"][0] < 0.05


def test_fd_step_measures_each_network_as_a_job_a_child_process_rebuilds():
    """``--pack N`` sends each network's measurement to a process as a pickled Job."""
    import pickle

    fd_step = load("fd_step")
    args = fd_step.build_parser().parse_args(["--networks", "transformer", "--pack", "2"])
    job = pickle.loads(pickle.dumps(fd_step.Job(fd_step.measure_network, "transformer", args)))
    assert job.fn is fd_step.measure_network and job.args[1].pack == 2

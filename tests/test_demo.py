"""fisher_optim/demo.py: its command line refuses bad values; a tiny run prints its table."""

from __future__ import annotations

import pytest
import torch

from fisher_optim import demo

from .cli_utils import assert_help_complete, assert_rejected


def test_help_is_complete():
    assert_help_complete(demo.build_parser())


def test_defaults():
    args = demo.parse_args([])
    assert (args.lr, args.large_lr, args.alpha, args.every, args.epochs) == (
        0.01,
        0.05,
        [0.1, 0.3],
        1,
        30,
    )


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--alpha", "-1"], "--alpha"),  # used to run plain SGD labelled "FP alpha=-1"
        (["--alpha", "0"], "--alpha"),  # plain SGD again, labelled FP
        (["--alpha", "0.1", "nan"], "--alpha"),
        (["--epochs", "0"], "--epochs"),  # used to crash: max() arg is an empty sequence
        (["--every", "0"], "--every"),  # used to print a library traceback
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.01"], "--lr"),
        (["--large-lr", "inf"], "--large-lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--momentum", "1"], "--momentum"),
        (["--momentum", "-0.5"], "--momentum"),
        (["--width", "0"], "--width"),
        (["--probe", "0"], "--probe"),
        (["--test-fraction", "0"], "--test-fraction"),
        (["--test-fraction", "1"], "--test-fraction"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "4294967296"], "--seed"),  # scikit-learn's random_state is 32-bit
        (["--threads", "0"], "--threads"),
        (["--print-every", "0"], "--print-every"),
        (["--epochs", "2.5"], "--epochs"),
    ],
)
def test_invalid_values_are_argparse_errors(argv, option, capsys):
    assert_rejected(demo.build_parser(), argv, option, capsys)


@pytest.mark.filterwarnings("ignore:FisherPenaltySGD.*spike")  # the safeguard at work
def test_tiny_run_prints_one_row_per_run(capsys):
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    results = demo.main(
        [
            "--epochs",
            "2",
            "--width",
            "8",
            "--probe",
            "16",
            "--alpha",
            "0.1",
            "--every",
            "2",
            "--print-every",
            "1",
            "--threads",
            str(threads),
        ]
    )
    assert torch.get_num_threads() == threads  # the test process is left as found
    assert [r.name for r in results] == [
        "SGD lr=0.05",
        "SGD lr=0.01",
        "FP  lr=0.01 alpha=0.1 every=2",
    ]
    assert all(0.0 <= r.test_accuracy <= 1.0 and r.peak_trace >= r.final_trace > 0 for r in results)
    assert all(1 <= r.peak_epoch <= 2 for r in results)
    out = capsys.readouterr().out
    assert "Tr(F) on 16 training examples" in out and "peak Tr(F) (epoch)" in out

"""App. E: SimpleCNN / CIFAR-10 with a 10x larger batch (1280), with and without FP.

FP is computed every step (``every=1``) on the first 128 examples of each batch
(``penalty_batch_size=128``). Runs baseline and FP at η* and η*/2 (η* = 0.1, a guess).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import SIMPLECNN_CIFAR10, ExperimentConfig

CONFIG = ExperimentConfig(
    name="large_batch",
    description=__doc__.split("\n\n")[0],
    **SIMPLECNN_CIFAR10,
    batch_size=1280,
    default_methods=("baseline", "fp"),
    lr_factors=(1.0, 0.5),
    every=1,
    penalty_batch_size=128,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

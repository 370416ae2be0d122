"""Fig. 3: Fisher penalty switched on only from epoch E ∈ {1, 2, 4, 8, ..., 128}.

SimpleCNN / CIFAR-10 setting at η*/10 (α set to 0 in the optimizer's param groups before
epoch E); the baseline is run alongside. Start epochs beyond ``--epochs`` are skipped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import SIMPLECNN_CIFAR10, ExperimentConfig

CONFIG = ExperimentConfig(
    name="fp_start_epoch",
    description=__doc__.split("\n\n")[0],
    **SIMPLECNN_CIFAR10,
    default_methods=("baseline", "fp"),
    lr_factors=(0.1,),
    fp_start_epochs=(1, 2, 4, 8, 16, 32, 64, 128),
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

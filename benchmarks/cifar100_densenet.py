"""Table 1/2/4/5 row "DenseNet / CIFAR-100" (App. I.2).

DenseNet L=40 k=12 with BatchNorm; 300 epochs, ×0.1 at 150 and 225, weight decay 1e-4,
batch 128; BatchNorm statistics re-estimated on 100 training batches before every
evaluation. η* = 0.1 is a guess (``--lr-star``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig

CONFIG = ExperimentConfig(
    name="cifar100_densenet",
    dataset="cifar100",
    model="densenet40_12",
    description=__doc__.split("\n\n")[0],
    weight_decay=1e-4,
    bn_refresh_batches=100,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

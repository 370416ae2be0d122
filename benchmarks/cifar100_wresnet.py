"""Table 1/2/4/5 row "WResNet / CIFAR-100" (App. I.2).

Wide ResNet depth 44 width 3 without BatchNorm (SkipInit); 300 epochs, ×0.1 at 150 and 225,
weight decay 1e-3, batch 128. η* = 0.1 is a guess (``--lr-star``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig

CONFIG = ExperimentConfig(
    name="cifar100_wresnet",
    dataset="cifar100",
    model="wresnet44_3_nobn",
    description=__doc__.split("\n\n")[0],
    weight_decay=1e-3,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

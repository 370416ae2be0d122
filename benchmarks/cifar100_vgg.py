"""Table 1/2/4/5 row "VGG-11 / CIFAR-100" (App. I.2).

VGG-11 without BatchNorm and dropout; 300 epochs, ×0.1 every 40 epochs from epoch 80,
weight decay 1e-4, batch 128, SGD momentum 0.9. η* = 0.1 is a guess (``--lr-star``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig, vgg_milestones

CONFIG = ExperimentConfig(
    name="cifar100_vgg",
    dataset="cifar100",
    model="vgg11",
    description=__doc__.split("\n\n")[0],
    milestones=vgg_milestones(),
    weight_decay=1e-4,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

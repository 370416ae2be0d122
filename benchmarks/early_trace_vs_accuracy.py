"""Fig. 2: Tr(F_i) at the loss threshold ε against final test accuracy.

ResNet-26 without BatchNorm (Fixup) on CIFAR-10 with flip augmentation, batch 256, weight
decay 1e-5, ×0.5 at epochs 60, 120, 170 of 200, learning rates {0.007, 0.01, 0.05}; the
batch-size variant is ``--lrs 0.02 --batch-sizes 100 500 700``. Tr(F) is also measured every
``--trace-every-steps`` (default here: 50) steps so Tr(F_i) is located within the epoch;
ε = 1.2. Draws a scatter plot (``figure.png``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig

CONFIG = ExperimentConfig(
    name="early_trace_vs_accuracy",
    dataset="cifar10",
    model="resnet26_nobn",
    description=__doc__.split("\n\n")[0],
    epochs=200,
    milestones=(60, 120, 170),
    gamma=0.5,
    weight_decay=1e-5,
    batch_size=256,
    augment="flip",
    default_methods=("baseline",),
    lrs=(0.007, 0.01, 0.05),
    figure="scatter",
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

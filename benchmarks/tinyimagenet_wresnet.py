"""Table 1/2/4/5 row "WResNet / TinyImageNet" (App. I.2).

Wide ResNet 44-3 with BatchNorm on TinyImageNet resized to 32x32, with augmentation (also in
Table 1); 300 epochs, ×0.1 at 150 and 225, weight decay 1e-4, no validation split (so
``--alpha-grid`` needs ``--val-size N``); BatchNorm statistics re-estimated on 100 training
batches before evaluation. Table 1's small learning rate is η*/30; α grid of 5 values;
ε = 3.5 (ImageNet's). η* = 0.1 is a guess (``--lr-star``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig

CONFIG = ExperimentConfig(
    name="tinyimagenet_wresnet",
    dataset="tinyimagenet",
    model="wresnet44_3",
    description=__doc__.split("\n\n")[0],
    weight_decay=1e-4,
    small_lr_divisor=30.0,
    val_size=0,
    augment="standard",
    alpha_grid_size=5,
    bn_refresh_batches=100,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

"""Table 1/2/4/5 row "SimpleCNN / CIFAR-10" (App. I.2).

Keras cifar10_cnn without dropout; 300 epochs, ×0.1 at 150 and 225, batch 128, SGD momentum
0.9; the paper does not state the weight decay: 0 here (``--weight-decay`` to change). η* is
not reported (grid of 5 LRs in [1e-2, 1]); 0.1 is a guess (``--lr-star``). A plain run trains
the baseline at η* and baseline/FP/GP/GPr/GPx at η*/10; ``--augment`` runs Table 2.

    python benchmarks/cifar10_simplecnn.py --quick --data-root DATA
    python benchmarks/cifar10_simplecnn.py --lrs 0.01 --methods baseline fp --epochs 30 \
        --train-subset 10000 --alpha 0.01 --seeds 0 1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import SIMPLECNN_CIFAR10, ExperimentConfig

CONFIG = ExperimentConfig(
    name="cifar10_simplecnn",
    description=__doc__.split("\n\n")[0],
    **SIMPLECNN_CIFAR10,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))

"""Table 3 / Fig. 5: training with noisy labels (``--noise 0.25`` or ``0.5``).

VGG-11 on CIFAR-100 (``--model resnet56_nobn`` for the ResNet row), weight decay removed,
VGG schedule; methods baseline, mixup, GPx, FP, GPr at η* (a guess, ``--lr-star``). The
reported metric is the test accuracy at the best validation epoch (validation labels are
noisy too). Every epoch logs the training accuracy on clean and noisy examples (eval mode,
w.r.t. the labels trained on) and, on the first ``--group-probe-size`` training examples,
the mean per-example gradient norm of each group and the norm/cosine of their mean
gradients. ``--alpha-grid`` searches the paper's grids: α in {0.01, 0.1, 0.31, 1, 10}
(the notes list 0.01, 0.1, 0.31, 10), GPx in {10, 30, 100, 300, 1000}, mixup β in
{0.4, 0.8, 1.6, 3.2, 6.4}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig, vgg_milestones

CONFIG = ExperimentConfig(
    name="noisy_labels",
    dataset="cifar100",
    model="vgg11",
    description=__doc__.split("\n\n")[0],
    milestones=vgg_milestones(),
    label_noise=0.25,
    default_methods=("baseline", "mixup", "gpx", "fp", "gpr"),
    lr_factors=(1.0,),
    alpha_grids={
        "fp": (0.01, 0.1, 0.31, 1.0, 10.0),
        "gpr": (0.01, 0.1, 0.31, 1.0, 10.0),
        "gpx": (10.0, 30.0, 100.0, 300.0, 1000.0),
        "mixup": (0.4, 0.8, 1.6, 3.2, 6.4),
    },
    alpha_defaults={"fp": 0.1, "gpr": 0.1, "gpx": 100.0, "mixup": 1.6},
    track_groups=True,
    eval_train=True,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))
